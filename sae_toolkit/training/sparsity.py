"""Target-L0 control: steer the sparsity coefficient λ during training so the run ends at a requested L0."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError


class L0Controller:
    """Proportional-integral controller on log λ.  With e = log((L0 + 0.5) / (target + 0.5)) clipped to ±1:
        I ← I + gain · e,   log s = I + kp · e,   λ = λ₀ · s.

    Working in log space makes the step scale-free (λ spans orders of magnitude between data sets) and keeps λ
    positive. The integral term removes any lasting offset; the proportional term reacts at once and damps the
    overshoot that the integral alone makes, because the L0 follows λ only with a lag (the SAE has to move).
    The trainer calls `update_` once per step after the λ warm-up; before that the penalty is still ramping and
    the measured L0 says nothing about the final λ. All state is 0-d tensors (no host sync on GPU; saved with
    checkpoints as `sparsity.log_scale` and `sparsity.integral`).

    >>> c = L0Controller(10.0, gain=0.1)
    >>> for _ in range(5): c.update_(torch.tensor(40.0))
    >>> round(float(c.scale()), 3)  # L0 above target → λ grows
    2.718
    """

    def __init__(self, target: float, *, gain: float = 0.01, kp: float = 0.5,
                 device: str | torch.device | None = None) -> None:
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
            raise SAEToolkitError(f"target L0 {target!r} must be a positive number, e.g. 32")
        self.target = float(target)
        self.gain = gain
        self.kp = kp
        self.integral = torch.zeros((), device=device)
        self.log_scale = torch.zeros((), device=device)

    def scale(self) -> Tensor:
        """0-d tensor s: the factor on the configured λ."""
        return self.log_scale.exp()

    @torch.no_grad()
    def update_(self, l0: Tensor) -> None:
        """One control step from the batch's mean L0 (0-d tensor)."""
        # clipped: early in training the L0 is far off for reasons λ does not control (latents not formed yet),
        # and a full-size step there winds λ up far past its final value
        err = torch.log((l0.float() + 0.5) / (self.target + 0.5)).clamp(-1.0, 1.0)
        # ±30 in log space: far beyond any useful λ, only guards against overflow on a degenerate run
        self.integral.add_(self.gain * err).clamp_(-30.0, 30.0)
        self.log_scale.copy_(self.integral + self.kp * err)

    def state_tensors(self) -> dict[str, Tensor]:
        """The controller's state for a checkpoint."""
        return {"sparsity.log_scale": self.log_scale, "sparsity.integral": self.integral}

    def load_state_tensors_(self, tensors: dict[str, Tensor]) -> None:
        """Restore from `state_tensors` (a checkpoint of the integral-only controller has log_scale only)."""
        self.log_scale.copy_(tensors["sparsity.log_scale"])
        self.integral.copy_(tensors.get("sparsity.integral", tensors["sparsity.log_scale"]))


def controller_gain(total_steps: int) -> float:
    """Integral gain per step: 10 / total_steps, within [0.01, 0.05]. At 500 steps (0.02) a clipped error moves
    λ by ×e per 50 steps, enough to go from a default λ tuned on a toy to the ~10× larger one a real model's
    activations need within the first third of training."""
    return min(0.05, max(0.01, 10.0 / max(total_steps, 1)))
