"""Matryoshka BatchTopK SAEs (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders")."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAEConfig, TrainOutput
from sae_toolkit.sae.kernels import sparse_decode
from sae_toolkit.sae.registry import register
from sae_toolkit.sae.topk import BatchTopKSAE


@register
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose latents come in nested groups (cfg.matryoshka_groups): with f the BatchTopK code and
    x̂ₘ = Σ_{i < m} fᵢ W_dec,i + b_dec the reconstruction from the first m latents, the loss is

        Σ_{m ∈ prefix ends} ‖x − x̂ₘ‖²  +  α‖e − ê‖² (AuxK, as TopK).

    Every prefix must reconstruct x on its own, so early latents learn general features and later ones refine
    them instead of absorbing them. Inference is plain BatchTopK (one threshold θ), so the saved SAE is a
    BatchTopK SAE with its latents ordered from general to specific.
    """

    archs = ("matryoshka",)

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        ends = list(itertools.accumulate(cfg.matryoshka_groups))
        self.register_buffer("group_ends", torch.tensor(ends, device=device), persistent=False)

    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one batch x [batch, d_in]; parts {"mse" (the full dictionary), "mse_prefixes" (the smaller
        prefixes, summed), "auxk"}. sparsity_scale is ignored (k fixes the sparsity). A transcoder's prefixes
        predict `target` [batch, d_out] (plus the skip path with cfg.skip)."""
        if x.ndim != 2:
            raise SAEToolkitError(f"training_loss takes a [batch, d_in] batch, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        y = self._target(x, target)  # what every prefix's x̂ is compared with
        skip = self.skip_out(x) if self.cfg.skip else None  # [batch, d_out]
        with torch.no_grad():
            sae_in = self._sae_in(x)  # [batch, d_in]
            pre = F.linear(sae_in, self.W_enc.t(), self.b_enc)  # [batch, d_sae], only to choose entries
        code = self._select(pre)
        z = self._sparse_pre_acts(code, sae_in).relu()  # [nnz]
        main = code._replace(vals=z)
        group = torch.bucketize(code.cols, self.group_ends, right=True)  # [nnz] group of each entry
        x_hat = self.b_dec.expand_as(y) if skip is None else self.b_dec + skip
        prefix_losses = []
        for g in range(len(self.cfg.matryoshka_groups)):
            x_hat = x_hat + sparse_decode(main._replace(vals=z * (group == g)), self.W_dec)  # first g+1 groups
            prefix_losses.append(self._mse(y, x_hat))
        parts = {"mse": prefix_losses[-1], "mse_prefixes": sum(prefix_losses[:-1], x_hat.new_zeros(())),
                 "auxk": self._auxk_loss(y, x_hat, sae_in, pre, dead_mask)}
        self._after_batch(main)
        active = (z.detach() > 0).float()  # [nnz]
        fired = active.new_zeros(self.cfg.d_sae).scatter_reduce_(0, main.cols, active, "amax") > 0
        return TrainOutput(sum(parts.values()), x_hat, fired, active.sum() / x.shape[0], parts)
