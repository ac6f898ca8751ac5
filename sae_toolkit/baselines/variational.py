"""Variational autoencoder (Kingma & Welling 2013) with a β weight on the KL term (Higgins et al. 2017)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_toolkit.baselines.autoencoders import OutputActivation, _check_dims, _check_output_activation
from sae_toolkit.baselines.losses import Recon, kl_standard_normal, reconstruction_loss
from sae_toolkit.errors import SAEToolkitError


class VAEOutput(NamedTuple):
    """What the VAE's forward returns; ``x_hat, z, mu, logvar = vae(x)`` (the first two as for the other models)."""

    x_hat: torch.Tensor
    """Reconstruction [batch, input_dim]."""
    z: torch.Tensor
    """Latent [batch, latent_dim]: a reparameterized sample in training mode, the mean mu in eval mode."""
    mu: torch.Tensor
    """Posterior mean [batch, latent_dim]."""
    logvar: torch.Tensor
    """Posterior log-variance [batch, latent_dim]."""


class VariationalAutoencoder(nn.Module):
    """q(z|x) = N(mu(x), diag exp(logvar(x))), p(z) = N(0, I), z = mu + exp(½ logvar) ⊙ ε with ε ~ N(0, I).

        loss = recon_sum(x̂, x) + β · KL(q(z|x) ‖ p(z)),  both summed over dimensions and averaged over the batch

    recon_sum is Σ_j (x_j − x̂_j)² (Gaussian decoder) or the summed BCE (Bernoulli decoder; needs
    ``output_activation="sigmoid"`` and data in [0, 1]). Summing, not averaging, over dimensions keeps the ELBO's
    balance between the two terms, so β = 1 is the plain VAE whatever input_dim is.
    Encoder/decoder hidden layers: Linear + ReLU.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden_dims: list[int] | None = None,
        beta: float = 1.0,
        output_activation: OutputActivation = "none",
    ):
        super().__init__()
        hidden_dims = [256, 128] if hidden_dims is None else list(hidden_dims)
        _check_dims(input_dim, latent_dim, hidden_dims)
        _check_output_activation(output_activation)
        if beta < 0:
            raise SAEToolkitError(f"beta={beta!r} must be >= 0")
        self.input_dim, self.latent_dim, self.hidden_dims = input_dim, latent_dim, hidden_dims
        self.beta, self.output_activation = beta, output_activation
        enc: list[nn.Module] = []
        for a, b in zip([input_dim, *hidden_dims[:-1]], hidden_dims):
            enc += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*enc)
        last = hidden_dims[-1] if hidden_dims else input_dim
        self.fc_mu = nn.Linear(last, latent_dim)
        self.fc_logvar = nn.Linear(last, latent_dim)
        dec: list[nn.Module] = []
        rdims = [latent_dim, *reversed(hidden_dims)]
        for a, b in zip(rdims[:-1], rdims[1:]):
            dec += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        dec.append(nn.Linear(rdims[-1], input_dim))
        if output_activation == "sigmoid":
            dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, input_dim] → (mu, logvar), each [batch, latent_dim]."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean: the deterministic representation used as features."""
        return self.encode_distribution(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """mu + σ ⊙ ε: the sample is differentiable in mu and logvar."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode_distribution(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return VAEOutput(self.decode(z), z, mu, logvar)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode n draws of z ~ N(0, I): [n, input_dim]."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z)

    def loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        z: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        recon: Recon = "mse",
    ) -> dict:
        """{"total", "recon", "kl"} per sample averaged over the batch (call as ``loss(x, *vae(x))``)."""
        if recon == "bce":
            # reconstruction_loss performs the sigmoid/range checks; the summed value is mean × input_dim
            r = reconstruction_loss(x_hat, x, "bce", self.output_activation == "sigmoid") * x.shape[-1]
        elif recon == "mse":
            r = F.mse_loss(x_hat, x, reduction="none").sum(dim=-1).mean()
        else:
            raise SAEToolkitError(f"unknown reconstruction loss {recon!r}; use 'mse' or 'bce'")
        kl = kl_standard_normal(mu, logvar).mean()
        return {"total": r + self.beta * kl, "recon": r, "kl": kl}
