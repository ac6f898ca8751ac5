"""MLP autoencoders of the seed tutorial: plain (BatchNorm + dropout), denoising and contractive."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn as nn

from sae_toolkit.baselines.losses import Recon, reconstruction_loss
from sae_toolkit.errors import SAEToolkitError

OutputActivation = Literal["none", "sigmoid"]
NoiseType = Literal["gaussian", "masking", "salt_pepper"]


class AEOutput(NamedTuple):
    """What every deterministic autoencoder's forward returns; unpacks as ``x_hat, z = model(x)``."""

    x_hat: torch.Tensor
    """Reconstruction, same shape as the input."""
    z: torch.Tensor
    """Bottleneck code [batch, latent_dim]."""


def _check_dims(input_dim: int, latent_dim: int, hidden_dims: list[int]) -> None:
    for name, v in [("input_dim", input_dim), ("latent_dim", latent_dim)]:
        if not isinstance(v, int) or v <= 0:
            raise SAEToolkitError(f"{name}={v!r} must be a positive integer")
    if any(not isinstance(h, int) or h <= 0 for h in hidden_dims):
        raise SAEToolkitError(f"hidden_dims={hidden_dims!r} must be a list of positive integers")


def _check_output_activation(output_activation: str) -> None:
    if output_activation not in ("none", "sigmoid"):
        raise SAEToolkitError(f"output_activation={output_activation!r}; use 'none' (MSE) or 'sigmoid' (BCE)")


def _mlp(dims: list[int], dropout: float) -> list[nn.Module]:
    """Linear → BatchNorm → ReLU (→ Dropout) for every step of `dims` but the last, which is a bare Linear."""
    layers: list[nn.Module] = []
    for d_from, d_to in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_from, d_to), nn.BatchNorm1d(d_to), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return layers


