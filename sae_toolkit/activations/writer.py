"""The HDF5 activation file on the writing side (DESIGN §3): create, grow, trim, background batch writer.

Reading and checking a file is format.py; this module owns how the file is laid out and committed.
The datasets start empty and grow batch by batch, so a file ends at the size of what it holds (within one
chunk) even when ``--tokens`` asks for far more than the corpus has.
"""

from __future__ import annotations

import errno
import json
import math
import queue
import sys
import threading
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_toolkit.activations.format import FORMAT, FORMAT_VERSION
from sae_toolkit.activations.format import read_root_attrs as read_root_attrs  # re-exported: its home was here
from sae_toolkit.errors import RunFailure

if TYPE_CHECKING:
    import h5py

    from sae_toolkit.activations.config import CacheConfig
    from sae_toolkit.model.hookpoints import Hookpoint

# ~1 MiB chunks: one chunk per random block read by the store, few enough chunks for fast sequential reads.
_CHUNK_BYTES = 1 << 20


def chunk_rows(d: int, itemsize: int, total_rows: int) -> int:
    """Rows per chunk: a power of two near 1 MiB of data, at most the dataset's rows."""
    rows = 1 << max(0, round(math.log2(max(1, _CHUNK_BYTES // (d * itemsize)))))
    return max(1, min(rows, total_rows))


def dataset_props() -> h5py.h5p.PropDCID:
    """Chunk space allocated when a dataset is created or grown, not on the first write: the chunk index
    changes only in the writer's resize step, before the rows, so a writer killed mid-batch (SIGKILL) leaves
    consistent metadata, and only raw rows past ``n_seqs`` — which are not data — can be half written.
    With fill_time="never" nothing is written for rows that never arrive."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def create_file(
    out: Path, cfg: CacheConfig, identity: dict, tokenizer, hookpoints: list[Hookpoint], widths: dict[str, int]
) -> None:
    """A new file with every root attr, an empty ``tokens`` and one empty ``acts/<name>`` per hookpoint.

    Chunks are sized for the target; the Writer grows the datasets as rows arrive.

    ``identity`` holds the canonical model and dataset specs; ``widths`` the activation width d per hookpoint.
    """
    import h5py

    from sae_toolkit import __version__
    from sae_toolkit.model.corpus import special_ids

    target, ctx = cfg.n_seqs_target, cfg.context_size
    bos, eos = special_ids(tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {**asdict(cfg), **identity, "out": str(out)}
    with h5py.File(out, "x") as f:
        f.attrs.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            model=identity["model"],
            dataset=identity["dataset"],
            context_size=ctx,
            n_seqs=0,
            n_seqs_target=target,
            tokenizer=identity["model"],
            bos_token_id=-1 if bos is None else bos,
            eos_token_id=-1 if eos is None else eos,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            toolkit_version=__version__,
            config=json.dumps(config),
            corpus_exhausted=False,
        )
        f.create_dataset(
            "tokens",
            (0, ctx),
            np.int32,
            chunks=(chunk_rows(ctx, 4, target), ctx),
            maxshape=(None, ctx),
            dcpl=dataset_props(),
            fill_time="never",
        )
        storage = np.uint16 if cfg.dtype == "bfloat16" else np.dtype(cfg.dtype)
        for hp in hookpoints:
            d = widths[hp.name]
            rows = chunk_rows(d, np.dtype(storage).itemsize, target * ctx)
            dset = f.create_dataset(
                f"acts/{hp.name}",
                (0, d),
                storage,
                chunks=(rows, d),
                maxshape=(None, d),
                dcpl=dataset_props(),
                fill_time="never",
            )
            dset.attrs.update(hookpoint=hp.name, module=hp.module_name, io=hp.io, d=d, dtype=cfg.dtype)


def grow_file(out: Path, cfg: CacheConfig) -> int:
    """On resume, the sequences to reach: the file's target, or a larger --tokens (recorded; the Writer grows
    the datasets as rows arrive)."""
    import h5py

    with h5py.File(out, "r+") as f:
        target = max(cfg.n_seqs_target, int(f.attrs["n_seqs_target"]))
        f.attrs["n_seqs_target"] = target
        stored = json.loads(f.attrs["config"])
        f.attrs["config"] = json.dumps({**stored, "tokens": max(cfg.tokens, stored["tokens"])})
    return target


def trim_file(out: Path, n_seqs: int, cfg: CacheConfig) -> None:
    """The corpus ran out: drop the rows reserved for the missing windows, mark the file, say so."""
    import h5py

    with h5py.File(out, "r+") as f:
        f["tokens"].resize(n_seqs, axis=0)
        for dset in f["acts"].values():
            dset.resize(n_seqs * cfg.context_size, axis=0)
        f.attrs["n_seqs_target"] = n_seqs
        f.attrs["corpus_exhausted"] = True
    print(
        f"warning: the corpus ran out after {n_seqs} windows ({n_seqs * cfg.context_size} tokens), fewer than "
        f"the {cfg.tokens} tokens asked for; {out} holds what there was",
        file=sys.stderr,
    )


class Writer:
    """Writes batches to the HDF5 file on a background thread, overlapping the next forward pass.

    Order per batch: grow the datasets → rows → flush → ``n_seqs`` attr → flush, so ``n_seqs`` only ever
    counts flushed rows. The first failed write stops the thread and is raised by the next ``put``/``close``
    as one RunFailure; the file then still says truthfully how many sequences it holds, so ``--resume`` works.
    The queue holds two batches: enough to hide a slow write, bounded so memory stays flat.
    """

    def __init__(self, out: Path, committed: int = 0) -> None:
        """out: the file made by ``create_file``; committed: its ``n_seqs`` now."""
        self.out = out
        self.committed = committed
        """Sequences whose rows are flushed and counted in ``n_seqs``."""
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self._raised = False
        self.thread = threading.Thread(target=self._run, name="sae-cache-writer", daemon=True)
        self.thread.start()

    def put(self, seq: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        """Queue sequences [seq, seq + len(tokens)) for writing; raises the first failed write as a RunFailure."""
        self._check()
        self._send((seq, tokens, acts))
        self._check()

    def close(self) -> None:
        """Write and commit everything queued, stop the thread; raise a write error not raised yet."""
        self._send(None)
        self.thread.join()
        self._check()

    def _send(self, item: object) -> None:
        # A thread that died (could not open the file, failed a write) no longer drains the queue: never wait on it.
        while self.thread.is_alive():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _check(self) -> None:
        if self.error is not None and not self._raised:
            self._raised = True
            raise write_failure(self.error, self.out, self.committed) from None

    def _run(self) -> None:
        import h5py

        try:
            # No raw-data chunk cache: every row goes to the file inside the write call, so a failed write
            # (ENOSPC) raises there. With a cache, h5py flushed chunks when a dataset handle was garbage
            # collected, ignored the error ("Exception ignored in ObjectID.__dealloc__"), committed n_seqs
            # over rows never written, and the next flush touched the half-closed dataset and segfaulted.
            f = h5py.File(self.out, "r+", rdcc_nbytes=0)
        except BaseException as e:  # reported by put()/close(); the thread ends, _send stops waiting
            self.error = e
            return
        try:
            tokens_dset, acts = f["tokens"], {name: f["acts"][name] for name in f["acts"]}
            ctx = tokens_dset.shape[1]
            while (item := self.queue.get()) is not None:
                seq, tokens, rows = item
                end = seq + len(tokens)
                # each dataset on its own: a writer killed between two resizes leaves them at different lengths
                if end > tokens_dset.shape[0]:
                    tokens_dset.resize(end, axis=0)
                for dset in acts.values():
                    if end * ctx > dset.shape[0]:
                        dset.resize(end * ctx, axis=0)
                tokens_dset[seq:end] = tokens
                for name, batch_rows in rows.items():
                    acts[name][seq * ctx : seq * ctx + len(batch_rows)] = batch_rows
                f.flush()
                f.attrs["n_seqs"] = end
                f.flush()
                self.committed = end
        except BaseException as e:  # the first error stops the writer: nothing after it is trusted
            self.error = e
        finally:
            try:
                f.close()
            except Exception as e:  # a failed close (disk still full) must not hide the write error
                if self.error is None:
                    self.error = e


def write_failure(error: BaseException, out: Path, committed: int) -> RunFailure:
    """One-line RunFailure for a failed write to ``out`` after ``committed`` sequences, with what to do."""
    import shutil

    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
        try:
            free = f" ({shutil.disk_usage(out.parent).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        return RunFailure(
            f"disk full while writing {out} after {committed} sequences{free}; free space (or move the file "
            "to a disk with room), then rerun the same command with --resume"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return RunFailure(
        f"writing {out} failed after {committed} sequences: {first}; fix the cause, then rerun the same "
        "command with --resume"
    )
