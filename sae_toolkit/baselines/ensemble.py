"""A stack of small MLP autoencoders trained side by side in one batched matmul (the anomaly detector's model)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sae_toolkit.baselines.autoencoders import AEOutput, _check_dims
from sae_toolkit.baselines.losses import Recon
from sae_toolkit.errors import SAEToolkitError


class StackedLinear(nn.Module):
    """n_models independent Linear layers: x [n_models, batch, d_from] → [n_models, batch, d_to]."""

    def __init__(self, n_models: int, d_from: int, d_to: int):
        super().__init__()
        bound = 1.0 / math.sqrt(d_from)  # nn.Linear's default init, member by member
        self.weight = nn.Parameter(torch.empty(n_models, d_from, d_to).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_models, 1, d_to).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class StackedBatchNorm(nn.Module):
    """BatchNorm per member and unit: [n_models, batch, d] viewed as [batch, n_models·d] for one BatchNorm1d."""

    def __init__(self, n_models: int, d: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(n_models * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, b, d = x.shape
        return self.bn(x.transpose(0, 1).reshape(b, k * d)).reshape(b, k, d).transpose(0, 1)


class StackedAutoencoder(nn.Module):
    """n_models MLP autoencoders (Linear + ReLU, linear bottleneck and output) with independent weights.

    x [batch, input_dim] is fed to every member → x_hat [n_models, batch, input_dim], z [n_models, batch, latent_dim].
    In training mode each member sees its own Gaussian corruption x + ε, ε ~ N(0, noise_level²) (denoising), and
    the loss is Σ_members mean (x − x̂_m)² against the clean x, so every member gets its own full gradient.
    Averaging members that differ only by initialisation and noise lowers the variance of the anomaly score, which
    on a few hundred rows is what separates an autoencoder from IsolationForest (see benchmarks/anomaly_comparison.py).
    One batched matmul trains all members at the cost of about one: small MLPs on CPU are bound by per-step
    Python overhead, not by FLOPs.
    """

    output_activation = "none"

    def __init__(
        self,
        n_models: int,
        input_dim: int,
        latent_dim: int,
        hidden_dims: list[int] | None = None,
        noise_level: float = 0.1,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ):
        super().__init__()
        hidden_dims = [64, 32] if hidden_dims is None else list(hidden_dims)
        _check_dims(input_dim, latent_dim, hidden_dims)
        if not isinstance(n_models, int) or n_models < 1:
            raise SAEToolkitError(f"n_models={n_models!r} must be a positive integer")
        if noise_level < 0 or not 0.0 <= dropout < 1.0:
            raise SAEToolkitError(f"noise_level={noise_level!r} must be >= 0 and dropout={dropout!r} in [0, 1)")
        self.n_models, self.input_dim, self.latent_dim = n_models, input_dim, latent_dim
        self.hidden_dims, self.noise_level, self.dropout = hidden_dims, noise_level, dropout
        self.batch_norm = batch_norm
        self.encoder = self._mlp([input_dim, *hidden_dims, latent_dim])
        self.decoder = self._mlp([latent_dim, *reversed(hidden_dims), input_dim])

    def _mlp(self, dims: list[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for d_from, d_to in zip(dims[:-2], dims[1:-1]):
            layers.append(StackedLinear(self.n_models, d_from, d_to))
            if self.batch_norm:
                layers.append(StackedBatchNorm(self.n_models, d_to))
            layers.append(nn.ReLU())
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
        layers.append(StackedLinear(self.n_models, dims[-2], dims[-1]))
        return nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, input_dim] → [n_models, batch, latent_dim] (corrupted per member in training mode)."""
        xs = x.unsqueeze(0).expand(self.n_models, *x.shape)  # [n_models, batch, input_dim]
        if self.training and self.noise_level > 0:
            xs = xs + torch.randn_like(xs) * self.noise_level
        return self.encoder(xs)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[n_models, batch, latent_dim] → [n_models, batch, input_dim]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(self.decode(z), z)

    def loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, recon: Recon = "mse") -> dict:
        """{"total": Σ_m mean (x − x̂_m)², "recon": its mean over members}."""
        if recon != "mse":
            raise SAEToolkitError(f"StackedAutoencoder trains with loss='mse' only; got {recon!r}")
        per_member = (x_hat - x.unsqueeze(0)).pow(2).mean(dim=(1, 2))  # [n_models]
        return {"total": per_member.sum(), "recon": per_member.mean()}
