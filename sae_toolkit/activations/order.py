"""StreamOrder: which rows ActivationStore hands out, and in which order — a pure function of (seed, rows_done).

The data rows are cut into blocks of whole HDF5 chunks (`_grid`); each epoch permutes the blocks and groups them
`buffer_blocks` at a time (`_epoch_groups`); `_schedule` walks the groups from any stream position without
reading what lies before it, which is what makes `state_dict()` one integer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class StreamOrder:
    """ActivationStore's block grid and group order (a base class of the store, not used on its own).

    Reads the store's `seed`, `n_rows`, `buffer_blocks`, `_blocks`, `_block_counts`, `_keep`, `_row_start` and
    `_row_stop` (set when the store opens the file).
    """

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

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        """Block indices of each shuffle group of `epoch`, in stream order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._blocks))
        return [order[i:i + self.buffer_blocks] for i in range(0, len(order), self.buffer_blocks)]

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
