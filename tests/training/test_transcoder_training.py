"""Training transcoders: row-aligned (x, y) pairs from one file, loss/FVU on the target, the skip path learns a
linear map, normalization folded for both spaces, exact resume, cfg.json / CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _trainer_helpers import one_torch_thread, read_metrics, write_acts  # noqa: F401
from safetensors.torch import load_file

from sae_toolkit.activations.pairs import Pair, PairedActivationStore, open_store, split_batch
from sae_toolkit.cli import main
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE
from sae_toolkit.training.trainer import TrainConfig, Trainer, train_sae

D_IN, D_OUT, CTX = 16, 8, 32


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """x [4096, 16] random; y = 5·(x A) (a linear map to 8 dims, different scale) + 0.3·sparse ReLU features."""
    rng = np.random.default_rng(0)
    n = 128 * CTX
    x = rng.standard_normal((n, D_IN)).astype(np.float32)
    A = rng.standard_normal((D_IN, D_OUT)).astype(np.float32) / 4
    feats = np.maximum(x @ rng.standard_normal((D_IN, 64)).astype(np.float32) - 2.0, 0)
    y = 5 * (x @ A) + 0.3 * feats @ rng.standard_normal((64, D_OUT)).astype(np.float32)
    # rows double as their own ids: column 0 of "id_in" and "id_out" is the row index, to check alignment
    ids = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    path = write_acts(tmp_path_factory.mktemp("pairs") / "pairs.h5",
                      {"mlp_in.0": x, "mlp_out.0": y, "id_in": ids, "id_out": ids + 0.5}, context_size=CTX)
    return path, x, y, A


def _cfg(acts, out, **kw) -> TrainConfig:
    base = dict(acts=str(acts), hookpoint="mlp_in.0", target="mlp_out.0", arch="topk", n_features=64, k=4,
                batch_size=128, tokens=128 * 40, out=str(out), log_every=5, checkpoint_every=20, lr=1e-2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("in_memory", [True, False])
def test_pairs_stay_row_aligned_through_shuffle_and_bos_exclusion(pairs, in_memory):
    path = pairs[0]
    with open_store(path, "id_in", "id_out", batch_size=100, in_memory=in_memory, block_rows=64,
                    buffer_blocks=2) as store:
        assert isinstance(store, PairedActivationStore) and store.d_out == 2
        for _ in range(50):  # > one pass: epochs and buffers change
            x, y = split_batch(store.next_batch())
            assert torch.equal(y, x + 0.5)
            assert not torch.any(x[:, 0] % CTX == 0)  # BOS rows (position 0) excluded from both
        s = store.sample(300, seed=3)
        assert isinstance(s, Pair) and torch.equal(s.y, s.x + 0.5)
    with open_store(path, "mlp_in.0", batch_size=64) as plain:  # no target: the plain store, one tensor
        assert split_batch(plain.next_batch())[1] is None


def test_store_errors(pairs):
    with pytest.raises(SAEToolkitError, match="target hookpoint 'nope' is not in"):
        open_store(pairs[0], "mlp_in.0", "nope", batch_size=64)
    with pytest.raises(SAEToolkitError, match="is the --hookpoint itself"):
        open_store(pairs[0], "mlp_in.0", "mlp_in.0", batch_size=64)


def test_skip_transcoder_learns_the_linear_part_and_beats_the_plain_one(pairs, tmp_path):
    path, x, y, A = pairs
    runs = {skip: train_sae(_cfg(path, tmp_path / f"skip{skip}", skip=skip, tokens=128 * 150)) for skip in (0, 1)}
    fvu = {}
    for skip, run in runs.items():
        sae = SAE.load(run)
        assert sae.cfg.target == "mlp_out.0" and sae.cfg.d_out == D_OUT and sae.cfg.skip == bool(skip)
        pred = sae(torch.from_numpy(x)).x_hat.detach().numpy()  # raw units: both scales folded in
        fvu[skip] = float(((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        logged = read_metrics(run)[-1]["fvu"]  # the trainer's FVU is also on the target (one batch)
        assert abs(logged - fvu[skip]) < 0.15
    assert fvu[1] < 0.6 * fvu[0]  # measured: 0.10 vs 0.21
    W_skip = SAE.load(runs[1]).W_skip.detach().numpy()
    # the skip path found most of y's linear part (measured 0.86; the ReLU features carry some of it too)
    assert np.corrcoef(W_skip.ravel(), 5 * A.ravel())[0, 1] > 0.75
    cfg = json.loads((runs[1] / "sae" / "cfg.json").read_text())
    assert (cfg["hookpoint"], cfg["target"], cfg["skip"], cfg["d_in"], cfg["d_out"]) == (
        "mlp_in.0", "mlp_out.0", True, D_IN, D_OUT)
    assert load_file(runs[1] / "sae" / "sae.safetensors")["W_skip"].shape == (D_IN, D_OUT)
    assert json.loads((runs[1] / "train_config.json").read_text())["target"] == "mlp_out.0"


class _Killed(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(pairs, tmp_path, monkeypatch):
    kw = dict(skip=True, dead_window_tokens=256, in_memory=False)
    full = train_sae(_cfg(pairs[0], tmp_path / "full", **kw))
    train_one = Trainer.train_one

    def dying(self, x, y=None):
        if self.step == 27:
            raise _Killed
        return train_one(self, x, y)

    monkeypatch.setattr(Trainer, "train_one", dying)
    with pytest.raises(_Killed):
        train_sae(_cfg(pairs[0], tmp_path / "part", **kw))
    monkeypatch.setattr(Trainer, "train_one", train_one)
    resumed = train_sae(_cfg(pairs[0], tmp_path / "part", resume=True, **kw))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(read_metrics(resumed)) == strip(read_metrics(full))
    a, b = SAE.load(full), SAE.load(resumed)
    for name, t in a.state_tensors().items():
        assert torch.equal(t, b.state_tensors()[name]), name
    with pytest.raises(SAEToolkitError, match="other settings"):
        train_sae(_cfg(pairs[0], tmp_path / "part", resume=True, **{**kw, "skip": False}))


def test_config_errors():
    with pytest.raises(SAEToolkitError, match="needs a transcoder"):
        TrainConfig(acts="a.h5", hookpoint="hp", arch="topk", skip=True, out="o")
    with pytest.raises(SAEToolkitError, match="resampling is not implemented for transcoders"):
        TrainConfig(acts="a.h5", hookpoint="hp", arch="relu", target="t", resample=True, out="o")
    assert TrainConfig(acts="a.h5", hookpoint="hp", arch="relu", target="t", out="o").resample is False


def test_cli_trains_a_topk_skip_transcoder_by_default(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(pairs[0]), "--hookpoint", "mlp_in.0", "--target", "mlp_out.0", "--skip",
               "--n-features", "64", "--k", "4", "--batch-size", "128", "--tokens", "1280", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["arch"] == "topk" and cfg["target"] == "mlp_out.0" and cfg["skip"] is True
    rc = main(["train", str(pairs[0]), "--hookpoint", "mlp_in.0", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--arch is required" in capsys.readouterr().err
