"""Stops a run whose loss or weights went NaN/Inf (too high an lr), keeping the last good checkpoint.

The flag lives on the device and is read only where the loop syncs anyway (log steps, checkpoints, the end),
so the step keeps no host sync (DESIGN §5); the step number reported is still the first bad one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_toolkit.errors import RunFailure
from sae_toolkit.training.checkpoint import latest_checkpoint


class TrainingDiverged(RunFailure):
    """The loss or the weights became non-finite: a runtime failure (CLI exit status 1), not a usage error."""


class NonFiniteGuard:
    """Remembers the first step whose loss was NaN/Inf; `check` raises TrainingDiverged once one was seen."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Record `step` if its loss (a 0-d tensor) is non-finite and no earlier step was."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, sae, step: int, run_dir: Path, lr: float) -> None:
        """Raise if a loss so far was non-finite, or (before saving) if a weight of `sae` is, after `step` steps."""
        bad_step = int(self.first_bad)
        what = "the loss"
        if bad_step < 0:
            if all(torch.isfinite(t).all() for t in sae.state_tensors().values()):
                return
            bad_step, what = step, "the weights"
        kept = latest_checkpoint(run_dir)
        last = (f"the last good checkpoint ({kept}) is kept" if kept is not None
                else "no checkpoint had been saved yet")
        raise TrainingDiverged(f"training diverged: {what} became NaN/Inf at step {bad_step} (peak lr {lr:g}); "
                               f"lower --lr (e.g. 10x) and train again into a new --out (or pass --force to "
                               f"replace this run); {last}")
