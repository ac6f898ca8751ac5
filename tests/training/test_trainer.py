"""Trainer: recovery of known directions, decoder-norm invariant, exact resume, every arch, errors, CLI."""

from __future__ import annotations

import dataclasses
import doctest
import json

import h5py
import numpy as np
import pytest
import torch
from _trainer_helpers import mean_max_cosine, one_torch_thread, read_metrics, toy_file, write_acts  # noqa: F401

import sae_toolkit.training.schedules
from sae_toolkit.cli import main
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import ARCHS, SAE, SAEConfig, make_sae
from sae_toolkit.training.checkpoint import list_checkpoints
from sae_toolkit.training.resample import resample_dead_latents_
from sae_toolkit.training.trainer import TrainConfig, Trainer, train_sae


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """d=32 activations built from 128 unit directions, ~4 active per row; 16k rows."""
    return toy_file(tmp_path_factory.mktemp("toy") / "toy.h5")


def _cfg(acts, out, **kw) -> TrainConfig:
    base = dict(acts=str(acts), hookpoint="hp", arch="topk", n_features=128, k=4, batch_size=128, tokens=128 * 40,
                out=str(out), log_every=5, checkpoint_every=20)
    return TrainConfig(**{**base, **kw})


# ---- learning ----

@pytest.mark.parametrize("arch,kw", [
    # Measured: relu reaches 0.94 after 780 steps; a 39-step lr warm-up alone cost 0.13 of cosine here, so it is off.
    ("relu", dict(l1_coefficient=3.0, tokens=256 * 1000, lr_warmup_steps=0, lr_decay="none")),
    ("topk", dict(k=4, tokens=256 * 400)),
])
def test_recovers_superposition_directions(toy, tmp_path, arch, kw):
    path, dirs = toy
    run = train_sae(TrainConfig(acts=str(path), hookpoint="hp", arch=arch, n_features=256, batch_size=256, lr=1e-2,
                                out=str(tmp_path / "run"), log_every=100, **kw))
    sae = SAE.load(run)
    assert mean_max_cosine(sae.W_dec.detach().numpy(), dirs) >= 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_trains_loss_falls_and_saves_on_raw_scale(small, tmp_path, arch):
    trainer = Trainer(_cfg(small, tmp_path / "run", arch=arch, tokens=128 * 60, lr=5e-3))
    run = trainer.fit()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["fvu"] < rows[0]["fvu"] and rows[-1]["loss_mse"] < rows[0]["loss_mse"]
    assert {"loss", "mse", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s", "tokens"} <= set(rows[0])
    # The saved SAE has the normalization folded in: on raw x it equals the trained one on scaled x, rescaled.
    sae = SAE.load(run).eval()
    trainer.sae.eval()  # BatchTopK: compare the inference paths (per-batch selection differs by design)
    if hasattr(sae, "calibrate_threshold_"):
        # the saved θ is calibrated at the end (raw units); the folding is what this compares
        assert float(sae.threshold) != pytest.approx(float(trainer.sae.threshold) / trainer.store.scale)
        trainer.sae.threshold.copy_(sae.threshold * trainer.store.scale)
    with h5py.File(small) as f:
        x = torch.from_numpy(f["acts/hp"][:64].astype(np.float32))
    with torch.no_grad():
        expected = trainer.sae(x * trainer.store.scale).x_hat / trainer.store.scale
        got = sae(x).x_hat
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert sae.cfg.act_scale == pytest.approx(trainer.store.scale)
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["arch"] == arch and cfg["resolved"]["d_sae"] == 128


@pytest.mark.parametrize("arch,kw", [("relu", {}), ("topk", {}), ("batchtopk", {}), ("gated", {}),
                                     ("jumprelu", {}), ("relu", {"decoder_norm_penalty": True})])
def test_decoder_rows_unit_norm_after_every_step(small, tmp_path, arch, kw):
    trainer = Trainer(_cfg(small, tmp_path / "run", arch=arch, lr=1e-2, **kw))
    try:
        for _ in range(8):
            trainer.train_one(trainer.store.next_batch())
            trainer.step += 1
            norms = trainer.sae.W_dec.norm(dim=-1)
            if trainer.sae.unit_norm_decoder:
                assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        if not trainer.sae.unit_norm_decoder:  # the April-2024 variant lets norms move
            assert not torch.allclose(norms, norms[0].expand_as(norms), atol=1e-3)
    finally:
        trainer.store.close()


def test_lr_and_sparsity_schedules():
    assert doctest.testmod(sae_toolkit.training.schedules).failed == 0
    from sae_toolkit.training.schedules import default_lr, lr_at

    # Gao et al.'s 2e-4 at 2^14 latents, ∝ 1/sqrt(d_sae), times the TopK family's factor 3 (schedules.LR_FACTOR)
    assert default_lr(2**14) == pytest.approx(6e-4)
    assert default_lr(2**16, "batchtopk") == pytest.approx(3e-4)
    lrs = [lr_at(s, 100, 1.0, warmup_steps=10, decay="cosine", decay_fraction=0.3) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == 1.0 and 0 < lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[70:], lrs[71:]))


