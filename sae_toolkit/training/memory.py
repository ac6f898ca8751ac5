"""Will the SAE fit? The memory a training run needs, checked before anything is allocated.

A huge --n-features or --expansion used to fail deep in torch with a raw allocation error after training had
started; this estimate turns that into a one-line error that states the need and what is available.
"""

from __future__ import annotations

import torch

from sae_toolkit.activations.store import available_ram
from sae_toolkit.errors import SAEToolkitError

_BYTES_PER_PARAM = 16
"""fp32 weight + gradient + Adam's two moments (4 bytes each)."""
_LATENT_COPIES = 4
"""[batch, d_sae] float32 tensors alive during a step: pre-activations, latents, their gradients."""


def training_bytes(d_in: int, d_sae: int, batch_size: int) -> int:
    """Estimated peak bytes: parameters (W_enc, W_dec, biases) with gradients and Adam state, plus the step's
    [batch, d_sae] latent tensors."""
    params = 2 * d_in * d_sae + d_sae + d_in
    return params * _BYTES_PER_PARAM + _LATENT_COPIES * 4 * batch_size * d_sae


def available_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (CUDA: free device memory; CPU: MemAvailable or free physical pages); None if
    unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_ram()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(d_in: int, d_sae: int, batch_size: int, device: torch.device, *, available: int | None = None) -> None:
    """Raise a one-line SAEToolkitError when the run's estimated memory exceeds what `device` has free."""
    need = training_bytes(d_in, d_sae, batch_size)
    have = available_bytes(device) if available is None else available
    if have is not None and need > have:
        raise SAEToolkitError(f"an SAE with d_sae={d_sae:,} latents on d_in={d_in} needs about {_gib(need)} to train "
                              f"(weights, gradients, Adam state, batch of {batch_size}) but {device} has "
                              f"{_gib(have)} free; lower --n-features/--expansion (or --batch-size)")
