"""Checks an SAE must pass before its numbers or files are trusted: every weight finite."""

from __future__ import annotations

import torch

from sae_toolkit.errors import SAEToolkitError


@torch.no_grad()
def require_finite_weights(sae, where: object) -> None:
    """Raise a one-line SAEToolkitError naming the first tensor of `sae` (loaded from `where`) holding NaN/Inf.

    A diverged run (too high an lr) saves such an SAE; exporting or analyzing it only spreads NaN further."""
    for name, t in sae.state_tensors().items():
        bad = ~torch.isfinite(t)
        if bad.any():
            raise SAEToolkitError(f"the SAE in {where} has {int(bad.sum())} non-finite values in {name} "
                                  f"({tuple(t.shape)}); its training diverged — retrain it with a lower --lr")
