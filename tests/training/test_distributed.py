"""torchrun with 2 gloo processes on CPU: same SAE as one process on the same global batches; a killed rank resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _sae_helpers import cfg_for
from _torchrun_helpers import assert_process_group_ended, torchrun_env
from _trainer_helpers import toy_superposition, write_acts

from sae_toolkit.activations.stream import StreamConfig
from sae_toolkit.sae import SAE, kernels, make_sae
from sae_toolkit.training.config import TrainConfig
from sae_toolkit.training.distributed import DistContext, TrainingLoss
from sae_toolkit.training.sweep import sweep_configs, train_sweep

# Kills rank 1 at step 7 (after the step-6 checkpoint; checkpoints every 3 steps), as a crashed GPU would.
# Each rank also records, at its first step, what its step runs through (ddp.<rank>.json).
LAUNCHER = """
import json, os, sys
from torch.nn.parallel import DistributedDataParallel
from sae_toolkit.training import config, distributed
post = config.TrainConfig.__post_init__
def patched_post(self):
    post(self)
    self.checkpoint_every = 3
config.TrainConfig.__post_init__ = patched_post
train_one = distributed.DistributedTrainer.train_one
def dying_train_one(self, x):
    if self.ctx.rank == 1 and self.step == 7:
        os._exit(3)
    if self.step == 0:
        with open(f"ddp.{self.ctx.rank}.json", "w") as f:
            json.dump({"ddp": isinstance(self.ddp, DistributedDataParallel),
                       "step_calls_ddp": self._loss_fn is self.ddp, "wraps_this_sae": self.ddp.module.sae is self.sae,
                       "optimizer_hooks": len(self.opt._optimizer_step_pre_hooks)}, f)
    return train_one(self, x)
distributed.DistributedTrainer.train_one = dying_train_one
from sae_toolkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


