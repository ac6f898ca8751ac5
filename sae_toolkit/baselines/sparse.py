"""The seed's small sparse autoencoder: one ReLU layer with an L1 penalty on its activations."""

from __future__ import annotations

import torch
import torch.nn as nn

from sae_toolkit.baselines.autoencoders import AEOutput
from sae_toolkit.baselines.losses import Recon, reconstruction_loss
from sae_toolkit.errors import SAEToolkitError


class SparseAutoencoder(nn.Module):
    """z = relu((x − b_pre) W_encᵀ + b_enc),  x̂ = z W_dec + b_dec,  loss = mean (x − x̂)² + λ · mean |z|.

    x [batch, input_dim], z [batch, latent_dim]. Parameter names follow the seed: ``encoder_weight``
    [latent_dim, input_dim], ``encoder_bias`` [latent_dim], ``decoder_weight`` [input_dim, latent_dim] (absent when
    ``tied_weights``: the decoder is then ``encoder_weight`` itself), ``decoder_bias`` [input_dim], ``pre_bias``
    [input_dim] (subtracted before encoding, Anthropic 2023). Undercomplete or overcomplete (latent_dim > input_dim,
    where the L1 term is what prevents the identity map). For SAEs on language-model activations use
    ``sae_toolkit.sae``; this class is the tutorial-sized reference.
    """

    def __init__(self, input_dim: int, latent_dim: int, sparsity_weight: float = 1e-3, tied_weights: bool = False):
        super().__init__()
        for name, v in [("input_dim", input_dim), ("latent_dim", latent_dim)]:
            if not isinstance(v, int) or v <= 0:
                raise SAEToolkitError(f"{name}={v!r} must be a positive integer")
        if sparsity_weight < 0:
            raise SAEToolkitError(f"sparsity_weight={sparsity_weight!r} must be >= 0")
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.sparsity_weight, self.tied_weights = sparsity_weight, tied_weights
        self.encoder_weight = nn.Parameter(torch.randn(latent_dim, input_dim) * 0.01)
        self.encoder_bias = nn.Parameter(torch.zeros(latent_dim))
        if not tied_weights:
            self.decoder_weight = nn.Parameter(torch.randn(input_dim, latent_dim) * 0.01)
        self.decoder_bias = nn.Parameter(torch.zeros(input_dim))
        self.pre_bias = nn.Parameter(torch.zeros(input_dim))

    output_activation = "none"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, input_dim] → non-negative [batch, latent_dim]."""
        return torch.relu((x - self.pre_bias) @ self.encoder_weight.T + self.encoder_bias)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[batch, latent_dim] → [batch, input_dim]."""
        W = self.encoder_weight if self.tied_weights else self.decoder_weight.T  # [latent_dim, input_dim]
        return z @ W + self.decoder_bias

    def forward(self, x: torch.Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(self.decode(z), z)

    def loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, recon: Recon = "mse") -> dict:
        """The seed's dict: total, recon, sparsity (= λ·mean|z|), l0_active (share of |z| > 1e-3), l1_mean."""
        r = reconstruction_loss(x_hat, x, recon, sigmoid_output=False)
        sparsity = self.sparsity_weight * z.abs().mean()
        with torch.no_grad():
            l0 = (z.abs() > 1e-3).float().mean()
            l1 = z.abs().mean()
        return {"total": r + sparsity, "recon": r, "sparsity": sparsity, "l0_active": l0, "l1_mean": l1}
