"""The HDF5 activation file on the writing side (DESIGN §3): create, grow, trim, background batch writer.

Reading and checking a file is format.py; this module owns how the file is laid out and committed.
"""

from __future__ import annotations

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
from sae_toolkit.errors import SAEToolkitError

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
    """Chunk space allocated when a dataset is created or grown, not on the first write: the chunk index is
    then written once, so a writer killed mid-batch (SIGKILL) leaves consistent metadata, and only raw rows
    past ``n_seqs`` — which are not data — can be half written. With fill_time="never" the file stays sparse."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def create_file(
    out: Path, cfg: CacheConfig, identity: dict, tokenizer, hookpoints: list[Hookpoint], widths: dict[str, int]
) -> None:
    """A new file with every root attr, ``tokens`` and one ``acts/<name>`` per hookpoint, sized for the target.

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
            (target, ctx),
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
                (target * ctx, d),
                storage,
                chunks=(rows, d),
                maxshape=(None, d),
                dcpl=dataset_props(),
                fill_time="never",
            )
            dset.attrs.update(hookpoint=hp.name, module=hp.module_name, io=hp.io, d=d, dtype=cfg.dtype)


def grow_file(out: Path, cfg: CacheConfig) -> int:
    """On resume, the sequences to reach: the file's target, or a larger --tokens (room made, recorded)."""
    import h5py

    with h5py.File(out, "r+") as f:
        target = max(cfg.n_seqs_target, int(f.attrs["n_seqs_target"]))
        if target > f["tokens"].shape[0]:
            f["tokens"].resize(target, axis=0)
            for dset in f["acts"].values():
                dset.resize(target * cfg.context_size, axis=0)
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

    Order per batch: rows → flush → ``n_seqs`` attr → flush, so ``n_seqs`` only ever counts flushed rows.
    The queue holds two batches: enough to hide a slow write, bounded so memory stays flat.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sae-cache-writer", daemon=True)
        self.thread.start()

    def put(self, seq: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        """Queue sequences [seq, seq + len(tokens)) for writing; re-raises a failed write."""
        if self.error is not None:
            raise SAEToolkitError(f"writing {self.out} failed: {self.error}")
        self.queue.put((seq, tokens, acts))

    def close(self) -> None:
        """Write and commit everything queued, stop the thread; re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise SAEToolkitError(f"writing {self.out} failed: {self.error}")

    def _run(self) -> None:
        import h5py

        with h5py.File(self.out, "r+") as f:
            while (item := self.queue.get()) is not None:
                if self.error is not None:
                    continue  # keep draining so the producer never blocks on a full queue
                try:
                    seq, tokens, acts = item
                    ctx = tokens.shape[1]
                    f["tokens"][seq : seq + len(tokens)] = tokens
                    for name, rows in acts.items():
                        f["acts"][name][seq * ctx : seq * ctx + len(rows)] = rows
                    f.flush()
                    f.attrs["n_seqs"] = seq + len(tokens)
                    f.flush()
                except Exception as e:  # reported to the main thread by put()/close()
                    self.error = e
