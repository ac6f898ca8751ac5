"""ReLU SAEs with an L1 penalty (Anthropic 2023), optionally the April-2024 decoder-norm-weighted variant."""

from __future__ import annotations

from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE, TrainOutput
from sae_toolkit.sae.registry import register


@register
class ReLUSAE(SAE):
    """f = ReLU(W_encᵀ(x − b_dec) + b_enc),  x̂ = W_decᵀ f + b_dec.

    Loss  ‖x − x̂‖² + λ Σᵢ fᵢ  with unit-norm decoder rows (Towards Monosemanticity), or, with
    cfg.decoder_norm_penalty, ‖x − x̂‖² + λ Σᵢ fᵢ‖W_dec,i‖ and unconstrained decoder norms (Anthropic April 2024).
    """

    archs = ("relu",)

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae] ReLU of the pre-activations."""
        return self.pre_acts(x).relu()

    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one batch x [batch, d_in]; parts {"mse", "l1"}. dead_mask is unused (resampling is the
        trainer's); λ is multiplied by sparsity_scale. MSE = mean over the batch of ‖x − x̂‖² summed over d_in."""
        if x.ndim != 2:
            raise SAEToolkitError(f"training_loss takes a [batch, d_in] batch, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        y = self._target(x, target)
        f = self.encode(x)  # [batch, d_sae]
        x_hat = self.decode(f) + self.skip_out(x) if self.cfg.skip else self.decode(f)
        weights = self.W_dec.norm(dim=-1) if self.cfg.decoder_norm_penalty else None  # [d_sae]
        l1 = self._row_sum(f * weights if weights is not None else f).mean()
        parts = {"mse": self._mse(y, x_hat), "l1": self.cfg.l1_coefficient * sparsity_scale * l1}
        active = f.detach() > 0
        return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)
