"""Massive-activation positions (attention sinks): the context-window positions excluded from training, metrics
and dashboard examples.

Some positions carry activations far larger than the rest (Sun et al. 2024, "Massive Activations in Large Language
Models"), BOS above all (17x the median norm in SmolLM2's mlp_out.9). The exclusion is one set of positions per
file: those whose median row norm exceeds `multiple` × the median row norm of the whole sample, plus the first
`first` positions if asked. Massive activations that belong to single tokens rather than to a position (in that
hookpoint 28 % of the tokens at position 1 and of ` the` tokens) are not excluded; analysis/sinks.py reports them.
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
    norms = window_norms(dset, context_size, sample_windows(seq_range, sample_seqs), dtype)
    overall = float(np.median(norms))
    if overall > 0:
        out |= np.median(norms, axis=0) > multiple * overall
    return out


def sample_windows(seq_range: tuple[int, int], sample_seqs: int = 256) -> np.ndarray:
    """Up to `sample_seqs` evenly spaced window ids of `seq_range`, sorted, int64."""
    start, stop = seq_range
    return np.unique(np.linspace(start, stop - 1, min(sample_seqs, stop - start)).astype(np.int64))


def window_norms(dset, context_size: int, seqs: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """[len(seqs), context_size] activation norm of every row of the windows `seqs` of the acts dataset `dset`."""
    return np.stack([np.linalg.norm(to_float32(dset[s * context_size:(s + 1) * context_size], dtype), axis=1)
                     for s in seqs.tolist()])


def describe(excluded: np.ndarray) -> str:
    """'positions 0, 1' / 'no positions' for messages."""
    idx = np.flatnonzero(excluded)
    return f"positions {', '.join(map(str, idx.tolist()))}" if idx.size else "no positions"