class Autoencoder(nn.Module):
    """Fully connected autoencoder: x [batch, input_dim] → z [batch, latent_dim] → x̂ [batch, input_dim].

    Encoder input → hidden_dims → latent, decoder the mirror; hidden layers are Linear + BatchNorm + ReLU
    (+ Dropout); the bottleneck has no activation. The decoder ends in a sigmoid only when
    ``output_activation="sigmoid"`` — required for BCE on [0, 1] data; keep ``"none"`` for standardized data and MSE.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden_dims: list[int] | None = None,
        dropout: float = 0.0,
        output_activation: OutputActivation = "none",
    ):
        super().__init__()
        hidden_dims = [256, 128] if hidden_dims is None else list(hidden_dims)
        _check_dims(input_dim, latent_dim, hidden_dims)
        _check_output_activation(output_activation)
        if not 0.0 <= dropout < 1.0:
            raise SAEToolkitError(f"dropout={dropout!r} must be in [0, 1)")
        self.input_dim, self.latent_dim, self.hidden_dims = input_dim, latent_dim, hidden_dims
        self.output_activation = output_activation
        self.encoder = nn.Sequential(*_mlp([input_dim, *hidden_dims, latent_dim], dropout))
        dec = _mlp([latent_dim, *reversed(hidden_dims), input_dim], dropout)
        if output_activation == "sigmoid":
            dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, input_dim] → [batch, latent_dim]."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[batch, latent_dim] → [batch, input_dim]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(self.decode(z), z)

    def loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, recon: Recon = "mse") -> dict:
        """{"total", "recon"}: the reconstruction loss of x̂ against the clean x (call as ``loss(x, *model(x))``)."""
        r = reconstruction_loss(x_hat, x, recon, self.output_activation == "sigmoid")
        return {"total": r, "recon": r}


class DenoisingAutoencoder(Autoencoder):
    """Autoencoder that encodes a corrupted x̃ and is scored against the clean x (Vincent et al. 2008).

    noise_type ``"gaussian"``: x̃ = x + ε, ε ~ N(0, noise_level²); ``"masking"``: each input zeroed with
    probability noise_level; ``"salt_pepper"``: each input replaced by 0 or 1 (equally likely) with probability
    noise_level. Corruption happens only in training mode: ``model.eval()`` encodes the clean input.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden_dims: list[int] | None = None,
        noise_type: NoiseType = "gaussian",
        noise_level: float = 0.2,
        dropout: float = 0.0,
        output_activation: OutputActivation = "none",
    ):
        super().__init__(input_dim, latent_dim, hidden_dims, dropout, output_activation)
        if noise_type not in ("gaussian", "masking", "salt_pepper"):
            raise SAEToolkitError(f"noise_type={noise_type!r}; use 'gaussian', 'masking' or 'salt_pepper'")
        if noise_level < 0 or (noise_type != "gaussian" and noise_level > 1):
            raise SAEToolkitError(
                f"noise_level={noise_level!r} must be >= 0 (a std) for gaussian and in [0, 1] (a probability) "
                "for masking and salt_pepper"
            )
        self.noise_type, self.noise_level = noise_type, noise_level

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ in training mode, x itself in eval mode. Same shape as x."""
        if not self.training or self.noise_level == 0:
            return x
        if self.noise_type == "gaussian":
            return x + torch.randn_like(x) * self.noise_level
        if self.noise_type == "masking":
            return x * torch.bernoulli(torch.full_like(x, 1.0 - self.noise_level))
        hit = torch.bernoulli(torch.full_like(x, self.noise_level))
        salt = torch.bernoulli(torch.full_like(x, 0.5))
        return x * (1 - hit) + salt * hit

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.corrupt(x))


class ContractiveAutoencoder(nn.Module):
    """Autoencoder penalised by the squared Frobenius norm of its encoder Jacobian (Rifai et al. 2011).

    Encoder: h_0 = x, h_l = σ(W_l h_{l−1} + b_l) for every layer including the code z = h_L (sigmoid throughout,
    no BatchNorm, so the Jacobian is per sample and exact). Decoder: Linear + ReLU mirror, bare Linear output
    (or sigmoid with ``output_activation="sigmoid"``).

        loss = recon(x̂, x) + contractive_weight · mean_batch ‖∂z/∂x‖²_F
        J = diag(σ'_L) W_L ⋯ diag(σ'_1) W_1,  σ' = h (1 − h)

    With one layer this is Σ_j (z_j (1 − z_j))² ‖W_j‖², the formula of the paper.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden_dims: list[int] | None = None,
        contractive_weight: float = 1e-3,
        output_activation: OutputActivation = "none",
    ):
        super().__init__()
        hidden_dims = [] if hidden_dims is None else list(hidden_dims)
        _check_dims(input_dim, latent_dim, hidden_dims)
        _check_output_activation(output_activation)
        if contractive_weight < 0:
            raise SAEToolkitError(f"contractive_weight={contractive_weight!r} must be >= 0")
        self.input_dim, self.latent_dim, self.hidden_dims = input_dim, latent_dim, hidden_dims
        self.contractive_weight = contractive_weight
        self.output_activation = output_activation
        dims = [input_dim, *hidden_dims, latent_dim]
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        dec: list[nn.Module] = []
        rdims = dims[::-1]
        for a, b in zip(rdims[:-2], rdims[1:-1]):
            dec += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        dec.append(nn.Linear(rdims[-2], rdims[-1]))
        if output_activation == "sigmoid":
            dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, input_dim] → [batch, latent_dim] in (0, 1)."""
        h = x
        for lin in self.encoder:
            h = torch.sigmoid(lin(h))
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(self.decode(z), z)

    def jacobian_penalty(self, x: torch.Tensor) -> torch.Tensor:
        """‖∂z/∂x‖²_F per sample, exactly: [batch, input_dim] → [batch]."""
        if len(self.encoder) == 1:
            lin = self.encoder[0]
            z = torch.sigmoid(lin(x))
            # Σ_j (σ'_j)² Σ_i W_ji²: no [batch, latent, input] tensor needed for the classic one-layer CAE
            return (z * (1 - z)).pow(2) @ lin.weight.pow(2).sum(dim=1)
        h, J = x, None
        for lin in self.encoder:
            h = torch.sigmoid(lin(h))
            d = h * (1 - h)  # [batch, out]
            WJ = lin.weight.unsqueeze(0) if J is None else torch.einsum("oi,bid->bod", lin.weight, J)
            J = d.unsqueeze(-1) * WJ  # [batch, out, input_dim]
        return J.pow(2).sum(dim=(1, 2))

    def loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, recon: Recon = "mse") -> dict:
        """{"total", "recon", "contractive"} (call as ``loss(x, *model(x))``)."""
        r = reconstruction_loss(x_hat, x, recon, self.output_activation == "sigmoid")
        c = self.contractive_weight * self.jacobian_penalty(x).mean()
        return {"total": r + c, "recon": r, "contractive": c}
