"""ReLU SAEs with an L1 penalty (Anthropic 2023), optionally the April-2024 decoder-norm-weighted variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import kernels
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
        skip = self.skip_out(x) if self.cfg.skip else None
        with torch.no_grad():
            sae_in = self._sae_in(x)  # b_dec's gradient comes from the kernels as one matvec
            pre = F.linear(sae_in, self.W_enc.t(), self.b_enc)  # [batch, d_sae]
        b_dec_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        if kernels.host_syncs_ok(pre):
            mask = pre > 0
            if kernels.count_true(mask) <= kernels.SPARSE_MAX_DENSITY * pre.numel():  # a trained SAE: ~1-2 % active
                return self._sparse_training_loss(x, y, skip, sae_in, pre, mask, b_dec_in, sparsity_scale)
        # dense G here (the density check above chose this path): no second count in the backward
        f = kernels.dense_pre_acts(pre, sae_in, self.W_enc, self.b_enc, b_dec_in, adaptive=False).relu()
        x_hat = self.decode(f) if skip is None else self.decode(f) + skip
        weights = self.W_dec.norm(dim=-1) if self.cfg.decoder_norm_penalty else None  # [d_sae]
        l1 = self._row_sum(f * weights if weights is not None else f).mean()
        parts = {"mse": self._mse(y, x_hat), "l1": self.cfg.l1_coefficient * sparsity_scale * l1}
        active = f.detach() > 0
        return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)

    def _sparse_training_loss(self, x: Tensor, y: Tensor, skip: Tensor | None, sae_in: Tensor, pre: Tensor,
                              mask: Tensor, b_dec_in: Tensor | None, sparsity_scale: float) -> TrainOutput:
        """The same loss on the active (token, latent) pairs only (eager CPU, few active pairs): decode and every
        backward run through the sparse kernels at a cost ∝ active pairs instead of batch·d_sae."""
        code = kernels.positive_code(pre, mask)
        t = kernels.transposed(code, self.cfg.d_sae)
        z = kernels.sparse_pre_acts(code, sae_in, self.W_enc, self.b_enc, b_dec_in, t)  # [nnz], all > 0
        x_hat = kernels.sparse_decode(code._replace(vals=z), self.W_dec, t) + self.b_dec
        if skip is not None:
            x_hat = x_hat + skip
        weighted = z * self.W_dec.norm(dim=-1)[code.cols] if self.cfg.decoder_norm_penalty else z
        l1 = weighted.sum(dtype=torch.promote_types(z.dtype, torch.float32)) / x.shape[0]
        parts = {"mse": self._mse(y, x_hat), "l1": self.cfg.l1_coefficient * sparsity_scale * l1}
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device).index_fill_(0, code.cols, True)
        l0 = torch.tensor(code.vals.numel() / x.shape[0], device=x.device)
        return TrainOutput(sum(parts.values()), x_hat, fired, l0, parts)
