"""ActivationStore: shuffled, normalized batches of one hookpoint's activations, streamed from an HDF5 file.

The file is the format of DESIGN.md §3 (any writer, not only our cacher). Batches are a pure function of
`(seed, rows_done)`, so `state_dict()` is one integer and a resumed run sees exactly the batches it would have.

    >>> store = ActivationStore("acts.h5", "mlp_out.6", batch_size=4096, device="cuda")  # doctest: +SKIP
    >>> x = store.next_batch()  # [batch, d_in] float32 on the device, BOS positions excluded
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch

from sae_toolkit.activations.format import (
    FORMAT as FORMAT,  # re-exported: older code imports the format names from here
)
from sae_toolkit.activations.format import FORMAT_VERSION as FORMAT_VERSION
from sae_toolkit.activations.format import (
    bos_token_id,
    hookpoint_dataset,
    hookpoints,
    open_acts,
    root_attrs,
    stored_dtype,
)
from sae_toolkit.activations.format import (
    to_float32 as _to_float32,  # noqa: F401 (re-exported: the reader imports it from here)
)
from sae_toolkit.activations.mapped import MappedDataset
from sae_toolkit.activations.outliers import outlier_positions
from sae_toolkit.errors import SAEToolkitError

log = logging.getLogger(__name__)

_BLOCK_BYTES = 4 << 20
"""Target stored bytes per block: a few MiB makes one contiguous HDF5 read cheap relative to its fixed cost."""
_AUTO_IN_MEMORY_FRACTION = 0.5
"""`in_memory="auto"` loads the usable rows (in the file's dtype) when they take at most this share of the RAM
available when the store opens."""
_AUTO_IN_MEMORY_FALLBACK_BYTES = 2 << 30
"""The budget when the available RAM cannot be read (not Linux)."""
_EXPONENT_BITS: dict[str | int, int] = {2: 0x7C00, "bfloat16": 0x7F80, 4: 0x7F800000, 8: 0x7FF0000000000000}
"""The exponent bits of each float format (by itemsize; bfloat16 by name): all set = inf or nan."""
_READ_AHEAD = 2
"""Streaming groups the reader thread reads ahead of the one being gathered: a group read (~16 blocks) then
overlaps the gathers and conversions of the previous groups' batches instead of stalling them."""
_N_BUFFERS = _READ_AHEAD + 1
"""Reusable group buffers: the group being gathered plus the ones read ahead."""
_HOST_RING = 3
"""Stored-dtype batch buffers of the host path: one being gathered, the others waiting for or in conversion."""
_Maps = list[tuple[MappedDataset, str, slice, torch.Tensor]]
"""Each streamed dataset's map, hookpoint name, the columns of a batch row its rows fill and the rows view they are
gathered from (both in elements of `ActivationStore._unit` bytes)."""
_Source = np.ndarray | _Maps
"""Where a group's rows are gathered from: an array (a read buffer, or the in-memory rows) or the file's maps."""


def available_ram() -> int | None:
    """Bytes of RAM available to new allocations (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _one_torch_thread() -> None:
    """Run the calling thread's torch ops on one thread (the CPU prefetch thread's gathers and conversions).

    They are memory-bound and run beside a consumer whose step already has an OpenMP team on every core; a second
    team per op only oversubscribes the cores, and on a busy machine each op then waits for a descheduled team
    member (single-threaded gather/convert measured 50x faster than two threads under load, and no slower in
    interleaved store rounds). `torch.set_num_threads` sets the calling thread's team size, but also the default
    that threads starting later pick up: `next_batch` puts that default back once the thread is set up.
    """
    torch.get_num_threads()  # torch sets a thread up on its first use, from that default: before, not after
    torch.set_num_threads(1)


def _torch_rows(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows as a tensor without a copy: float16/float32 as they are, bfloat16's uint16 bits viewed."""
    t = torch.from_numpy(rows)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class _Recycled:
    """Host float32 arrays for batches handed to a consumer, each reused once the consumer dropped every tensor
    that shares its memory (views included): a new batch then writes to pages already mapped instead of fresh ones,
    whose page faults (and zeroing) cost about as much as the conversion itself.

    A batch's tensor comes from `torch.from_numpy`, whose storage holds a reference to the array: the array's
    reference count falls back to the pool's own exactly when no tensor uses it any more.
    """

    def __init__(self, shape: tuple[int, int], cap: int):
        """shape: [batch, width] of every array; cap: arrays kept for reuse (more in use: fresh ones)."""
        self.shape, self.cap = shape, cap
        self._arrays: list[np.ndarray] = []

    def take(self) -> torch.Tensor:
        """A float32 tensor of `shape` (contents undefined) that no one else holds."""
        for a in self._arrays:
            if sys.getrefcount(a) <= _POOL_REFS:
                return torch.from_numpy(a)
        a = np.empty(self.shape, dtype=np.float32)
        if len(self._arrays) < self.cap:
            self._arrays.append(a)
        return torch.from_numpy(a)


