"""torch.compile(fullgraph=True) of every arch's training loss + backward, and `train --compile`.

The graph is captured with the "aot_eager" backend: TorchDynamo with fullgraph=True turns any graph break (a host
sync such as `.item()`/`nonzero()`, a data-dependent branch) into an error, and AOT autograd traces forward and
backward jointly on fake tensors (a data-dependent shape is an error there). Inductor would only add code
generation on top — minutes of C++ compilation on this CPU — so `train --compile` uses inductor and the tests
swap in aot_eager (trainer.COMPILE_BACKEND).
"""

from __future__ import annotations

import pytest
import torch
from _sae_helpers import D_SAE, grads_of, randomized
from _trainer_helpers import one_torch_thread, read_metrics, toy_file  # noqa: F401

from sae_toolkit.cli import main
from sae_toolkit.sae import kernels
from sae_toolkit.training import trainer
from sae_toolkit.training.trainer import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "gated"])
def test_training_loss_and_backward_compile_as_one_graph(arch, monkeypatch):
    # the eager reference in float32 throughout (its bf16 sums are checked against it in test_cpu_fast_paths.py)
    monkeypatch.setattr(kernels, "LOW_PRECISION_SUMS", False)
    sae = randomized(arch, seed=11, dtype="float32").train()
    x = torch.randn(16, sae.cfg.d_in)
    dead = torch.arange(D_SAE) % 3 == 0  # AuxK on for topk/batchtopk
    scale = torch.tensor(0.5)
    compiled = torch.compile(sae.training_loss, fullgraph=True, dynamic=False, backend="aot_eager")
    threshold = sae.threshold.clone() if arch == "batchtopk" else None
    got = compiled(x, dead_mask=dead, sparsity_scale=scale)
    if arch == "batchtopk":  # the buffer update inside the graph happened once; replay eager from the same state
        got_threshold = sae.threshold.clone()
        sae.threshold.copy_(threshold)
    want = sae.training_loss(x, dead_mask=dead, sparsity_scale=0.5)  # eager CPU: the compact AuxK path
    if arch == "batchtopk":
        torch.testing.assert_close(got_threshold, sae.threshold)
    assert set(got.parts) == set(want.parts)
    if arch in ("topk", "batchtopk"):
        assert want.parts["auxk"] > 0
    for name in want.parts:
        torch.testing.assert_close(got.parts[name], want.parts[name], msg=f"{arch} loss part {name}")
    torch.testing.assert_close(got.x_hat, want.x_hat)
    assert torch.equal(got.fired, want.fired)
    g_got, g_want = grads_of(sae, got.loss), grads_of(sae, want.loss)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-4, atol=1e-5, msg=f"{arch} grad {name}")
    # a second batch with no dead latents reuses the graph (static shapes) and gives auxk = 0 without a branch
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled(torch.randn(16, sae.cfg.d_in), dead_mask=torch.zeros_like(dead), sparsity_scale=scale)
    if arch in ("topk", "batchtopk"):
        assert again.parts["auxk"] == 0


def test_train_compile_flag_runs_the_compiled_step(tmp_path, monkeypatch):
    path, _ = toy_file(tmp_path / "toy.h5", n_rows=32 * 64, context_size=32)
    monkeypatch.setattr(trainer, "COMPILE_BACKEND", "aot_eager")
    calls = []
    real_compile = torch.compile

    def spy(fn, **kw):
        calls.append(kw)
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    rc = main(["train", str(path), "--hookpoint", "hp", "--arch", "topk", "--k", "4", "--expansion", "4",
               "--tokens", "1280", "--batch-size", "128", "--out", str(tmp_path / "run"), "--compile"])
    assert rc == 0
    assert calls == [{"fullgraph": True, "dynamic": False, "backend": "aot_eager"}]
    rows = read_metrics(tmp_path / "run")
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # same seed without --compile: the same run up to float rounding
    monkeypatch.setattr(torch, "compile", real_compile)
    cfg = TrainConfig(acts=str(path), hookpoint="hp", arch="topk", k=4, expansion=4, tokens=1280, batch_size=128,
                      out=str(tmp_path / "eager"))
    t = Trainer(cfg)
    assert t._loss_fn is None
    t.fit()
    eager = read_metrics(tmp_path / "eager")
    assert [r["step"] for r in eager] == [r["step"] for r in rows]
    for a, b in zip(rows, eager):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_batchtopk_ramp_compiles_once_for_every_share():
    """The per-token → batch-wide ramp moves `per_token_share` every step; it is a tensor, so the compiled loss
    keeps one graph for the whole ramp (a Python float would recompile at every new value)."""
    sae = randomized("batchtopk", seed=5, dtype="float32").train()
    sae.per_token_share = 0.75
    compiled = torch.compile(sae.training_loss, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(16, sae.cfg.d_in)
    compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for share in (0.5, 0.1):
            sae.per_token_share = share
            got = compiled(x)
            want = sae.training_loss(x)
            torch.testing.assert_close(got.parts["mse"], want.parts["mse"])
            torch.testing.assert_close(got.x_hat, want.x_hat)