# ---- resume ----

class _Killed(Exception):
    pass


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_resume_reproduces_the_uninterrupted_run(small, tmp_path, monkeypatch, capsys, arch):
    # A tiny dead window makes AuxK and resampling (with its RNG) part of what must be reproduced.
    kw = dict(arch=arch, tokens=128 * 40, dead_window_tokens=256, lr=1e-2, in_memory=False)
    if arch == "relu":  # strong λ and late resampling points: latents die by step ~35, resampled at 36
        kw.update(l1_coefficient=20.0, resample_fractions=(0.5, 0.75, 0.9))
    full = train_sae(_cfg(small, tmp_path / "full", **kw))
    if arch == "relu":
        assert "resampled" in capsys.readouterr().out
    else:
        assert any(r["loss_auxk"] > 0 for r in read_metrics(full))

    train_one = Trainer.train_one

    def dying(self, x):
        if self.step == 27:  # after the checkpoint at 20 and the log lines at 25
            raise _Killed
        return train_one(self, x)

    monkeypatch.setattr(Trainer, "train_one", dying)
    with pytest.raises(_Killed):
        train_sae(_cfg(small, tmp_path / "part", **kw))
    assert [r["step"] for r in read_metrics(tmp_path / "part")][-1] == 25
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 26, "lo')  # a line cut short by the kill
    monkeypatch.setattr(Trainer, "train_one", train_one)
    resumed = train_sae(_cfg(small, tmp_path / "part", resume=True, **kw))

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert strip(read_metrics(resumed)) == strip(read_metrics(full))
    a, b = SAE.load(full), SAE.load(resumed)
    for name, t in a.state_tensors().items():
        assert torch.equal(t, b.state_tensors()[name]), name
    assert [p.name for p in list_checkpoints(resumed)] == ["step_00000020", "step_00000040"]
    assert not list((resumed / "checkpoints").glob(".tmp*"))


def test_resume_and_run_dir_errors(small, tmp_path):
    run = tmp_path / "run"
    train_sae(_cfg(small, run, tokens=128 * 10))
    with pytest.raises(SAEToolkitError, match="exists and is not empty; pass --resume"):
        train_sae(_cfg(small, run, tokens=128 * 10))
    # Killed before the first checkpoint: --resume starts again; a foreign directory is refused.
    fresh = train_sae(_cfg(small, tmp_path / "fresh", resume=True, tokens=128 * 10))
    assert read_metrics(fresh)[-1]["step"] == 10
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(SAEToolkitError, match=r"has no checkpoint but holds other files \(notes.txt\)"):
        train_sae(_cfg(small, tmp_path / "foreign", resume=True))
    with pytest.raises(SAEToolkitError, match="k was 4, now 8"):
        train_sae(_cfg(small, run, tokens=128 * 10, k=8, resume=True))
    wide, _ = toy_file(tmp_path / "wide.h5", n_rows=32 * 64, context_size=32, d=48)
    with pytest.raises(SAEToolkitError, match="trained on d_in=32 .* has d=48"):
        train_sae(_cfg(wide, run, tokens=128 * 10, resume=True))