_POOL_REFS = 3
"""sys.getrefcount of an array of `_Recycled._arrays` that no tensor holds: the list, the loop variable and
getrefcount's own argument."""


class _Stopped(Exception):
    """The consumer stopped the stream while the host path waited for a buffer."""


class _CudaOps:
    """The CUDA calls of the store's side-stream path, in one place so that CPU tests can stand in for them."""

    pin = True
    """Gather into page-locked host buffers (required for a copy that overlaps the step)."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def on(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def copy(self, buf: torch.Tensor) -> torch.Tensor:
        """Host buffer → a new device tensor, asynchronously on the current (side) stream."""
        return buf.to(self.device, non_blocking=True)

    def hand_over(self, x: torch.Tensor, ready: torch.cuda.Event) -> None:
        """Consumer side: its stream waits for the batch's copy and conversion before using `x`."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        x.record_stream(current)  # its memory came from the side stream's pool


class ActivationStore:
    """Endless shuffled batches `[batch, d_in]` float32 from `acts/<hookpoint>` of an activation file.

    Rows stay in the file's dtype (float16/bfloat16: half the bytes of float32) through every host copy. Streaming a
    plainly stored dataset (activations.mapped), the prefetch thread gathers each batch's rows straight from a
    read-only memory map of the file into a batch buffer, while a reader thread checks the next shuffle groups for
    non-finite values (paging them in); otherwise the reader thread reads the next groups through h5py into reused
    buffers and the gathers come from those. The batch is then converted and scaled on the device: with CUDA, the
    batch buffers are a ring of pinned host buffers copied on a side stream, so the copy overlaps the training step;
    on CPU a finisher thread converts batch n while batch n + 1 is gathered, into float32 arrays recycled once the
    consumer dropped them (`_Recycled`). The CPU threads run their torch ops single-threaded (beside the consumer's
    step; `_one_torch_thread`).

    How rows are ordered (the *stream*): the data rows `[seq_start*ctx, seq_stop*ctx)` are cut into blocks
    of whole HDF5 chunks. Each epoch permutes the blocks, groups them `buffer_blocks` at a time, and shuffles
    the usable rows of each group; batches are consecutive slices of the concatenated groups, running on into
    the next epoch (new permutation) when the file is exhausted. With `in_memory`, one group holds everything,
    i.e. a full shuffle per epoch.

    Why blocks and buffers rather than a random permutation of rows: reading random single rows from a
    chunked HDF5 dataset reads (and decompresses) a whole chunk per row, ~1000x slower than reading chunks in
    order. Contiguous chunk-aligned blocks keep reads sequential; mixing several blocks from random places in
    the file before shuffling breaks up the strong correlation between neighbouring positions of a sequence,
    so a batch holds tokens from many sequences instead of a few long runs of one.

    Positions whose token is the root attr `bos_token_id` are excluded (the cacher packs windows without
    padding, so BOS is the only special position). With `normalize`, batches are multiplied by `scale`,
    chosen so that the mean row norm of a sample is sqrt(d_in).
    """

    def __init__(
        self,
        path: str | Path,
        hookpoint: str,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        seq_range: tuple[int, int] | None = None,
        exclude_bos: bool = True,
        normalize: bool = False,
        in_memory: bool | Literal["auto"] = False,
        buffer_blocks: int = 16,
        block_rows: int | None = None,
        prefetch: int = 4,
        norm_sample: int = 8192,
        outlier_multiple: float | None = None,
        exclude_first_positions: int = 0,
        memory_map: bool = True,
    ):
        """
        path: the HDF5 activation file. hookpoint: name under `acts/` (as given to the cacher).
        batch_size: rows per batch. device: where batches land (pinned memory + non_blocking copy for CUDA).
        seed: fixes the stream. seq_range: `(start, stop)` sequences to use (default all), e.g. to hold out
        the last ones for evaluation. exclude_bos: drop positions holding `bos_token_id`.
        normalize: scale rows to mean norm sqrt(d_in) (see `scale`). in_memory: load the usable rows into RAM
        (True), stream (False), or load when they take at most half the available RAM in the file's dtype
        ("auto").
        buffer_blocks: blocks shuffled together. block_rows: rows per block (default: whole chunks, ~4 MiB).
        prefetch: batches prepared ahead by the background thread. norm_sample: rows used to estimate `scale`.
        outlier_multiple, exclude_first_positions: also drop massive-activation positions
        (activations.outliers.outlier_positions; `excluded_positions` says which, `n_outlier_rows` how many rows).
        memory_map: streaming, gather rows straight from a read-only memory map of the file when the dataset is
        stored plainly (no compression or filters, whole-row chunks; see activations.mapped); otherwise, or with
        False, read each shuffle group through h5py. The batches are the same either way.
        """
        self._outliers = (outlier_multiple, int(exclude_first_positions))
        self.path = Path(path)
        self.hookpoint = hookpoint
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.prefetch = max(1, int(prefetch))
        if self.batch_size <= 0:
            raise SAEToolkitError(f"batch_size={batch_size} must be positive")
        self._maps: _Maps | None = None
        self._file = open_acts(self.path)
        try:
            self._open(hookpoint, seq_range, exclude_bos, block_rows)
            self._prepare(in_memory, buffer_blocks, normalize, norm_sample)
            self._maps = self._map_file() if memory_map and not self.in_memory else None
        except BaseException:
            self._file.close()
            raise
        self.rows_done = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._ops: _CudaOps | None = None
        self._stop = threading.Event()

    def _prepare(self, in_memory: bool | Literal["auto"], buffer_blocks: int, normalize: bool,
                 norm_sample: int) -> None:
        """Choose streaming or in-memory, size the shuffle buffer, estimate the normalization scale."""
        n_usable_bytes = self.n_rows * self.d_in * self._dset.dtype.itemsize
        if in_memory == "auto":
            ram = available_ram()
            budget = _AUTO_IN_MEMORY_FALLBACK_BYTES if ram is None else int(_AUTO_IN_MEMORY_FRACTION * ram)
            in_memory = n_usable_bytes <= budget
        self.in_memory = bool(in_memory)
        self.buffer_blocks = len(self._blocks) if self.in_memory else max(1, int(buffer_blocks))
        # A buffer should hold several batches, or consecutive batches would come from the same few blocks.
        min_blocks = math.ceil(4 * self.batch_size / max(1, self._block_rows))
        self.buffer_blocks = min(len(self._blocks), max(self.buffer_blocks, min_blocks))
        self._memory: np.ndarray | None = None
        self._sample_grid: tuple[list[tuple[int, int]], np.ndarray] | None = None
        if self.in_memory:
            # Usable rows in file order; block b's rows start at _block_first[b].
            self._memory = np.concatenate([self._read_rows(lo, hi) for lo, hi in self._blocks])
        self._block_first = np.concatenate([[0], np.cumsum(self._block_counts)[:-1]])
        self.scale = 1.0
        if normalize:
            raw = self.sample(norm_sample, seed=self.seed + 7919, normalized=False)
            mean_norm = raw.norm(dim=1).mean().item()
            if not mean_norm > 0:
                raise SAEToolkitError(f"acts/{self.hookpoint} rows sampled from {self.path} are all zero; cannot "
                                      "normalize — check the file or train with normalize=False")
            self.scale = math.sqrt(self.d_in) / mean_norm

    # ---- opening and validating the file ----

    def _open(self, hookpoint: str, seq_range: tuple[int, int] | None, exclude_bos: bool,
              block_rows: int | None) -> None:
        f, where = self._file, str(self.path)
        present = hookpoints(f)
        if hookpoint not in present:
            raise SAEToolkitError(f"hookpoint {hookpoint!r} is not in {where!r}; it holds: "
                                  f"{', '.join(present) or 'none'}")
        self._dset = hookpoint_dataset(f, hookpoint)  # 2-d, a readable dtype, no fewer rows than n_seqs*context_size
        self.d_in = int(self._dset.shape[1])
        self.dtype = stored_dtype(self._dset)
        attrs = root_attrs(f)
        self.context_size = int(attrs["context_size"])
        self.n_seqs = int(attrs["n_seqs"])
        self.model = str(attrs.get("model", ""))
        self.bos_token_id = bos_token_id(attrs)
        start, stop = (0, self.n_seqs) if seq_range is None else (int(seq_range[0]), int(seq_range[1]))
        if not 0 <= start < stop <= self.n_seqs:
            raise SAEToolkitError(f"seq_range={seq_range} is not within the file's {self.n_seqs} complete "
                                  f"sequences; pass 0 <= start < stop <= {self.n_seqs}")
        self.seq_range = (start, stop)
        self._row_start, self._row_stop = start * self.context_size, stop * self.context_size
        # One bool per data row; tokens are small (4 bytes per row vs 2*d for the activations).
        if exclude_bos and self.bos_token_id is not None:
            self._keep = (f["tokens"][start:stop] != self.bos_token_id).reshape(-1)
        else:
            self._keep = np.ones(self._row_stop - self._row_start, dtype=bool)
        self.excluded_positions = outlier_positions(self._dset, self.context_size, (start, stop),
                                                    multiple=self._outliers[0], first=self._outliers[1],
                                                    dtype=self.dtype)
        outlier_rows = np.tile(self.excluded_positions, stop - start)
        self.n_outlier_rows = int((self._keep & outlier_rows).sum())
        self._keep &= ~outlier_rows
        self.n_rows = int(self._keep.sum())
        if self.n_rows < self.batch_size:
            raise SAEToolkitError(f"acts/{hookpoint} in {where!r} has {self.n_rows} usable rows (sequences "
                                  f"{start}..{stop}, BOS excluded) — fewer than one batch of {self.batch_size}; "
                                  "lower --batch-size or cache more tokens")
        self._chunk_rows = int(self._dset.chunks[0]) if self._dset.chunks else 1
        if block_rows is None:
            row_bytes = self.d_in * self._dset.dtype.itemsize
            block_rows = self._chunk_rows * max(1, _BLOCK_BYTES // (row_bytes * self._chunk_rows))
        self._block_rows = int(block_rows)
        self._blocks, self._block_counts = self._grid(self._block_rows)

    def _grid(self, size: int) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Row ranges `[lo, hi)` holding usable rows, cut at multiples of `size`, and their usable-row counts.

        Edges lie on a global grid, so blocks stay aligned to chunks even when seq_range starts mid-chunk;
        the first and last block are clipped to the range.
        """
        edges = range((self._row_start // size + 1) * size, self._row_stop, size)
        bounds = [self._row_start, *edges, self._row_stop]
        blocks = list(zip(bounds[:-1], bounds[1:]))
        counts = np.add.reduceat(self._keep, np.array(bounds[:-1]) - self._row_start).astype(np.int64)
        return [b for b, c in zip(blocks, counts) if c > 0], counts[counts > 0]

    def _read_rows(self, lo: int, hi: int) -> np.ndarray:
        """Usable rows of `[lo, hi)` in the stored dtype `[n, d_in]` (bfloat16: uint16 bits); raises on
        non-finite values."""
        rows = self._dset[lo:hi]
        self._check_finite(rows, lo)
        keep = self._keep[lo - self._row_start:hi - self._row_start]
        return rows if keep.all() else rows[keep]  # no copy when nothing is excluded

    def _check_finite(self, rows: np.ndarray, lo: int, name: str | None = None) -> None:
        """Raise naming the first row (file row `lo` + i) of `rows` (of acts/`name`, default the hookpoint) with a
        non-finite value."""
        # inf and nan are the values with every exponent bit set, i.e. where `bits & mask` reaches its largest value,
        # `mask`: one masked max over the integer bits, single-threaded (numpy's float16 math is emulated, and a
        # multi-threaded torch reduction can stall for milliseconds on a busy machine). Only a bad block pays for
        # the per-row pass that finds the row.
        mask = _EXPONENT_BITS["bfloat16" if self.dtype == "bfloat16" else rows.itemsize]
        bits = rows.view(f"u{rows.itemsize}")
        if bits.size == 0 or (bits & mask).max() < mask:
            return
        finite = ((bits & mask) != mask).all(axis=1)
        bad = lo + int(np.argmin(finite))
        seq, pos = divmod(bad, self.context_size)
        raise SAEToolkitError(f"acts/{name or self.hookpoint} in {self.path} has a non-finite value in row {bad} "
                              f"(sequence {seq}, position {pos}); re-cache the file (float16 overflow? use "
                              "--dtype bfloat16 or float32)")

    # ---- the stream ----

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        """Block indices of each shuffle group of `epoch`, in stream order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._blocks))
        return [order[i:i + self.buffer_blocks] for i in range(0, len(order), self.buffer_blocks)]

    def _group(self, epoch: int, g: int, group: np.ndarray, buffer: int = 0) -> tuple[_Source, np.ndarray]:
        """One shuffle group as `(source [m, d_in], index [n])`: its rows in stream order are `source[index]`.

        Streaming reads the group's blocks; in memory, the source is the loaded array and only indices move,
        so an epoch never copies the whole array. Memory-mapped, the source is the list of maps (`_map_file`) and
        the index `[n, maps]` holds each row's address in each map's rows view: nothing is read or copied here.
        """
        if self._memory is not None:
            source = self._memory
            index = np.concatenate([np.arange(self._block_first[b], self._block_first[b] + self._block_counts[b])
                                    for b in group])
        elif self._maps is not None:
            rows = self._map_group(group)
            rows = rows[np.random.default_rng([self.seed, epoch, g]).permutation(len(rows))]
            return self._maps, np.stack([m.offsets(rows) // self._unit for m, *_ in self._maps], axis=1)
        else:
            source, index = self._read_group(group, buffer)
        perm = np.random.default_rng([self.seed, epoch, g]).permutation(len(index))
        return source, index[perm]

    def _map_file(self) -> _Maps | None:
        """A map of each streamed dataset (see `_Maps`); None (read through h5py instead) when one of them cannot be
        mapped. Rows are gathered in the widest element that divides every address and column edge."""
        maps, edges = [], [0]
        for dset, name in self._streamed():
            m, why = MappedDataset.open(dset, self.path, (self._row_start, self._row_stop))
            if m is None:
                log.info("acts/%s: streaming through h5py reads, not a memory map: %s", name, why)
                return None
            maps.append((m, name))
            edges.append(edges[-1] + m.row_bytes)
        self._unit = next(u for u in (8, 4, 2, 1) if all(m.align % u == 0 for m, _ in maps)
                          and all(e % u == 0 for e in edges))
        self._checked = np.zeros(len(self._blocks), dtype=bool)  # blocks known finite (see _map_group)
        return [(m, name, slice(lo // self._unit, hi // self._unit), m.rows_view(self._unit))
                for (m, name), lo, hi in zip(maps, edges[:-1], edges[1:])]

    def _streamed(self) -> list[tuple[h5py.Dataset, str]]:
        """The datasets whose rows a batch holds, side by side, with their hookpoint names."""
        return [(self._dset, self.hookpoint)]

    def _map_group(self, group: np.ndarray) -> np.ndarray:
        """The file rows of the group's usable rows, in block order, once every row of its blocks is known finite.

        A block is checked the first time it comes up (reading each page: they are in memory when the batches gather
        them); the file is mapped read-only and does not change, so later passes only ask the kernel to bring the
        pages back in should they have been evicted (`MappedDataset.will_need`), without reading them here."""
        positions = []
        for b in group:
            lo, hi = self._blocks[b]
            for m, name, *_ in self._maps:
                if self._checked[b]:
                    m.will_need(lo, hi)
                    continue
                for first, rows in m.pieces(lo, hi):
                    self._check_finite(rows, first, name)
            self._checked[b] = True
            positions.append(lo + np.flatnonzero(self._keep[lo - self._row_start:hi - self._row_start]))
        return np.concatenate(positions)

    def _read_group(self, group: np.ndarray, buffer: int) -> tuple[np.ndarray, np.ndarray]:
        """Read the group's blocks straight into reusable buffer `buffer` (h5py read_direct: no intermediate array,
        no fresh pages to fault in) → (buffer, positions of the usable rows in it, in block order). BOS rows stay
        in the buffer and are skipped by the index instead of being copied out."""
        if self._buffers[buffer] is None:
            self._buffers[buffer] = np.empty((self.buffer_blocks * self._block_rows, self.d_in), self._dset.dtype)
        buf, at, positions = self._buffers[buffer], 0, []
        for b in group:
            lo, hi = self._blocks[b]
            dst = buf[at:at + hi - lo]
            self._dset.read_direct(dst, np.s_[lo:hi])
            self._check_finite(dst, lo)
            positions.append(at + np.flatnonzero(self._keep[lo - self._row_start:hi - self._row_start]))
            at += hi - lo
        return buf, np.concatenate(positions)

    def _schedule(self, rows_done: int) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """`(epoch, g, group, offset)` of each group the stream still needs from `rows_done` rows in; offset: rows of
        the group already handed out. Groups before that are skipped without reading: resuming costs only the reads
        it needs."""
        epoch, offset = divmod(rows_done, self.n_rows)
        while True:
            for g, group in enumerate(self._epoch_groups(epoch)):
                n = int(self._block_counts[group].sum())
                if offset >= n:
                    offset -= n
                    continue
                yield epoch, g, group, offset
                offset = 0
            epoch += 1

    def _row_stream(self, rows_done: int, reader: ThreadPoolExecutor | None = None
                    ) -> Iterator[tuple[_Source, np.ndarray]]:
        """Consecutive `(source, index)` pieces of the stream (rows `source[index]`), starting `rows_done` rows in.

        The caller must be done with a piece (its rows gathered) before it asks for the next one: streaming groups
        are read into _N_BUFFERS reusable buffers in turn, and with a `reader` thread the next _READ_AHEAD groups are
        read (h5py releases the GIL) while the caller gathers the current one.
        """
        self._buffers: list[np.ndarray | None] = [None] * _N_BUFFERS
        jobs = ((*job, k % _N_BUFFERS) for k, job in enumerate(self._schedule(rows_done)))
        if reader is None:
            for epoch, g, group, offset, buffer in jobs:
                source, index = self._group(epoch, g, group, buffer)
                yield source, index[offset:]
            return  # not reached: the schedule is endless
        # The group handed out and the ones read ahead hold distinct buffers (_N_BUFFERS = _READ_AHEAD + 1); the
        # next read is submitted only once the caller has come back, i.e. is done with the previous group's buffer.
        ahead: deque[tuple[Future, int]] = deque()
        try:
            while True:
                while len(ahead) <= _READ_AHEAD:
                    epoch, g, group, offset, buffer = next(jobs)
                    ahead.append((reader.submit(self._group, epoch, g, group, buffer), offset))
                future, offset = ahead.popleft()
                source, index = future.result()
                yield source, index[offset:]
        finally:
            for future, _ in ahead:  # a read already running finishes; the reader's shutdown waits for it
                future.cancel()

    def _batches(self, rows_done: int, new_buffer: Callable[[], torch.Tensor],
                 reader: ThreadPoolExecutor | None = None) -> Iterator[torch.Tensor]:
        """Batches of the stream from `rows_done` rows in, each gathered straight into `new_buffer()` ([batch, width]
        in the stored dtype): the one host copy of a row after the read. A piece is gathered as soon as it arrives,
        so its group buffer is free when the next piece is asked for, however many groups a batch spans. The caller
        must be done with a yielded buffer before it asks for the next batch."""
        out, at = None, 0
        for source, index in self._row_stream(rows_done, reader):
            if isinstance(source, np.ndarray):  # rows source[index]
                parts = [(_torch_rows(source, self.dtype), torch.from_numpy(index.astype(np.int64, copy=False)), None)]
            else:  # mapped: each dataset's rows index[:, j] of its rows view, into its columns (in _unit elements)
                # [n, 1, width] views: torch's gather from a non-contiguous 3-d source copies whole rows (measured
                # ~30 % faster than from the same view as [n, width])
                parts = [(view.unsqueeze(1), torch.from_numpy(np.ascontiguousarray(index[:, j])), cols)
                         for j, (_, _, cols, view) in enumerate(source)]
            i = 0
            while i < len(index):
                if out is None:
                    out, at = new_buffer(), 0
                    out_units = out if self._maps is None else out.view(self._maps[0][3].dtype)
                take = min(self.batch_size - at, len(index) - i)
                for src, idx, cols in parts:
                    dst = out[at:at + take] if cols is None else out_units[at:at + take, cols].unsqueeze(1)
                    torch.index_select(src, 0, idx[i:i + take], out=dst)
                at, i = at + take, i + take
                if at == self.batch_size:
                    yield out
                    out = None

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh stored-dtype batch → float32 scaled by `scale`, on x's device (CUDA: a kernel on the side stream).
        A float32 `x` is scaled in place: the callers hand over a tensor nobody else holds."""
        return self._scale_(x.to(torch.float32))

    def _scale_(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 batch nobody else holds, scaled by `scale` in place."""
        return x.mul_(self.scale) if self.scale != 1.0 else x

    @contextlib.contextmanager
    def _reader(self) -> Iterator[ThreadPoolExecutor | None]:
        """The thread that reads streaming groups ahead of the gathers (None in memory: nothing to read)."""
        if self._memory is not None:
            yield None
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="ActivationStore-read")  # h5py and numpy only, no torch
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _produce(self, rows_done: int, out: queue.Queue, stop: threading.Event, ops: _CudaOps | None,
                 set_up: threading.Event) -> None:
        """Prefetch thread: fill `out` with device batches (or the exception that ended the stream) until `stop`.
        `set_up` is set once the host path runs single-threaded torch ops (see _one_torch_thread); with CUDA the
        consumer's step runs on the GPU, and the gathers keep the default threads, as before."""

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            if ops is None:
                _one_torch_thread()
            with self._reader() as reader, self._finisher(ops is None) as finisher:
                set_up.set()
                if ops is not None:
                    self._produce_cuda(rows_done, put, reader, ops)
                else:
                    self._produce_host(rows_done, put, reader, finisher)
        except BaseException as e:  # handed to the consumer, which re-raises it in the training thread
            put(e)
        finally:
            set_up.set()

    def _host_buffer(self, pin: bool = False) -> torch.Tensor:
        """An empty [batch, d_in] host tensor in the stored dtype."""
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else getattr(torch, self._dset.dtype.name)
        return torch.empty(self.batch_size, self.d_in, dtype=dtype, pin_memory=pin)

    @contextlib.contextmanager
    def _finisher(self, host: bool) -> Iterator[ThreadPoolExecutor | None]:
        """The host path's second thread (None for CUDA): it converts and scales each gathered batch while the
        prefetch thread gathers the next one, so the two halves of a batch's CPU work run on two cores. Started and
        made single-threaded here, before `next_batch` puts torch's default thread count back."""
        if not host:
            yield None
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="ActivationStore-finish")
        try:
            pool.submit(_one_torch_thread).result()
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _produce_host(self, rows_done: int, put: Callable[[object], bool], reader: ThreadPoolExecutor | None,
                      finisher: ThreadPoolExecutor) -> None:
        """Gather each batch into one of _HOST_RING reused stored-dtype buffers; the finisher converts it to a new
        float32 tensor and hands it out (in order: one finisher thread). A buffer is refilled only once its previous
        batch was converted. A float32 file's batch is gathered into a new tensor instead: it is handed out as it is
        (scaled in place)."""
        fresh = self._host_buffer().dtype == torch.float32
        ring = [] if fresh else [self._host_buffer() for _ in range(_HOST_RING)]
        done: deque[Future] = deque()  # the finisher's jobs not yet waited for, oldest first
        turn = [0]
        # the float32 batches handed out: recycled once the consumer dropped them (no page faults per batch)
        outputs = _Recycled((self.batch_size, self._host_buffer().shape[1]), self.prefetch + _HOST_RING + 2)

        def finish(raw: torch.Tensor) -> bool:
            x = self._scale_(raw if fresh else outputs.take().copy_(raw))
            return put((x.to(self.device), None))

        def new_buffer() -> torch.Tensor:
            if fresh:
                return outputs.take()
            while len(done) >= _HOST_RING:  # the buffer about to be refilled is the oldest job's
                if not done.popleft().result():  # (re-raises the finisher's error here)
                    raise _Stopped
            return ring[turn[0] % _HOST_RING]

        try:
            with contextlib.closing(self._batches(rows_done, new_buffer, reader)) as batches:
                for raw in batches:
                    done.append(finisher.submit(finish, raw))
                    turn[0] += 1
                    while done and done[0].done():
                        if not done.popleft().result():
                            return
        except _Stopped:
            return
        except BaseException:
            # the batches gathered before the error reach the consumer before it does, as they would without a
            # finisher (a read error or a non-finite row comes after the batches of the rows before it)
            while done:
                done.popleft().result()
            raise

    def _produce_cuda(self, rows_done: int, put: Callable[[object], bool], reader: ThreadPoolExecutor | None,
                      ops: _CudaOps) -> None:
        """Gather into a ring of pinned buffers, copy and convert on a side stream; each batch travels with the
        event the consumer's stream waits on. A buffer is refilled only after its previous copy has finished."""
        stream = ops.stream()
        ring = [(self._host_buffer(pin=ops.pin), ops.event()) for _ in range(self.prefetch + 2)]
        turn = [-1]

        def new_buffer() -> torch.Tensor:
            turn[0] += 1
            buf, copied = ring[turn[0] % len(ring)]
            copied.synchronize()  # the copy out of this buffer (prefetch + 2 batches ago) is done
            return buf

        with contextlib.closing(self._batches(rows_done, new_buffer, reader)) as batches:
            for buf in batches:
                copied = ring[turn[0] % len(ring)][1]
                with ops.on(stream):
                    x = self._finish(ops.copy(buf))
                    copied.record(stream)
                if not put((x, copied)):
                    return

    def _device_ops(self) -> _CudaOps | None:
        """The side-stream calls for a CUDA device; None: the host path. (Tests stand in for them on CPU.)"""
        return _CudaOps(self.device) if self.device.type == "cuda" else None

    # ---- public API ----

    def next_batch(self) -> torch.Tensor:
        """The next batch `[batch, d_in]` float32 on `device` (scaled by `scale`)."""
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._ops = self._device_ops()
            set_up = threading.Event()
            n_threads = torch.get_num_threads()  # also settles this thread's own team size before the workers run
            self._thread = threading.Thread(target=self._produce,
                                            args=(self.rows_done, self._queue, self._stop, self._ops, set_up),
                                            name="ActivationStore-prefetch", daemon=True)
            self._thread.start()
            set_up.wait()
            torch.set_num_threads(n_threads)  # the default for threads started later (see _one_torch_thread)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop_prefetch()
            raise item
        item, ready = item
        if ready is not None:  # CUDA: order the side stream's copy before the consumer's kernels
            self._ops.hand_over(item, ready)
        epoch = self.rows_done // self.n_rows
        self.rows_done += self.batch_size
        if (self.rows_done - 1) // self.n_rows > epoch:
            # Loud the first time (the caller may not expect repeats), quiet after that (one line per pass).
            log.log(logging.WARNING if epoch == 0 else logging.INFO,
                    "acts/%s: starting pass %d over %s (%d usable rows) with a new shuffle — more tokens were "
                    "asked for than the file holds", self.hookpoint, epoch + 2, self.path.name, self.n_rows)
        return item

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Passes over the usable rows so far (fractional)."""
        return self.rows_done / self.n_rows

    def sample(self, n: int, *, seed: int = 0, normalized: bool = True) -> torch.Tensor:
        """`n` usable rows `[n, d_in]` float32 on CPU, from random chunks of the file; a function of `seed` only.

        For initialising `b_dec`, estimating `scale` and resampling dead latents. `normalized` applies `scale`.
        With fewer usable rows than `n`, returns all of them.
        """
        rng = np.random.default_rng([self.seed, 1_000_003, seed])
        need = min(n, self.n_rows)
        if self._memory is not None:
            rows = self._memory[np.sort(rng.choice(self.n_rows, size=need, replace=False))]
        else:
            # Whole chunks (the cheapest unit to read) from random places: rows from many sequences, unlike
            # a few big blocks, at one chunk read per chunk.
            if self._sample_grid is None:
                self._sample_grid = self._grid(self._chunk_rows)
            windows, counts = self._sample_grid
            order = rng.permutation(len(windows))
            chosen = np.sort(order[: int(np.searchsorted(np.cumsum(counts[order]), need)) + 1])
            rows = np.concatenate([self._read_rows(*windows[w]) for w in chosen])
        rows = rows[rng.permutation(len(rows))[:need]]
        x = _torch_rows(np.ascontiguousarray(rows), self.dtype).to(torch.float32)
        return x * self.scale if normalized else x

    def state_dict(self) -> dict:
        """The stream position (rows handed out) plus what must match for it to mean the same thing."""
        return {"rows_done": self.rows_done, "seed": self.seed, "n_rows": self.n_rows,
                "seq_range": list(self.seq_range), "batch_size": self.batch_size,
                "buffer_blocks": self.buffer_blocks, "block_rows": self._block_rows, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream from `state` (written by `state_dict` on a store opened the same way)."""
        for key in ("seed", "n_rows", "seq_range", "batch_size", "buffer_blocks", "block_rows"):
            have = list(self.seq_range) if key == "seq_range" else self.state_dict()[key]
            if state[key] != have:
                raise SAEToolkitError(f"cannot resume the activation stream: {key} was {state[key]} and is now "
                                      f"{have}; resume with the same file, hookpoint, seq_range, batch size and seed")
        self._stop_prefetch()
        self.rows_done = int(state["rows_done"])
        self.scale = float(state["scale"])

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def close(self) -> None:
        """Stop the prefetch thread and close the file (and its map)."""
        self._stop_prefetch()
        self._maps = None
        self._file.close()

    @property
    def memory_mapped(self) -> bool:
        """Whether streaming gathers rows from a memory map of the file (see `memory_map`) rather than h5py reads."""
        return self._maps is not None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, {self.hookpoint!r}, d_in={self.d_in}, rows={self.n_rows}, "
                f"batch_size={self.batch_size}, scale={self.scale:.4g}, in_memory={self.in_memory})")
