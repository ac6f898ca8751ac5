"""GroupReader: ActivationStore's shuffle groups read from the file and gathered into batch buffers.

A group's blocks are read through h5py into reused buffers, or located in a read-only memory map of the file
(activations.mapped); either way every row is checked for non-finite values once, and `_batches` gathers each
batch's rows straight into a batch buffer: the one host copy of a row after the read.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import h5py
import numpy as np
import torch

from sae_toolkit.activations.mapped import MappedDataset
from sae_toolkit.errors import SAEToolkitError

# The store's logger, as before the store was split into modules: users and tests filter on that name.
log = logging.getLogger("sae_toolkit.activations.store")

_EXPONENT_BITS: dict[str | int, int] = {2: 0x7C00, "bfloat16": 0x7F80, 4: 0x7F800000, 8: 0x7FF0000000000000}
"""The exponent bits of each float format (by itemsize; bfloat16 by name): all set = inf or nan."""
_READ_AHEAD = 2
"""Streaming groups the reader thread reads ahead of the one being gathered: a group read (~16 blocks) then
overlaps the gathers and conversions of the previous groups' batches instead of stalling them."""
_N_BUFFERS = _READ_AHEAD + 1
"""Reusable group buffers: the group being gathered plus the ones read ahead."""
_Maps = list[tuple[MappedDataset, str, slice, torch.Tensor]]
"""Each streamed dataset's map, hookpoint name, the columns of a batch row its rows fill and the rows view they are
gathered from (both in elements of `ActivationStore._unit` bytes)."""
_Source = np.ndarray | _Maps
"""Where a group's rows are gathered from: an array (a read buffer, or the in-memory rows) or the file's maps."""


def _torch_rows(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows as a tensor without a copy: float16/float32 as they are, bfloat16's uint16 bits viewed."""
    t = torch.from_numpy(rows)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class GroupReader:
    """ActivationStore's reads and gathers (a base class of the store, not used on its own).

    Reads the file attributes the store sets when it opens the file (`_dset`, `_keep`, `_blocks`, ...) and the
    order of StreamOrder (`_schedule`, `_epoch_groups`).
    """

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
