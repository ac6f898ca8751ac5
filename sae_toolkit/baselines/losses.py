"""Loss formulas of the classic autoencoders: reconstruction (MSE/BCE) and the Gaussian KL term of the VAE."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from sae_toolkit.errors import SAEToolkitError

Recon = Literal["mse", "bce"]


def reconstruction_loss(
    x_hat: torch.Tensor, x: torch.Tensor, kind: Recon = "mse", sigmoid_output: bool = False
) -> torch.Tensor:
    """Mean over all elements of (x − x̂)² (``"mse"``) or −[x log x̂ + (1−x) log(1−x̂)] (``"bce"``).

    x_hat, x: same shape, e.g. [batch, d_in] or [batch, 1, H, W].
    BCE is only defined for a decoder that ends in a sigmoid and targets in [0, 1]; anything else is refused with
    a one-line error here instead of NaN gradients or a CUDA assert later (the seed's MSE-vs-BCE warning).
    """
    if kind == "mse":
        return F.mse_loss(x_hat, x)
    if kind != "bce":
        raise SAEToolkitError(f"unknown reconstruction loss {kind!r}; use 'mse' or 'bce'")
    if not sigmoid_output:
        raise SAEToolkitError(
            "loss='bce' needs a decoder with a sigmoid output; build the model with "
            "output_activation='sigmoid' or use loss='mse'"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise SAEToolkitError(
            f"loss='bce' needs targets in [0, 1] but their range is [{lo:.4g}, {hi:.4g}]; "
            "scale the data to [0, 1] (e.g. MinMaxScaler) or use loss='mse'"
        )
    return F.binary_cross_entropy(x_hat, x)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) ‖ N(0, I)) per sample: −½ Σ_j (1 + logvar_j − mu_j² − exp(logvar_j)).

    mu, logvar: [batch, latent] → [batch].
    """
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)