def test_resuming_a_gated_run_from_before_gated_loss_keeps_its_l1_loss(small, tmp_path):
    """A checkpoint whose train config predates `gated_loss` trained with the L1 loss: resuming it under the new
    tanh default is refused with the difference; --gated-loss l1 resumes it."""
    from sae_toolkit.training.checkpoint import STATE_NAME

    run = tmp_path / "run"
    train_sae(_cfg(small, run, arch="gated", gated_loss="l1", adam_betas=(0.9, 0.999)))
    state_file = list_checkpoints(run)[-1] / STATE_NAME
    state = json.loads(state_file.read_text())
    del state["train_config"]["gated_loss"]  # as an older sae-toolkit wrote it
    state_file.write_text(json.dumps(state))
    with pytest.raises(SAEToolkitError, match="gated_loss was 'l1', now 'tanh'"):
        train_sae(_cfg(small, run, arch="gated", adam_betas=(0.9, 0.999), resume=True))
    train_sae(_cfg(small, run, arch="gated", gated_loss="l1", adam_betas=(0.9, 0.999), resume=True))
    assert read_metrics(run)[-1]["step"] == 40 and "loss_aux" in read_metrics(run)[-1]


def test_resumed_steered_run_takes_this_codes_lr_factors(small, tmp_path):
    """The optimizer groups' lr factors (b_gate learns 3× faster under --target-l0) come from the code, not the
    checkpoint: a run saved while the factor was 10 resumes at 3."""
    from sae_toolkit.training.checkpoint import STATE_NAME

    run = tmp_path / "run"
    cfg = _cfg(small, run, arch="gated", target_l0=4.0)
    train_sae(cfg)
    state_file = list_checkpoints(run)[-1] / STATE_NAME
    state = json.loads(state_file.read_text())
    groups = state["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 3.0]
    groups[1]["lr_scale"] = 10.0  # as the code before 9554ca0 saved it
    state_file.write_text(json.dumps(state))
    trainer = Trainer(dataclasses.replace(cfg, resume=True))
    try:
        assert [g["lr_scale"] for g in trainer.opt.param_groups] == [1.0, 3.0]
        assert trainer.step == 40
    finally:
        trainer.store.close()


# ---- bad input ----

def test_bad_inputs_are_clear_errors(small, tmp_path):
    with pytest.raises(SAEToolkitError, match="'mlp_out.3' is not in .* holds: hp"):
        train_sae(_cfg(small, tmp_path / "a", hookpoint="mlp_out.3"))
    with pytest.raises(SAEToolkitError, match="k=128 must be smaller than d_sae=128"):
        train_sae(_cfg(small, tmp_path / "b", k=128))
    with pytest.raises(SAEToolkitError, match="fewer than one batch of 4096"):
        train_sae(_cfg(small, tmp_path / "c", batch_size=4096))
    with pytest.raises(SAEToolkitError, match="less than one batch"):
        train_sae(_cfg(small, tmp_path / "d", tokens=100))
    with pytest.raises(SAEToolkitError, match="resample applies to relu"):
        _cfg(small, tmp_path / "e", resample=True)
    acts = np.ones((32 * 16, 8), dtype=np.float32)
    acts[100, 3] = np.nan
    bad = write_acts(tmp_path / "bad.h5", {"hp": acts}, context_size=16, bos_token_id=None)
    with pytest.raises(SAEToolkitError, match="non-finite value in row 100"):
        train_sae(_cfg(bad, tmp_path / "f", n_features=32, batch_size=64, tokens=640, in_memory=False,
                       b_dec_init="zeros", normalize=False))


# ---- resampling ----

def test_resampling_repoints_dead_latents_and_resets_adam():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="relu", d_in=8, d_sae=16))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_loss(torch.randn(32, 8)).loss.backward()
    opt.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    before = {n: t.detach().clone() for n, t in sae.state_tensors().items()}
    inputs = torch.randn(200, 8)
    inputs[7] *= 100  # by far the worst-reconstructed input: every dead latent should point at it
    n = resample_dead_latents_(sae, opt, dead, inputs, torch.Generator().manual_seed(0))
    assert n == 3
    target = (inputs[7] - sae.b_dec) / (inputs[7] - sae.b_dec).norm()
    with torch.no_grad():
        assert torch.allclose(sae.W_dec[dead], target.expand(3, 8), atol=1e-5)
        enc_norm = before["W_enc"][:, ~dead].norm(dim=0).mean()
        assert torch.allclose(sae.W_enc[:, dead].norm(dim=0), 0.2 * enc_norm.expand(3), atol=1e-5)
        assert (sae.b_enc[dead] == 0).all()
        assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead])
    state = opt.state[sae.W_dec]
    assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg"][~dead] != 0).any()
    assert (opt.state[sae.W_enc]["exp_avg_sq"][:, dead] == 0).all()


