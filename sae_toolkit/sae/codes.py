"""Sparse codes: which (token, latent) entries of a [batch, d_sae] activation matrix a training step keeps (TopK,
BatchTopK, the positive entries), held as COO triples sorted by row (`SparseActs`), and their column-sorted view
(`Transposed`) that the sparse backwards in `kernels` sum over.

Index work runs on one thread through numpy on eager CPU (sorts, flat nonzero), where torch's parallel versions
were several times slower on the project's 2-core machine; on a GPU and under torch.compile the torch ops.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class SparseActs(NamedTuple):
    """COO form of a sparse [n_rows, d_sae] activation matrix; entries sorted by row."""

    vals: Tensor
    """[nnz] values (may require grad)."""

    rows: Tensor
    """[nnz] int64 row (token) of each value, non-decreasing."""

    cols: Tensor
    """[nnz] int64 latent of each value."""

    n_rows: int
    """Number of rows (tokens) of the dense matrix."""

    k: int | None = None
    """Entries per row when every row has exactly k (TopK); enables the faster batched kernels. None: any."""

    def to_dense(self, d_sae: int) -> Tensor:
        """[n_rows, d_sae] dense matrix (differentiable in vals)."""
        out = self.vals.new_zeros(self.n_rows, d_sae)
        return out.index_put((self.rows, self.cols), self.vals, accumulate=True)


def host_syncs_ok(t: Tensor) -> bool:
    """Whether a loss may read tensor values on the host (data-dependent shapes, early exits, density checks).

    Only in eager CPU code, where a "sync" costs nothing; on a GPU it would stall the launch queue and under
    torch.compile it would break the graph. Tests monkeypatch this to run the static (GPU) paths on CPU.
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


PARALLEL_NONZERO_MIN = 1 << 20
"""`flat_nonzero` splits masks of at least this many entries into pieces of at least half as many, one per thread
of torch's intra-op count (at most 8), scanned in Python threads (numpy releases the GIL while it scans): 6.2 →
3.4 ms for 453k of 4.7M entries with 2 threads."""

_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _nonzero_pool() -> ThreadPoolExecutor | None:
    """A thread pool of torch.get_num_threads() workers (at most 8) for this process (None with one thread).
    Re-created after a fork (the child has none of the parent's threads) or when the thread count changes."""
    global _pool
    n = min(torch.get_num_threads(), 8)
    if n < 2:
        return None
    if _pool is None or _pool[:2] != (os.getpid(), n):
        _pool = (os.getpid(), n, ThreadPoolExecutor(n, thread_name_prefix="sae-toolkit-nonzero"))
    return _pool[2]


