"""Sweeps: several SAEs on the same batches (one read of the data), from a cache or straight from the model."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
from _trainer_helpers import one_torch_thread, toy_file  # noqa: F401  (fixture)

from sae_toolkit.activations.cacher import cache_activations
from sae_toolkit.activations.config import CacheConfig
from sae_toolkit.activations.stream import ModelStream, StreamConfig
from sae_toolkit.cli import main
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import MARKER
from sae_toolkit.sae import SAE
from sae_toolkit.training import sources
from sae_toolkit.training.config import TrainConfig
from sae_toolkit.training.distributed import DistributedTrainer
from sae_toolkit.training.sweep import sweep_configs, train_sweep
from sae_toolkit.training.trainer import train_sae


def heldout_fvu(sae_dir: Path, x: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = SAE.load(sae_dir)(x).x_hat
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def test_from_the_model_as_good_as_the_cached_path(tmp_path: Path) -> None:
    """Same model, corpus and token count: held-out FVU within 5% of training on the cache."""
    ctx, n_train, n_held, batch = 32, 320, 40, 256
    cache_activations(CacheConfig(model="tiny-llama", hookpoints=["mlp_out.1"], dataset="builtin:pydoc",
                                  tokens=(n_train + n_held) * ctx, context_size=ctx, dtype="float32", device="cpu",
                                  out=str(tmp_path / "a.h5")))
    tokens = n_train * (ctx - 1) // batch * batch  # the stream's first rows are the cache's first windows
    common = dict(hookpoint="mlp_out.1", arch="topk", k=8, batch_size=batch, tokens=tokens, device="cpu")
    train_sae(TrainConfig(acts=str(tmp_path / "a.h5"), seq_range=(0, n_train), out=str(tmp_path / "cached"),
                          **common))
    train_sweep([TrainConfig(acts="", out=str(tmp_path / "model"), **common)],
                stream=StreamConfig("tiny-llama", "builtin:pydoc", ["mlp_out.1"], context_size=ctx))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        keep = torch.from_numpy(f["tokens"][n_train:].reshape(-1) != 0)
        held = torch.from_numpy(f["acts/mlp_out.1"][n_train * ctx:])[keep]
    cached, model = heldout_fvu(tmp_path / "cached" / "sae", held), heldout_fvu(tmp_path / "model" / "sae", held)
    assert cached < 0.6 and abs(model - cached) < 0.05 * cached, (model, cached)
    run = tmp_path / "model"
    assert {p.name for p in run.iterdir()} == {"sae", "checkpoints", "metrics.jsonl", "train_config.json", MARKER}
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["source"]["model"] == "tiny-llama" and saved["world_size"] == 1
    assert saved["resolved"]["total_tokens"] == tokens


def test_sweep_reads_once_and_each_member_equals_its_solo_run(tmp_path: Path, monkeypatch) -> None:
    path, _ = toy_file(tmp_path / "toy.h5", n_rows=64 * 64)
    base = TrainConfig(acts=str(path), hookpoint="hp", arch="topk", batch_size=256, tokens=256 * 10, device="cpu",
                       out=str(tmp_path / "sweep"))
    configs = sweep_configs(base, hookpoints=["hp"], archs=["topk"], expansions=[4], ks=[4, 8, 16])
    assert [Path(c.out).name for c in configs] == ["k4", "k8", "k16"]
    reads = []
    original = sources.StoreSet.next_batches
    monkeypatch.setattr(sources.StoreSet, "next_batches", lambda self: reads.append(1) or original(self))
    train_sweep(configs)
    assert len(reads) == 10  # one read per step for all three SAEs
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert manifest["members"] == ["k4", "k8", "k16"]
    solo = sweep_configs(base, hookpoints=["hp"], archs=["topk"], expansions=[4], ks=[8])[0]
    train_sweep([TrainConfig.from_dict({**solo.to_dict(), "out": str(tmp_path / "solo")})])
    a, b = SAE.load(tmp_path / "sweep" / "k8" / "sae"), SAE.load(tmp_path / "solo" / "sae")
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert SAE.load(tmp_path / "sweep" / "k16" / "sae").cfg.k == 16


def test_sweep_from_the_model_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    stream = StreamConfig("tiny-llama", "builtin:pydoc", ["mlp_out.1", "resid_post.0"], context_size=32,
                          buffer_tokens=32 * 16)
    base = TrainConfig(acts="", hookpoint="mlp_out.1", arch="topk", k=4, expansion=2, batch_size=124,
                       tokens=124 * 12, device="cpu", checkpoint_every=4, out=str(tmp_path / "full"))
    grid = dict(hookpoints=["mlp_out.1", "resid_post.0"], archs=["topk", "batchtopk"], expansions=[2], ks=[4])
    train_sweep(sweep_configs(base, **grid), stream=stream)

    cut = TrainConfig.from_dict({**base.to_dict(), "out": str(tmp_path / "cut")})
    original = DistributedTrainer.train_one

    def dying(self, x):
        if self.step == 6 and self.cfg.arch == "batchtopk" and self.cfg.hookpoint == "resid_post.0":
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(DistributedTrainer, "train_one", dying)
    with pytest.raises(KeyboardInterrupt):
        train_sweep(sweep_configs(cut, **grid), stream=stream)
    monkeypatch.setattr(DistributedTrainer, "train_one", original)
    resumed = TrainConfig.from_dict({**cut.to_dict(), "resume": True})
    forwards = []
    forward = ModelStream._forward
    monkeypatch.setattr(ModelStream, "_forward", lambda self, *a: forwards.append(1) or forward(self, *a))
    train_sweep(sweep_configs(resumed, **grid), stream=stream)
    members = json.loads((tmp_path / "full" / "sweep.json").read_text())["members"]
    assert len(members) == 4 and members[0] == "mlp_out.1-topk"
    for m in members:
        a, b = SAE.load(tmp_path / "full" / m / "sae"), SAE.load(tmp_path / "cut" / m / "sae")
        for name, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[name]), (m, name)
    # 1488 rows = 3 buffers of 16 windows; the resume at row 496 (step 4) reruns the first buffer (pool, scale)
    # and then buffers 2-3 only.
    assert len(forwards) == 3


def test_cli_sweep_from_the_model_and_bad_sources(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--dataset", "builtin:pydoc", "--hookpoint", "mlp_out.1",
                 "--arch", "topk", "--k", "4,8", "--expansion", "2", "--tokens", "1240", "--batch-size", "124",
                 "--context-size", "32", "--buffer-tokens", "2k", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shuffle buffer 2,016 tokens" in printed and "2 runs: k4, k8" in printed
    assert (out / "k4" / "sae" / "sae.safetensors").is_file() and (out / "k8" / "metrics.jsonl").is_file()
    assert main(["train", "--hookpoint", "hp", "--arch", "topk", "--out", str(tmp_path / "x")]) == 2
    assert "pass an .h5 file, or --model SPEC --dataset SPEC" in capsys.readouterr().err
    assert main(["train", "a.h5", "--model", "tiny-llama", "--dataset", "d", "--hookpoint", "hp", "--arch", "topk",
                 "--out", str(tmp_path / "y")]) == 2
    assert "give one source" in capsys.readouterr().err
    assert main(["train", "--model", "tiny-llama", "--dataset", "builtin:pydoc", "--hookpoint", "mlp_out.1",
                 "--arch", "topk", "--out", str(tmp_path / "z")]) == 2
    assert "needs --tokens" in capsys.readouterr().err


def test_members_must_share_the_batches(tmp_path: Path) -> None:
    a = TrainConfig(acts="a.h5", hookpoint="hp", arch="topk", out=str(tmp_path / "a"))
    b = TrainConfig(acts="a.h5", hookpoint="hp", arch="topk", batch_size=128, out=str(tmp_path / "b"))
    with pytest.raises(SAEToolkitError, match="differ in batch_size"):
        train_sweep([a, b])