# ---- CLI ----

def test_cli_train_then_export(small, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", str(small), "--hookpoint", "hp", "--arch", "topk", "--k", "4", "--expansion", "4",
               "--tokens", "5k", "--batch-size", "128", "--out", str(run)])
    assert rc == 0
    assert "wrote run to" in capsys.readouterr().out
    sae = SAE.load(run / "sae")
    assert (sae.cfg.arch, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == ("topk", 32, 128, 4)
    assert len(read_metrics(run)) == 5000 // 128 // 50 + 1  # every 50 steps and the last
    assert main(["export", str(run / "sae"), "--format", "saelens", "--out", str(tmp_path / "lens")]) == 0
    assert (tmp_path / "lens" / "sae_weights.safetensors").is_file()
    assert main(["train", str(small), "--hookpoint", "nope", "--arch", "relu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hookpoint 'nope' is not in") and err.count("\n") == 1


def test_train_config_round_trips_and_validates(tmp_path):
    cfg = _cfg("a.h5", tmp_path, seq_range=[0, 10])
    assert cfg.seq_range == (0, 10)
    again = TrainConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg
    for bad, match in [({"arch": "sparse"}, "arch 'sparse'"), ({"out": ""}, "--out"),
                       ({"batch_size": 0}, "batch_size=0"), ({"lr_decay_fraction": 2.0}, "lr_decay_fraction"),
                       ({"seq_range": (5, 2)}, "seq_range"), ({"logger": "mlflow"}, "logger='mlflow'")]:
        with pytest.raises(SAEToolkitError, match=match):
            dataclasses.replace(cfg, **bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_keeps_fp32_master_weights(small, tmp_path):
    trainer = Trainer(_cfg(small, tmp_path / "run", device="cuda", tokens=128 * 10))
    run = trainer.fit()
    assert trainer.sae.W_enc.dtype == torch.float32
    assert next(iter(trainer.opt.state.values()))["exp_avg"].dtype == torch.float32
    assert read_metrics(run)[-1]["fvu"] < read_metrics(run)[0]["fvu"]


def test_missing_optional_logger_is_a_clear_error(small, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if it were not installed
    with pytest.raises(SAEToolkitError, match=r"needs wandb: pip install 'sae-toolkit\[wandb\]'"):
        train_sae(_cfg(small, tmp_path / "run", logger="wandb", tokens=128 * 2))


def test_logged_metrics_follow_the_design_formulas(small, tmp_path):
    trainer = Trainer(_cfg(small, tmp_path / "run", arch="relu"))
    try:
        x = trainer.store.next_batch()
        out = trainer.train_one(x)
        trainer.step += 1
        trainer.log(x, out)
    finally:
        trainer.store.close()
    row = read_metrics(tmp_path / "run")[-1]
    err = (x - out.x_hat).pow(2).sum().item()
    assert row["fvu"] == pytest.approx(err / (x - x.mean(0)).pow(2).sum().item(), rel=1e-5)
    assert row["mse"] == pytest.approx(err / x.numel(), rel=1e-5)
    assert row["l0"] == pytest.approx(out.l0.item()) and row["dead_fraction"] == 0.0
    assert row["lr"] == trainer.opt.param_groups[0]["lr"] and row["sparsity_scale"] == pytest.approx(1 / 2)
    assert row["loss"] == pytest.approx(row["loss_mse"] + row["loss_l1"], rel=1e-6)
    assert (row["step"], row["tokens"]) == (1, 128)
