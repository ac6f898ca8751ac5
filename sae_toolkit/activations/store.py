"""ActivationStore: shuffled, normalized batches of one hookpoint's activations, streamed from an HDF5 file.

The file is the format of DESIGN.md §3 (any writer, not only our cacher). Batches are a pure function of
`(seed, rows_done)`, so `state_dict()` is one integer and a resumed run sees exactly the batches it would have.

The store is put together from three parts, one module each: the row order (activations.order, StreamOrder), the
reads and gathers (activations.groups, GroupReader) and the threads that hand batches to the device
(activations.prefetch, Prefetcher); this module opens and checks the file and holds the public API.

    >>> store = ActivationStore("acts.h5", "mlp_out.6", batch_size=4096, device="cuda")  # doctest: +SKIP
    >>> x = store.next_batch()  # [batch, d_in] float32 on the device, BOS positions excluded
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

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
from sae_toolkit.activations.groups import GroupReader, _Maps, _torch_rows
from sae_toolkit.activations.order import StreamOrder
from sae_toolkit.activations.outliers import outlier_positions
from sae_toolkit.activations.prefetch import (
    Prefetcher,
    _CudaOps,
    _Recycled,  # noqa: F401 (re-exported: tests import it from here)
)
from sae_toolkit.errors import SAEToolkitError

log = logging.getLogger(__name__)

_BLOCK_BYTES = 4 << 20
"""Target stored bytes per block: a few MiB makes one contiguous HDF5 read cheap relative to its fixed cost."""
_AUTO_IN_MEMORY_FRACTION = 0.5
"""`in_memory="auto"` loads the usable rows (in the file's dtype) when they take at most this share of the RAM
available when the store opens."""
_AUTO_IN_MEMORY_FALLBACK_BYTES = 2 << 30
"""The budget when the available RAM cannot be read (not Linux)."""


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


class ActivationStore(Prefetcher, GroupReader, StreamOrder):
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
