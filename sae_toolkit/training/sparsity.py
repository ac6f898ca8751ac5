"""Target-L0 control: steer the sparsity coefficient λ during training so the run ends at a requested L0."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError


class L0Controller:
    """Integral controller on log λ:  log s ← log s + gain · log((L0 + 0.5) / (target + 0.5)),  λ = λ₀ · s.

    Working in log space makes the step scale-free (λ spans orders of magnitude between data sets) and keeps λ
    positive. The trainer calls `update_` once per step after the λ warm-up; before that the penalty is still
    ramping and the measured L0 says nothing about the final λ. All state is one 0-d tensor (no host sync on GPU;
    saved with checkpoints as `sparsity.log_scale`).

    >>> c = L0Controller(10.0, gain=0.1)
    >>> for _ in range(5): c.update_(torch.tensor(40.0))
    >>> round(float(c.scale()), 3)  # L0 above target → λ grows
    1.284
    """

    def __init__(self, target: float, *, gain: float = 0.01, device: str | torch.device | None = None) -> None:
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
            raise SAEToolkitError(f"target L0 {target!r} must be a positive number, e.g. 32")
        self.target = float(target)
        self.gain = gain
        self.log_scale = torch.zeros((), device=device)

    def scale(self) -> Tensor:
        """0-d tensor s: the factor on the configured λ."""
        return self.log_scale.exp()

    @torch.no_grad()
    def update_(self, l0: Tensor) -> None:
        """One control step from the batch's mean L0 (0-d tensor)."""
        # clamped: early in training the L0 is far off for reasons λ does not control (latents not formed yet),
        # and a full-size step there winds λ up far past its final value (jumprelu then overshot to 1/5 the L0)
        err = torch.log((l0.float() + 0.5) / (self.target + 0.5)).clamp(-0.5, 0.5)
        # ±30 in log space: far beyond any useful λ, only guards against overflow on a degenerate run
        self.log_scale.add_(self.gain * err).clamp_(-30.0, 30.0)


def controller_gain(total_steps: int) -> float:
    """Gain per step: 0.01 (λ can move ×e per ~200 steps of a clamped error), up to 0.03 for short runs so λ
    settles within the first half of training; more made λ swing by orders of magnitude in a 100-step run."""
    return min(0.03, max(0.01, 10.0 / max(total_steps, 1)))
