"""Dense reference implementations of the SAE losses (the formulas written out, no sparse kernels) and SAE builders."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_toolkit.sae import SAE, SAEConfig, make_sae

D_IN, D_SAE, K = 8, 48, 4


def cfg_for(arch: str, **kw) -> SAEConfig:
    """A tiny config of `arch` (k given where the arch needs it)."""
    base = {"arch": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float64"}
    if arch in ("topk", "batchtopk", "matryoshka"):
        base["k"] = K
    return SAEConfig(**{**base, **kw})


def randomized(arch: str, seed: int = 0, **kw) -> SAE:
    """A tiny SAE of `arch` with every parameter (biases, thresholds, gated extras) randomised, float64."""
    torch.manual_seed(seed)
    sae = make_sae(cfg_for(arch, **kw))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name in ("W_enc", "W_dec"):
                continue
            p.copy_(0.3 * torch.randn_like(p))
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.log(torch.rand(sae.cfg.d_sae, dtype=torch.float64) * 0.5 + 0.05))
    return sae


def pre_acts_ref(sae: SAE, x: Tensor) -> Tensor:
    sae_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    return sae_in @ sae.W_enc + sae.b_enc


def mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).sum(-1).mean()


def topk_dense(pre: Tensor, k: int) -> Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def batch_topk_dense(pre: Tensor, k: int) -> Tensor:
    flat = pre.reshape(-1)
    _, idx = flat.topk(k * pre.shape[0])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    return pre.relu() * mask.view_as(pre)


def auxk_dense(sae: SAE, pre: Tensor, x: Tensor, x_hat: Tensor, dead_mask: Tensor) -> Tensor:
    """α‖e − W_decᵀ z_aux‖², z_aux = ReLU(top k_aux of the dead latents' pre-activations), e detached."""
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead_mask, float("-inf"))
    vals, idx = masked.topk(min(sae.cfg.k_aux, n_dead), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return sae.cfg.aux_coefficient * mse((x - x_hat).detach(), z @ sae.W_dec)


def topk_loss_ref(sae: SAE, x: Tensor, dead_mask: Tensor | None) -> dict[str, Tensor]:
    """Dense TopK / BatchTopK / Multi-TopK loss parts, as in Gao et al. 2024 and Bussmann et al. 2024."""
    pre = pre_acts_ref(sae, x)
    if sae.cfg.arch == "batchtopk":
        f = batch_topk_dense(pre, sae.cfg.k)
    else:
        f = topk_dense(pre, sae.cfg.k)
    x_hat = f @ sae.W_dec + sae.b_dec
    parts = {"mse": mse(x, x_hat)}
    if sae.cfg.multi_topk:
        f4 = topk_dense(pre, 4 * sae.cfg.k)
        parts["mse_4k"] = mse(x, f4 @ sae.W_dec + sae.b_dec) / 8
    parts["auxk"] = auxk_dense(sae, pre, x, x_hat, dead_mask) if dead_mask is not None else pre.new_zeros(())
    return parts


def grads_of(sae: SAE, loss: Tensor) -> dict[str, Tensor]:
    """Gradients of loss w.r.t. every parameter (zeros where it does not reach)."""
    params = dict(sae.named_parameters())
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), gs)}