def flat_nonzero(mask: Tensor) -> Tensor:
    """[nnz] int64 flat (row-major) indices of the True entries of a bool mask. Eager CPU: numpy's flatnonzero
    (5 ms for 4.7M entries against torch's 7-20 ms two-pass parallel nonzero on the 2-core machine), on
    contiguous pieces in parallel threads for large masks (`PARALLEL_NONZERO_MIN`)."""
    if _eager_cpu(mask) and mask.is_contiguous():
        a = mask.numpy().reshape(-1)
        pool = _nonzero_pool() if a.size >= PARALLEL_NONZERO_MIN else None
        if pool is None:
            return torch.from_numpy(np.flatnonzero(a).astype(np.int64, copy=False))
        n_pieces = max(1, min(_pool[1], 2 * a.size // max(PARALLEL_NONZERO_MIN, 1)))
        bounds = np.linspace(0, a.size, n_pieces + 1).astype(np.int64)

        def piece(i: int) -> np.ndarray:
            return np.flatnonzero(a[bounds[i]:bounds[i + 1]]).astype(np.int64, copy=False) + bounds[i]

        return torch.from_numpy(np.concatenate(list(pool.map(piece, range(len(bounds) - 1)))))
    return mask.reshape(-1).nonzero().squeeze(1)


def count_true(mask: Tensor) -> int:
    """Number of True entries of a bool mask, read on the host. Eager CPU: numpy's count_nonzero (0.2 ms for 4.7M
    entries against 1.0 ms for torch's on one thread)."""
    if _eager_cpu(mask) and mask.is_contiguous():
        return int(np.count_nonzero(mask.numpy()))
    return int(mask.count_nonzero())


def max_true_per_row(mask: Tensor) -> int:
    """The largest number of True entries in any row of a [n, m] bool mask (0 for no rows), read on the host. Eager
    CPU: numpy's count_nonzero along rows (torch sums a bool mask through an int64 copy: 1.8 ms at [1024, 460])."""
    if mask.shape[0] == 0:
        return 0
    if _eager_cpu(mask) and mask.is_contiguous():
        return int(np.count_nonzero(mask.numpy(), axis=1).max())
    return int(mask.sum(-1).max())


def positive_code(pre: Tensor, mask: Tensor | None = None) -> SparseActs:
    """[batch, d_sae] pre-activations → their positive entries (ReLU's support), sorted by row. Host sync.
    mask: `pre > 0` when the caller already has it."""
    d_sae = pre.shape[1]
    flat = flat_nonzero(pre > 0 if mask is None else mask)  # row-major: sorted by row
    # 1-d index_select on the flat view: several times faster on CPU than 2-d advanced indexing
    return SparseActs(pre.reshape(-1).index_select(0, flat), flat // d_sae, flat % d_sae, pre.shape[0])


def topk_code(pre: Tensor, k: int) -> SparseActs:
    """[batch, d_sae] pre-activations → the k largest per row (values unchanged, sorted descending per row)."""
    vals, idx = pre.topk(k, dim=-1, sorted=True)  # [batch, k]
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return SparseActs(vals.reshape(-1), rows, idx.reshape(-1), pre.shape[0], k)


def batch_topk_code(pre: Tensor, k: int) -> SparseActs:
    """[batch, d_sae] pre-activations → the k·batch largest over the whole batch (BatchTopK), sorted by row."""
    n, d_sae = pre.shape
    flat = pre.reshape(-1)
    n_keep = min(k * n, flat.numel())
    idx = _flat_topk_candidates(flat, n_keep) if host_syncs_ok(pre) else None
    if idx is None:
        idx = flat.topk(n_keep, sorted=False).indices
    idx = _sorted(idx)  # row-major order = sorted by row
    return SparseActs(flat[idx], idx // d_sae, idx % d_sae, n)


_SAMPLE = 1 << 16
"""Strided sample of the flat pre-activations from which `_flat_topk_candidates` sets its lower bound."""


def _flat_topk_candidates(flat: Tensor, n_keep: int) -> Tensor | None:
    """Indices of the n_keep largest entries of `flat` (exact, any order), or None when the shortcut does not apply.

    One top-k over millions of entries is single-threaded on CPU (68 ms for 32k of 4.7M): instead a lower bound
    L is read off a strided sample (the value above which twice the kept fraction of the sample lies), the
    entries ≥ L are gathered (≈ 2·n_keep of them) and the exact top n_keep taken among those (5.6 ms). Exact
    whenever at least n_keep entries are ≥ L, which is checked; otherwise None (caller falls back). Host syncs:
    eager CPU only.
    """
    step = flat.numel() // _SAMPLE
    if step < 4:  # small batches: the plain top-k is already cheap
        return None
    sample = flat[::step]
    r = min(sample.numel(), 2 * n_keep * sample.numel() // flat.numel() + 1)
    bound = sample.topk(r, sorted=False).values.min()
    cand = flat_nonzero(flat >= bound)
    if cand.numel() < n_keep:
        return None
    return cand[flat[cand].topk(n_keep, sorted=False).indices]


def _offsets(keys: Tensor, n: int) -> Tensor:
    """Start of each of n bags in the non-decreasing int64 `keys` (empty bags allowed)."""
    return torch.searchsorted(keys, torch.arange(n, device=keys.device, dtype=keys.dtype))


def _transpose_bags(rows: Tensor, cols: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """Re-sort COO entries by column: (order, rows in that order, offsets of each column's bag)."""
    order = _argsort_stable(cols, n_cols)
    return order, rows[order], _offsets(cols[order], n_cols)


def _eager_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _argsort_stable(keys: Tensor, n_keys: int) -> Tensor:
    """Stable argsort of int64 keys in [0, n_keys).

    Eager CPU: numpy, single-threaded — a radix sort for 16-bit keys. torch's parallel CPU sort of the 32k keys of
    a TopK step took 270-550 ms on a busy 2-core machine (13 ms on one thread) against 0.13 ms here.
    """
    if _eager_cpu(keys):
        a = keys.numpy()
        return torch.from_numpy(np.argsort(a.astype(np.uint16) if n_keys <= 1 << 16 else a, kind="stable"))
    return keys.argsort(stable=True)


def _sorted(keys: Tensor) -> Tensor:
    """int64 keys sorted ascending (single-threaded numpy on eager CPU, see `_argsort_stable`)."""
    if _eager_cpu(keys):
        return torch.from_numpy(np.sort(keys.numpy()))
    return keys.sort().values


class Transposed(NamedTuple):
    """A SparseActs' entries grouped by column (latent): what ∂W_enc, ∂b_enc and ∂W_dec sum over."""

    order: Tensor
    """[nnz] int64 permutation that sorts the entries by column (stable: rows stay ascending within a column)."""

    rows: Tensor
    """[nnz] int64 rows in that order."""

    offsets: Tensor
    """[n_cols] int64 start of each column's entries in that order."""


def transposed(code: SparseActs, n_cols: int) -> Transposed:
    """The column-sorted view of `code` that both sparse backwards need; compute it once per code and pass it to
    `sparse_pre_acts` and `sparse_decode` (one sort per step instead of two)."""
    return Transposed(*_transpose_bags(code.rows, code.cols, n_cols))


def argsort_keys(keys: Tensor, n_keys: int) -> Tensor:
    """Stable argsort of int64 keys in [0, n_keys) (single-threaded numpy radix sort on eager CPU)."""
    return _argsort_stable(keys, n_keys)


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """[n_rows] start of each row's entries in the non-decreasing int64 `rows` (empty rows allowed)."""
    return _offsets(rows, n_rows)