# Each rank writes a digest of its final SAE and Adam state (digest.<rank>.json): the ranks must agree bit for bit.
DIGEST_LAUNCHER = """
import hashlib, json, sys
from sae_toolkit.training import distributed
save_sae = distributed.DistributedTrainer.save_sae
def digest(t):
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
def save_with_digest(self):
    state = {**{k: digest(v) for k, v in self.sae.state_dict().items()},
             **{f"adam.{i}.{k}": digest(v) for i, s in enumerate(self.opt.state.values()) for k, v in s.items()}}
    with open(f"digest.{self.ctx.rank}.json", "w") as f:
        json.dump(state, f)
    return save_sae(self)
distributed.DistributedTrainer.save_sae = save_with_digest
from sae_toolkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = torchrun_env(cwd, SAE_TOOLKIT_FP32_SUMS="1")  # as `_fp32_sums` below, in the ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _fp32_sums(monkeypatch):
    """DDP against one process in float32 throughout: the bf16 sums (AuxK's dead block, JumpReLU's band) round
    values that reductions produced, which does not commute with splitting the batch (kernels.LOW_PRECISION_SUMS)."""
    monkeypatch.setattr(kernels, "LOW_PRECISION_SUMS", False)


@pytest.fixture
def toy_acts(tmp_path: Path) -> Path:
    acts, _ = toy_superposition(48 * 64, d=16, n_true=64, seed=3)
    return write_acts(tmp_path / "acts.h5", {"hp": acts}, context_size=64, bos_token_id=None)


def test_killed_rank_resumes_to_the_one_process_sae(tmp_path: Path, toy_acts: Path) -> None:
    common = ["--hookpoint", "hp", "--arch", "topk", "--k", "4", "--expansion", "4", "--batch-size", "256",
              "--tokens", str(12 * 256), "--device", "cpu", "--out", str(tmp_path / "ddp")]
    (tmp_path / "launch.py").write_text(LAUNCHER)
    killed = torchrun(["launch.py", "train", str(toy_acts), *common], tmp_path)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000006").is_dir(), killed.stderr[-3000:]
    for rank in (0, 1):  # the step runs through DDP, and nothing else averages the gradients
        used = json.loads((tmp_path / f"ddp.{rank}.json").read_text())
        assert used == {"ddp": True, "step_calls_ddp": True, "wraps_this_sae": True, "optimizer_hooks": 0}, used
    assert not (tmp_path / "ddp" / "sae").exists()

    resumed = torchrun(["-m", "sae_toolkit", "train", str(toy_acts), *common, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "from step 6" in resumed.stdout
    assert_process_group_ended(tmp_path)  # the DDP-wrapped run (no model loaded) leaves nothing running either

    # One process holding both ranks' data parts sees the same global batches.
    cfg = TrainConfig(acts=str(toy_acts), hookpoint="hp", arch="topk", k=4, expansion=4, batch_size=256,
                      tokens=12 * 256, device="cpu", out=str(tmp_path / "one"))
    train_sweep([cfg], n_parts=2)
    ddp, one = SAE.load(tmp_path / "ddp" / "sae"), SAE.load(tmp_path / "one" / "sae")
    for name, t in one.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)
    saved = json.loads((tmp_path / "ddp" / "train_config.json").read_text())
    assert saved["world_size"] == 2
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in ref] == [12]
    np.testing.assert_allclose(lines[-1]["fvu"], ref[-1]["fvu"], rtol=1e-4)


@pytest.mark.parametrize("arch,extra", [
    ("relu", {}), ("relu", {"decoder_norm_penalty": True}), ("topk", {}), ("topk", {"multi_topk": True}),
    ("batchtopk", {}), ("jumprelu", {}), ("jumprelu", {"jumprelu_loss": "step"}), ("gated", {}),
    ("matryoshka", {"matryoshka_groups": [16, 32]})])
def test_every_parameter_gets_a_gradient_on_every_batch(arch: str, extra: dict) -> None:
    """wrap_ddp's find_unused_parameters=False holds: a parameter without a gradient would hang DDP's reducer."""
    for dead in (torch.zeros(48, dtype=torch.bool), torch.arange(48) < 10):  # AuxK off / on
        for x in (torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(32, 8)):
            sae = make_sae(cfg_for(arch, dtype="float32", **extra))
            out = TrainingLoss(sae)(x, dead_mask=dead, sparsity_scale=0.5)
            ref = sae.training_loss(x, dead_mask=dead, sparsity_scale=0.5)
            torch.testing.assert_close(out.loss, ref.loss)
            out.loss.backward()
            assert [n for n, p in sae.named_parameters() if p.grad is None] == [], (arch, extra, dead.any(), x.any())


def test_clipping_applies_to_the_averaged_gradient(tmp_path: Path, toy_acts: Path) -> None:
    """relu with --decoder-norm-penalty clips the gradient norm at 1: on the global batch's (averaged) gradient,
    as one process does, not on each rank's half. The two ranks end bit-identical (weights and Adam state)."""
    args = ["--hookpoint", "hp", "--arch", "relu", "--decoder-norm-penalty", "--expansion", "4", "--batch-size",
            "256", "--tokens", str(6 * 256), "--device", "cpu"]
    (tmp_path / "digest.py").write_text(DIGEST_LAUNCHER)
    run = torchrun(["digest.py", "train", str(toy_acts), *args, "--out", str(tmp_path / "ddp")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_process_group_ended(tmp_path)
    ranks = [json.loads((tmp_path / f"digest.{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == 4 * 4 and ranks[0] == ranks[1]  # W_enc, b_enc, W_dec, b_dec; Adam step, exp_avg(_sq)
    cfg = TrainConfig(acts=str(toy_acts), hookpoint="hp", arch="relu", decoder_norm_penalty=True, expansion=4,
                      batch_size=256, tokens=6 * 256, device="cpu", out=str(tmp_path / "one"))
    assert cfg.max_grad_norm == 1.0
    train_sweep([cfg], n_parts=2)
    ddp, one = SAE.load(tmp_path / "ddp" / "sae"), SAE.load(tmp_path / "one" / "sae")
    for name, t in one.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)


def test_one_process_context_is_the_identity() -> None:
    ctx = DistContext()
    assert ctx.sum_float(2.5) == 2.5 and ctx.all_gather_object({"a": 1}) == [{"a": 1}]
    x = torch.arange(4.0)
    assert ctx.mean_(x.clone()).equal(x) and ctx.all_gather_rows(x).equal(x)


def test_torchrun_from_the_model_equals_one_process_with_both_parts(tmp_path: Path) -> None:
    args = ["--hookpoint", "mlp_out.1", "--hookpoint", "resid_post.0", "--arch", "topk", "--k", "4",
            "--expansion", "2", "--context-size", "32", "--batch-size", "124", "--tokens", "1240",
            "--buffer-tokens", "1k", "--device", "cpu"]
    run = torchrun(["-m", "sae_toolkit", "train", "--model", "tiny-llama", "--dataset", "builtin:pydoc", *args,
                    "--out", str(tmp_path / "ddp")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "shuffle buffer 1,024 tokens" in run.stdout
    # Loading the model imports torch.distributed.nn, which pinned the group past destroy_process_group: a rank
    # then aborted at exit about once in a dozen runs. Now its threads are gone before exit.
    assert_process_group_ended(tmp_path)
    assert run.stdout.count("training topk SAE") == 2  # rank 0 names both SAEs, rank 1 is quiet

    stream = StreamConfig("tiny-llama", "builtin:pydoc", ["mlp_out.1", "resid_post.0"], context_size=32,
                          buffer_tokens=1000)
    base = TrainConfig(acts="", hookpoint="mlp_out.1", arch="topk", k=4, expansion=2, batch_size=124, tokens=1240,
                       device="cpu", out=str(tmp_path / "one"))
    configs = sweep_configs(base, hookpoints=["mlp_out.1", "resid_post.0"], archs=["topk"], expansions=[2], ks=[4])
    train_sweep(configs, stream=stream, n_parts=2)
    for member in ("mlp_out.1", "resid_post.0"):
        ddp, one = SAE.load(tmp_path / "ddp" / member / "sae"), SAE.load(tmp_path / "one" / member / "sae")
        for name, t in one.state_dict().items():
            torch.testing.assert_close(ddp.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=f"{member} {name}")
        saved = json.loads((tmp_path / "ddp" / member / "train_config.json").read_text())
        assert saved["world_size"] == 2 and saved["source"]["model"] == "tiny-llama"


def test_distribute_modules_puts_each_hookpoint_on_its_own_rank(tmp_path: Path) -> None:
    a, _ = toy_superposition(32 * 64, d=16, n_true=64, seed=3)
    b, _ = toy_superposition(32 * 64, d=8, n_true=32, seed=4)
    acts = write_acts(tmp_path / "two.h5", {"a": a, "b": b}, context_size=64, bos_token_id=None)
    args = ["--arch", "topk", "--k", "4", "--expansion", "4", "--batch-size", "256", "--tokens", str(8 * 256),
            "--device", "cpu"]
    run = torchrun(["-m", "sae_toolkit", "train", str(acts), "--hookpoint", "a", "--hookpoint", "b", *args,
                    "--distribute-modules", "--out", str(tmp_path / "ddp")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on b → " in run.stdout and "(rank 1)" in run.stdout
    assert "on a → " in run.stdout and "(rank 0)" in run.stdout  # each rank names the SAE it owns
    assert_process_group_ended(tmp_path)

    base = TrainConfig(acts=str(acts), hookpoint="a", arch="topk", k=4, expansion=4, batch_size=256,
                       tokens=8 * 256, device="cpu", out=str(tmp_path / "one"))
    train_sweep(sweep_configs(base, hookpoints=["a", "b"], archs=["topk"], expansions=[4], ks=[4]), n_parts=2)
    # Hookpoint a lives on rank 0, which also holds the b_dec sample: the same SAE as one process.
    ddp, one = SAE.load(tmp_path / "ddp" / "a" / "sae"), SAE.load(tmp_path / "one" / "a" / "sae")
    for name, t in one.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)
    b_run = json.loads((tmp_path / "ddp" / "b" / "train_config.json").read_text())
    assert b_run["world_size"] == 2 and b_run["resolved"]["d_in"] == 8
    assert (tmp_path / "ddp" / "b" / "sae" / "sae.safetensors").is_file()
