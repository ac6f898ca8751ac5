"""MappedDataset: the rows of an unfiltered HDF5 dataset, gathered straight from a read-only memory map of the file.

The streaming ActivationStore reads each shuffle group with h5py into a buffer and then gathers its batches out of
that buffer: two passes over every row. An uncompressed dataset's rows already lie in the file as plain arrays
(one per chunk, or one for a contiguous dataset), so a map of the file serves them from the page cache with no
read copy and no buffer: a batch is one gather by byte offset.

    >>> m, why = MappedDataset.open(f["acts/mlp_out.6"], "acts.h5", (0, 4096))  # doctest: +SKIP
    >>> m.rows_view(1).index_select(0, torch.from_numpy(m.offsets(rows)))  # doctest: +SKIP
    ... # [len(rows), d * itemsize] uint8: the stored bytes of those rows

Anything else (filters or compression, chunks narrower than a row, external or virtual storage, a non-default
file driver, unallocated chunks, another byte order) is refused with the reason, and the caller reads through h5py.
The map is opened read-only: the file is never written. Like any reader, it needs the file not to be truncated
while it streams (through a map, reading a page cut off the file is a crash, not an error).
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from h5py import h5d

_UNITS = (8, 4, 2, 1)
_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_N_CHECKED_ROWS = 8
"""Rows compared byte for byte with an h5py read when a map is opened: a wrong offset (e.g. an HDF5 library that
reports chunk addresses without the user block) then falls back instead of returning wrong rows."""


class MappedDataset:
    """The stored rows `[lo, hi)` of a 2-d dataset, located in a read-only memory map of its file.

    `rows_view(unit)` is the whole file as overlapping rows (row o = the `row_bytes` bytes at byte `o * unit`), so
    that one `index_select` by `offsets(rows) // unit` gathers rows from any chunk. Build it with `open`.
    """

    def __init__(self, path: str | Path, dset: h5py.Dataset, chunk_rows: int, chunk_addr: np.ndarray):
        """chunk_rows: rows per stored piece (the whole dataset when contiguous); chunk_addr: byte address of each
        piece in the file, indexed by first row // chunk_rows (-1: not needed)."""
        self.path = Path(path)
        self.dtype = np.dtype(dset.dtype)
        self.d = int(dset.shape[1])
        self.row_bytes = self.d * self.dtype.itemsize
        self.chunk_rows = int(chunk_rows)
        self._chunk_addr = chunk_addr.astype(np.int64)
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the descriptor
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)  # read-only
        used = self._chunk_addr[self._chunk_addr >= 0]
        self.align = next(u for u in _UNITS if self.row_bytes % u == 0 and not (used % u).any())
        """The largest of 8, 4, 2, 1 bytes dividing the row size and every address: the widest `rows_view` unit."""

    def rows_view(self, unit: int) -> torch.Tensor:
        """The file as overlapping rows in `unit`-byte elements (a divisor of `align`), read-only:
        `[file bytes // unit - row_bytes // unit + 1, row_bytes // unit]`, row o = the row stored at byte o * unit.

        Wider elements gather faster (from the same non-contiguous view, 8-byte elements measured ~1.6x faster
        than 1-byte ones).
        """
        if self.align % unit:
            raise ValueError(f"unit {unit} does not divide the map's alignment {self.align}")
        with warnings.catch_warnings():  # torch warns that the array is read-only: the view is only read from
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(self._bytes[:self._bytes.size // unit * unit]).view(_UNIT_DTYPES[unit])
        width = self.row_bytes // unit
        return torch.as_strided(flat, (flat.numel() - width + 1, width), (1, 1))

    @classmethod
    def open(cls, dset: h5py.Dataset, path: str | Path, rows: tuple[int, int]) -> tuple[MappedDataset | None, str]:
        """(the map of rows `[lo, hi)` of `dset`, stored in the file at `path`, "") or (None, why it cannot be
        mapped)."""
        lo, hi = rows
        why = _unmappable(dset)
        if why:
            return None, why
        dcpl = dset.id.get_create_plist()
        size = Path(path).stat().st_size
        row_bytes = int(dset.shape[1]) * dset.dtype.itemsize
        if dcpl.get_layout() == h5d.CONTIGUOUS:
            addr = dset.id.get_offset()
            if addr is None or dset.id.get_storage_size() < dset.shape[0] * row_bytes:
                return None, "its storage is not allocated"
            chunk_rows, chunk_addr = max(1, int(dset.shape[0])), np.array([addr], dtype=np.int64)
            chunk_bytes = int(dset.shape[0]) * row_bytes
        else:
            chunk_rows = int(dset.chunks[0])
            chunk_bytes = chunk_rows * row_bytes
            chunk_addr = np.full(-(-hi // chunk_rows), -1, dtype=np.int64)
            for first, addr, nbytes in _chunks(dset):
                if first // chunk_rows < len(chunk_addr):
                    if nbytes != chunk_bytes:
                        return None, f"a chunk holds {nbytes} bytes, not {chunk_bytes}"
                    chunk_addr[first // chunk_rows] = addr
            needed = chunk_addr[lo // chunk_rows:]
            if (needed < 0).any():
                return None, "some chunks are not allocated (never written)"
            chunk_addr[:lo // chunk_rows] = -1
        used = chunk_addr[chunk_addr >= 0]
        if int(used.max()) + chunk_bytes > size:
            return None, f"its storage runs past the end of the file ({size} bytes)"
        try:
            m = cls(path, dset, chunk_rows, chunk_addr)
        except (OSError, ValueError) as e:  # a file system without mmap, an address space too small
            return None, f"the file cannot be memory-mapped ({e})"
        check = np.unique(np.linspace(lo, hi - 1, _N_CHECKED_ROWS).astype(np.int64))
        got = m.rows_view(1).index_select(0, torch.from_numpy(m.offsets(check))).numpy()
        if not np.array_equal(got, np.ascontiguousarray(dset[check.tolist()]).view(np.uint8).reshape(len(check), -1)):
            return None, "rows read through the map differ from h5py's (unexpected chunk addresses)"
        return m, ""

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        """Byte address in the file of each row of `rows` (int64, same shape); // unit: the index into
        `rows_view(unit)`."""
        rows = np.asarray(rows, dtype=np.int64)
        chunk = rows // self.chunk_rows
        return self._chunk_addr[chunk] + (rows - chunk * self.chunk_rows) * self.row_bytes

    def will_need(self, lo: int, hi: int) -> None:
        """Ask the kernel to read rows `[lo, hi)` into the page cache in the background (if evicted): no copy, no
        wait; the gathers then find them in memory."""
        if not hasattr(self._mmap, "madvise") or not hasattr(mmap, "MADV_WILLNEED"):
            return
        for first, rows in self.pieces(lo, hi):
            at = int(self.offsets(np.array(first)))
            start = at - at % mmap.PAGESIZE
            with contextlib.suppress(OSError):  # only advice: the gathers fault the pages in anyway
                self._mmap.madvise(mmap.MADV_WILLNEED, start, at + rows.nbytes - start)

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows `[n, d]` in the stored dtype) for each run of rows `[lo, hi)` contiguous in the file:
        views of the map (reading them faults the pages in), no copies."""
        while lo < hi:
            stop = min(hi, (lo // self.chunk_rows + 1) * self.chunk_rows)
            at = int(self.offsets(np.array(lo)))
            raw = self._bytes[at:at + (stop - lo) * self.row_bytes]
            yield lo, np.asarray(raw).view(self.dtype).reshape(stop - lo, self.d)
            lo = stop


def _unmappable(dset: h5py.Dataset) -> str:
    """Why `dset`'s rows cannot be served from a map of its file ("" when they can)."""
    dcpl = dset.id.get_create_plist()
    layout = dcpl.get_layout()
    if dset.ndim != 2:
        return f"it has {dset.ndim} dimensions"
    if dset.file.driver != "sec2":
        return f"the file uses the {dset.file.driver!r} driver"
    if layout not in (h5d.CONTIGUOUS, h5d.CHUNKED):
        return "its layout is compact or virtual"
    if dcpl.get_external_count():
        return "its data lives in external files"
    if dcpl.get_nfilters():
        return "it is compressed or filtered"
    if layout == h5d.CHUNKED and dset.chunks[1] != dset.shape[1]:
        return f"its chunks {dset.chunks} split rows"
    order = dset.dtype.byteorder
    if order not in ("=", "|") and (order == ">") != (sys.byteorder == "big"):
        return f"it is stored in another byte order ({dset.dtype.str})"
    if dset.dtype.kind not in "fiu":
        return f"its dtype {dset.dtype} is not a plain number"
    return ""


def _chunks(dset: h5py.Dataset) -> Iterator[tuple[int, int, int]]:
    """(first row, byte address, stored bytes) of every allocated chunk."""
    found: list[tuple[int, int, int]] = []
    if hasattr(dset.id, "chunk_iter"):  # one pass over the chunk index (HDF5 >= 1.12.3)
        dset.id.chunk_iter(lambda c: found.append((c.chunk_offset[0], c.byte_offset, c.size)))
    else:
        for i in range(dset.id.get_num_chunks()):
            c = dset.id.get_chunk_info(i)
            found.append((c.chunk_offset[0], c.byte_offset, c.size))
    return iter(found)


__all__ = ["MappedDataset"]
