"""Massive-activation positions (attention sinks): the context-window positions excluded from training, metrics
and dashboard examples.

Some positions carry activations far larger than the rest (Sun et al. 2024, "Massive Activations in Large Language
Models"): in SmolLM2's mlp_out.9 the first token after `<|im_start|>` filled the 32 largest features of the demo's
report. They are a property of the position, not of the text, so the exclusion is one set of positions per file:
those whose median row norm exceeds `multiple` × the median row norm of the whole sample, plus the first `first`
positions if asked.
"""

from __future__ import annotations

import numpy as np

from sae_toolkit.activations.format import to_float32
from sae_toolkit.errors import SAEToolkitError

DEFAULT_MULTIPLE = 5.0
"""Median norm at a position above this multiple of the overall median norm marks the position as an outlier."""


def outlier_positions(dset, context_size: int, seq_range: tuple[int, int], *, multiple: float | None = DEFAULT_MULTIPLE,
                      first: int = 0, sample_seqs: int = 256, dtype: str = "float32") -> np.ndarray:
    """[context_size] bool: positions to exclude in the windows of `seq_range` of the acts dataset `dset`.

    multiple: threshold on the per-position median norm relative to the overall median (None or 0: no
    detection). first: also exclude positions 0..first-1. Reads at most `sample_seqs` evenly spaced windows.
    """
    if first < 0 or first >= context_size:
        raise SAEToolkitError(f"exclude_first_positions={first} must be in [0, {context_size}) for windows of "
                              f"{context_size} tokens")
    if multiple is not None and not multiple >= 0:
        raise SAEToolkitError(f"outlier_multiple={multiple!r} must be >= 0 (0 or None turns detection off)")
    out = np.zeros(context_size, dtype=bool)
    out[:first] = True
    if not multiple:
        return out
    start, stop = seq_range
    seqs = np.unique(np.linspace(start, stop - 1, min(sample_seqs, stop - start)).astype(np.int64))
    norms = np.stack([np.linalg.norm(to_float32(dset[s * context_size:(s + 1) * context_size], dtype), axis=1)
                      for s in seqs])  # [n_seqs, context_size]
    overall = float(np.median(norms))
    if overall > 0:
        out |= np.median(norms, axis=0) > multiple * overall
    return out


def describe(excluded: np.ndarray) -> str:
    """'positions 0, 1' / 'no positions' for messages."""
    idx = np.flatnonzero(excluded)
    return f"positions {', '.join(map(str, idx.tolist()))}" if idx.size else "no positions"
