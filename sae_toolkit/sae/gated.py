"""Gated SAEs (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"), trained
with the JumpReLU tanh recipe (default) or the paper's L1 + auxiliary loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import kernels
from sae_toolkit.sae.base import SAE, SAEConfig, TrainOutput
from sae_toolkit.sae.jumprelu import _Step, start_thresholds
from sae_toolkit.sae.registry import register


@register
class GatedSAE(SAE):
    """f = 1[π_gate > 0] ⊙ ReLU(π_mag),  x̂ = W_decᵀ f + b_dec, with x̃ = x − b_dec and
    π_gate = W_encᵀx̃ + b_enc  (W_enc is the paper's W_gate, b_enc its b_gate),
    π_mag  = exp(r_mag) ⊙ (W_encᵀx̃) + b_mag  (magnitude weights tied to the gate's, rescaled per latent).

    With tied weights the gate opens where π_mag > θ = b_mag − exp(r_mag)·b_gate: a Gated SAE is a JumpReLU with
    per-latent thresholds, and by default (cfg.gated_loss="tanh") it trains like one, with the JumpReLU tanh recipe
        ‖x − x̂‖² + λ Σᵢ tanh(c·fᵢ) + λ_P Σᵢ ReLU(−π_gate,i)   (W_encᵀx̃ detached there: it trains b_gate only),
    the gate's Heaviside H(π_gate) passing a straight-through gradient to b_gate (rectangle kernel of width ε, as
    JumpReLU's threshold; c, ε, λ_P are the jumprelu_* fields; decoder rows have unit norm) and b_gate starting at
    −jumprelu_init_threshold (under --target-l0 from data, `init_thresholds_`). gated_loss="l1" is the paper's
        ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖²,
    the last term decoding with a detached copy of W_dec and b_dec so only the gate path learns from it; its L1
    trains the shared W_enc like a ReLU SAE's, which on SmolLM2 activations cost it ~0.1 EV against the tanh
    recipe. Saved extras: r_mag [d_sae], b_mag [d_sae].
    """

    archs = ("gated",)

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=self.W_enc.dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=self.W_enc.dtype))
        if cfg.gated_loss == "tanh":
            # the gate opens where W_encᵀx̃ > −b_gate: start every latent at JumpReLU's initial threshold
            self.b_enc.data.fill_(-cfg.jumprelu_init_threshold)

    @property
    def steering_lr_scales(self) -> dict[str, float]:
        """lr factors under --target-l0 (training.trainer.param_groups): with the tanh loss b_gate is the
        threshold, and learns 10× faster as JumpReLU's does (see JumpReLUSAE.steering_lr_scales)."""
        return {"b_enc": 10.0} if self.cfg.gated_loss == "tanh" else {}

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[..., d_in] → (π_gate, π_mag), each [..., d_sae]."""
        h = self._sae_in(x) @ self.W_enc
        return h + self.b_enc, h * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae]: ReLU(π_mag) where the gate is open, else 0."""
        gate, mag = self._paths(x)
        return (gate > 0) * mag.relu()

    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one batch x [batch, d_in]; parts {"mse", "l0", "pre_act"} (gated_loss="tanh") or {"mse", "l1",
        "aux"} ("l1"); λ·sparsity_scale on the sparsity term. dead_mask unused. MSE (and aux) = mean over the batch
        of ‖·‖² summed over d_in."""
        if x.ndim != 2:
            raise SAEToolkitError(f"training_loss takes a [batch, d_in] batch, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        y = self._target(x, target)
        cfg = self.cfg
        gate = self._pre_acts_with_grad(x)  # [batch, d_sae] π_gate; sparse ∂W_enc once few gates are open
        h = gate - self.b_enc  # W_encᵀx̃
        mag = h * self.r_mag.exp() + self.b_mag  # π_mag: the same W_enc product, rescaled
        skip = self.skip_out(x) if cfg.skip else 0.0  # [batch, d_out]
        if cfg.gated_loss == "tanh":
            # H(π_gate) = H(h − (−b_gate)); the step's estimator sends ∂/∂b_gate = (1/ε)·K(π_gate/ε)·∂L/∂H, and
            # ∂L/∂H = ReLU(π_mag)·∂L/∂f: JumpReLU's −(θ/ε)·K·∂L/∂f with the jump ReLU(π_mag) at the gate
            f = mag.relu() * _Step.apply(h, -self.b_enc, cfg.jumprelu_bandwidth)
            x_hat = kernels.adaptive_decode(f, self.W_dec) + self.b_dec + skip
            penalty = self._row_sum(torch.tanh(cfg.jumprelu_tanh_scale * f)).mean()
            parts = {
                "mse": self._mse(y, x_hat),
                "l0": cfg.l1_coefficient * sparsity_scale * penalty,
                # h detached: the term pulls only the gate's threshold −b_gate (as JumpReLU's pulls only θ)
                "pre_act": cfg.jumprelu_pre_act_coefficient * self._row_sum((-(h.detach() + self.b_enc)).relu()).mean(),
            }
            active = f.detach() > 0
            return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)
        f = (gate > 0) * mag.relu()
        x_hat = kernels.adaptive_decode(f, self.W_dec) + self.b_dec + skip
        gate_acts = gate.relu()
        x_hat_frozen = kernels.adaptive_decode(gate_acts, self.W_dec.detach()) + self.b_dec.detach() + (
            skip.detach() if cfg.skip else 0.0)
        parts = {
            "mse": self._mse(y, x_hat),
            "l1": cfg.l1_coefficient * sparsity_scale * self._row_sum(gate_acts).mean(),
            "aux": self._mse(y, x_hat_frozen),
        }
        active = f.detach() > 0
        return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)

    @torch.no_grad()
    def init_thresholds_(self, x: Tensor, rate: float) -> None:
        """gated_loss="tanh": set b_gate from the sample x [n, d_in] so that every gate starts open on ~rate of the
        rows (`jumprelu.start_thresholds` of W_encᵀx̃, as JumpReLUSAE.init_thresholds_). No-op for "l1"."""
        if self.cfg.gated_loss == "tanh":
            self.b_enc.copy_(-start_thresholds(self._sae_in(x), self.W_enc, None, rate))

    def _fold_extra_(self, scale: float) -> None:
        self.b_mag.div_(scale)

    def state_tensors(self) -> dict[str, Tensor]:
        """W_enc (= W_gate), b_enc (= b_gate), W_dec, b_dec, r_mag, b_mag."""
        return {**super().state_tensors(), "r_mag": self.r_mag, "b_mag": self.b_mag}
