"""Training schedules as pure functions of the step: learning-rate warm-up and decay, sparsity-coefficient warm-up.

Pure functions (no scheduler objects with state) make resuming trivial: the step number is the whole state.
"""

from __future__ import annotations

import math
from typing import Literal

from sae_toolkit.errors import SAEToolkitError

Decay = Literal["linear", "cosine", "none"]


def lr_at(step: int, total_steps: int, base_lr: float, *, warmup_steps: int = 0, decay: Decay = "linear",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for the update taken at `step` (0-based) of `total_steps`.

    Linear warm-up from base_lr/warmup_steps to base_lr over the first `warmup_steps` updates, then constant,
    then over the last `decay_fraction` of training a decay towards 0 (linear, as in Anthropic's April 2024
    update, or cosine). The last update still has a small positive rate.

    >>> [round(lr_at(s, 10, 1.0, warmup_steps=2, decay_fraction=0.5), 2) for s in range(10)]
    [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    """
    lr = base_lr
    if warmup_steps > 0 and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    decay_steps = int(round(decay_fraction * total_steps))
    left = total_steps - step  # updates left including this one
    if decay != "none" and decay_steps > 0 and left <= decay_steps:
        if decay == "linear":
            lr *= left / decay_steps
        elif decay == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * (decay_steps - left + 1) / (decay_steps + 1)))
        else:
            raise SAEToolkitError(f"lr decay {decay!r} is unknown; choose linear, cosine or none")
    return lr


def sparsity_scale_at(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Factor in (0, 1] on the sparsity coefficient λ at `step`: a linear ramp over the first `warmup_fraction`
    of training (Anthropic April 2024 warm λ up over the first 5%, so early features are not killed before
    they form).

    >>> [sparsity_scale_at(s, 10, 0.4) for s in range(5)]
    [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    warmup_steps = int(round(warmup_fraction * total_steps))
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def per_token_share_at(step: int, total_steps: int, start_fraction: float) -> float:
    """BatchTopK family: the per-token share s of the selection at `step` (BatchTopKSAE.per_token_share), 1 (per-token
    TopK) at step 0 falling linearly to 0 (BatchTopK) at `start_fraction` of the steps, 0 after.

    >>> [per_token_share_at(s, 10, 0.4) for s in range(6)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    ramp_steps = int(round(start_fraction * total_steps))
    if ramp_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / ramp_steps)


# Factor on Gao et al.'s rate per architecture. Gao et al.'s 2e-4 was fitted to runs of billions of tokens; at the
# budgets this toolkit is used with (10⁵-10⁸ tokens) it is far from converged: SmolLM2 mlp_out.9, k 32, 4608
# latents, 500k tokens gave held-out EV 0.857 at ×1, 0.886 at ×3, 0.896 at ×6, where sparsify's TopK with its
# defaults reaches 0.861 (benchmarks/QUALITY.md); but at k 16 ×6 left 6.7 % of the latents dead on the held-out
# rows (×3: 0.7 %, EV 0.874; ×1: 0.04 %, EV 0.842), so ×3. The penalty architectures spread the gradient thin
# and, at the base rate, were still far from converged after 1M tokens of the issue-11 toy (relu 0.47 MMCS vs 0.96
# at ×8). Measured on that toy.
LR_FACTOR = {"topk": 3.0, "batchtopk": 3.0, "matryoshka": 3.0, "relu": 8.0, "gated": 8.0, "jumprelu": 8.0}


def default_lr(d_sae: int, arch: str = "topk") -> float:
    """2e-4 · sqrt(2^14 / d_sae) (the scaling law of Gao et al. 2024 for Adam on TopK SAEs) × LR_FACTOR[arch]."""
    return 2e-4 * math.sqrt(2**14 / d_sae) * LR_FACTOR.get(arch, 1.0)


def default_warmup_steps(arch: str, total_steps: int) -> int:
    """lr warm-up: min(1000, 5% of the steps) for the TopK family; none for the penalty architectures, whose
    λ warm-up already protects the early features (on the issue-11 toy a 48-step lr warm-up cost relu 0.05 MMCS)."""
    return 0 if arch in ("relu", "gated", "jumprelu") else min(1000, total_steps // 20)
