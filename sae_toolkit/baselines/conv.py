"""Convolutional autoencoder for small grey images (28×28 MNIST, 8×8 sklearn digits)."""

from __future__ import annotations

import torch
import torch.nn as nn

from sae_toolkit.baselines.autoencoders import AEOutput
from sae_toolkit.baselines.losses import Recon, reconstruction_loss
from sae_toolkit.errors import SAEToolkitError


class ConvAutoencoder(nn.Module):
    """Two stride-2 convolutions down, two transposed convolutions up, sigmoid pixels (the seed's MNIST model).

    x [batch, in_channels, S, S] → [batch, 32, S/2, S/2] → [batch, 64, S/4, S/4] → z [batch, latent_dim] → x̂ like x.
    S = image_size must be divisible by 4: 28 (MNIST: 28 → 14 → 7) and 8 (digits: 8 → 4 → 2) both work.
    The output is a sigmoid, so train it with BCE (or MSE) on pixels in [0, 1].
    """

    output_activation = "sigmoid"
    default_recon = "bce"

    def __init__(self, latent_dim: int = 32, image_size: int = 28, in_channels: int = 1):
        super().__init__()
        if not isinstance(image_size, int) or image_size < 4 or image_size % 4:
            raise SAEToolkitError(
                f"image_size={image_size!r} must be a multiple of 4 (e.g. 28 for MNIST, 8 for digits)"
            )
        if not isinstance(latent_dim, int) or latent_dim <= 0:
            raise SAEToolkitError(f"latent_dim={latent_dim!r} must be a positive integer")
        self.latent_dim, self.image_size, self.in_channels = latent_dim, image_size, in_channels
        self._s = image_size // 4
        self.encoder_conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1),  # → S/2
            nn.BatchNorm2d(32),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # → S/4
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.encoder_fc = nn.Linear(64 * self._s * self._s, latent_dim)
        self.decoder_fc = nn.Linear(latent_dim, 64 * self._s * self._s)
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),  # → S/2
            nn.BatchNorm2d(32),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(32, in_channels, 3, stride=2, padding=1, output_padding=1),  # → S
            nn.Sigmoid(),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, C, S, S] → [batch, latent_dim]."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise SAEToolkitError(
                f"ConvAutoencoder expects images of shape [batch, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}]; got {tuple(x.shape)} (reshape flat pixels with .reshape(-1, 1, S, S))"
            )
        h = self.encoder_conv(x)
        return self.encoder_fc(h.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[batch, latent_dim] → [batch, C, S, S] in (0, 1)."""
        h = self.decoder_fc(z).view(-1, 64, self._s, self._s)
        return self.decoder_conv(h)

    def forward(self, x: torch.Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(self.decode(z), z)

    def loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, recon: Recon = "bce") -> dict:
        """{"total", "recon"}; BCE by default because pixels are in [0, 1] and the output is a sigmoid."""
        r = reconstruction_loss(x_hat, x, recon, sigmoid_output=True)
        return {"total": r, "recon": r}


def build_mnist_autoencoder(latent_dim: int = 32, image_size: int = 28) -> ConvAutoencoder:
    """The seed's factory: a ConvAutoencoder for 28×28 MNIST (pass image_size=8 for sklearn digits)."""
    return ConvAutoencoder(latent_dim=latent_dim, image_size=image_size)
