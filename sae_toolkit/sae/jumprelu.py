"""JumpReLU SAEs (Rajamanoharan et al. 2024, "Jumping Ahead"): per-latent thresholds trained with straight-through
estimators, with Anthropic's January-2025 tanh penalty (default) or the paper's L0 penalty."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd import Function

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import kernels
from sae_toolkit.sae.base import SAE, SAEConfig, TrainOutput
from sae_toolkit.sae.registry import register


def _band(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """The rectangle kernel's support K((z − θ)/ε) = 1[|z − θ| < ε/2], as a bool [batch, d_sae] mask."""
    return (z - theta).abs_() < eps / 2


class _JumpReLU(Function):
    """z·H(z − θ); ∂/∂z = H(z − θ), pseudo-derivative ∂/∂θ = −(θ/ε)·K((z − θ)/ε) (paper eq. 11)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        open_ = z > theta
        ctx.save_for_backward(z, theta, open_)
        ctx.eps = eps
        return z * open_

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta, open_ = ctx.saved_tensors
        grad_z = g * open_
        # θ/ε is a per-latent factor: applied after the sum over tokens, on [d_sae] instead of [batch, d_sae]
        band_sum = (g * _band(z, theta, ctx.eps)).reshape(-1, theta.shape[-1]).sum(0)
        return grad_z, -(theta / ctx.eps) * band_sum, None


class _Step(Function):
    """H(z − θ); no gradient to z, pseudo-derivative ∂/∂θ = −(1/ε)·K((z − θ)/ε) (paper eq. 12)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        band_sum = (g * _band(z, theta, ctx.eps)).reshape(-1, theta.shape[-1]).sum(0)
        return None, -band_sum / ctx.eps, None


@register
class JumpReLUSAE(SAE):
    """f = JumpReLU_θ(W_encᵀx + b_enc) = π·1[π > θ] (θ > 0 per latent),  x̂ = W_decᵀ f + b_dec.

    Loss (cfg.jumprelu_loss="tanh", Anthropic "Circuits Updates – January 2025")
        ‖x − x̂‖² + λ Σᵢ tanh(c·fᵢ‖W_dec,i‖) + λ_P Σᵢ ReLU(θᵢ − πᵢ)‖W_dec,i‖,
    a smooth stand-in for L0 whose gradient reaches θ through the JumpReLU's own straight-through estimator, plus
    a pre-activation term that keeps latents from dying; or (jumprelu_loss="step", the paper) ‖x − x̂‖² + λ‖f‖₀
    with the L0's gradient through the step function's estimator. Both estimators use a rectangle kernel of
    bandwidth ε (cfg.jumprelu_bandwidth). θ is trained as log θ (kept positive) and saved both as
    `threshold` (what other tools read) and `log_threshold` (so a reload is bit-exact). x is not centred by b_dec
    unless cfg.apply_b_dec_to_input.
    """

    archs = ("jumprelu",)
    steering_lr_scales = {"log_threshold": 10.0}
    """lr factors under --target-l0 (training.trainer.param_groups): the L0 moves with λ only as fast as the
    thresholds do, and at the base rate they lagged the controller by ~100 steps on SmolLM2 activations (the run
    overshot and ended 21 % off its target; ×10: within 1 %). Without a target λ is fixed and ×10 cost MMCS on the
    issue-11 toy (0.89 → 0.82), so the base rate stays the default there."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        log_t = torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), device=device)
        self.log_threshold = nn.Parameter(log_t.to(self.W_enc.dtype))

    @property
    def threshold(self) -> Tensor:
        """[d_sae] per-latent thresholds θ = exp(log_threshold)."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae]: pre-activations where they exceed the latent's threshold, else 0."""
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one batch x [batch, d_in]; parts {"mse", "l0"} (λ·sparsity_scale·mean penalty) + "pre_act"
        with the tanh loss. dead_mask unused. MSE = mean over the batch of ‖y − x̂‖² summed over d_out, y the
        target of a transcoder, else x."""
        if x.ndim != 2:
            raise SAEToolkitError(f"training_loss takes a [batch, d_in] batch, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        y = self._target(x, target)
        cfg = self.cfg
        pre = self._pre_acts_with_grad(x)  # [batch, d_sae]
        theta, eps = self.threshold, cfg.jumprelu_bandwidth
        f = _JumpReLU.apply(pre, theta, eps)
        x_hat = kernels.adaptive_decode(f, self.W_dec) + self.b_dec
        if cfg.skip:
            x_hat = x_hat + self.skip_out(x)
        parts = {"mse": self._mse(y, x_hat)}
        if cfg.jumprelu_loss == "tanh":
            norms = self.W_dec.norm(dim=-1)  # [d_sae]; 1 while rows are kept at unit norm
            penalty = self._row_sum(torch.tanh(cfg.jumprelu_tanh_scale * f * norms)).mean()
            pre_act = self._row_sum((theta - pre).relu() * norms).mean()
            parts["l0"] = cfg.l1_coefficient * sparsity_scale * penalty
            parts["pre_act"] = cfg.jumprelu_pre_act_coefficient * pre_act
        else:
            l0 = self._row_sum(_Step.apply(pre, theta, eps)).mean()
            parts["l0"] = cfg.l1_coefficient * sparsity_scale * l0
        active = f.detach() > 0
        return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)

    def _fold_extra_(self, scale: float) -> None:
        self.log_threshold.sub_(math.log(scale))

    def state_tensors(self) -> dict[str, Tensor]:
        """W_enc, b_enc, W_dec, b_dec, threshold [d_sae] and log_threshold [d_sae]."""
        return {**super().state_tensors(), "threshold": self.threshold.detach(), "log_threshold": self.log_threshold}

    def load_state_tensors_(self, tensors: dict[str, Tensor]) -> None:
        if "log_threshold" not in tensors and "threshold" in tensors:
            # a file written by another tool: only θ is known
            tensors = {**tensors, "log_threshold": tensors["threshold"].float().clamp_min(1e-30).log()}
        tensors = {**tensors, "threshold": self.threshold.detach()}  # derived, not loaded
        super().load_state_tensors_(tensors)
