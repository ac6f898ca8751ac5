"""The trainer's optimizer (`training.step.Adam`) on W_enc's latent-major layout."""

from __future__ import annotations

import pytest
import torch

from sae_toolkit.sae import SAEConfig, make_sae
from sae_toolkit.training.step import Adam, make_optimizer, train_step


def _reference_step(sae, x, steps):
    """The same updates with torch's Adam on contiguous copies of every parameter."""
    ref = make_sae(sae.cfg)
    with torch.no_grad():
        for p, q in zip(sae.parameters(), ref.parameters(), strict=True):
            q.data = p.detach().contiguous().clone()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    for _ in range(steps):
        train_step(ref, opt, x)
    return ref


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_adam_updates_latent_major_w_enc_as_torch_updates_a_contiguous_copy(arch, monkeypatch):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, d_in=16, d_sae=64, k=4 if arch == "topk" else None)).train()
    assert not sae.W_enc.is_contiguous() and sae.W_enc.t().is_contiguous()  # latent-major
    x = torch.randn(32, 16)
    ref = _reference_step(sae, x, 3)
    seen = []
    fused = torch._fused_adam_

    def spy(params, grads, exp_avgs, exp_avg_sqs, *args, **kw):
        seen.extend(t.is_contiguous() for t in (*params, *grads, *exp_avgs, *exp_avg_sqs))
        return fused(params, grads, exp_avgs, exp_avg_sqs, *args, **kw)

    monkeypatch.setattr(torch, "_fused_adam_", spy)
    opt = make_optimizer(sae, 1e-2)
    assert isinstance(opt, Adam) and opt.defaults["fused"]
    for _ in range(3):
        train_step(sae, opt, x)
    assert seen and all(seen)  # the kernel got W_enc, its gradient and moments as contiguous transposes
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert sae.W_enc.t().is_contiguous() and opt.state[sae.W_enc]["exp_avg"].stride() == sae.W_enc.stride()


def test_adam_relays_a_moment_loaded_in_another_layout():
    """A moment of latent-major W_enc put back contiguous (as a file holds it) is copied into W_enc's layout before
    the step: walked as flat memory next to W_enc it would update the wrong elements."""
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=16, d_sae=64, k=4)).train()
    x = torch.randn(32, 16)
    ref = _reference_step(sae, x, 2)
    opt = make_optimizer(sae, 1e-2)
    train_step(sae, opt, x)
    state = opt.state[sae.W_enc]
    state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].contiguous(), state["exp_avg_sq"].contiguous()
    assert state["exp_avg"].stride() != sae.W_enc.stride()
    train_step(sae, opt, x)
    torch.testing.assert_close(sae.W_enc, ref.W_enc, rtol=1e-5, atol=1e-6)
    assert opt.state[sae.W_enc]["exp_avg"].stride() == sae.W_enc.stride()
