"""The activation cacher: corpus windows → model forward with hooks → HDF5 file (DESIGN §3), resumable.

One pass over the corpus fills every requested hookpoint. The forward pass stops after the deepest hook; a
background thread writes each batch to HDF5 while the next batch runs through the model, and commits
``n_seqs`` only after the rows are flushed, so a reader (or ``--resume``) never sees a half-written sequence.
"""

from __future__ import annotations

import itertools
import json
import math
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_toolkit.activations.config import FLOAT16_MAX, IDENTITY_FIELDS, CacheConfig
from sae_toolkit.activations.format import read_root_attrs
from sae_toolkit.activations.lock import OutputLock
from sae_toolkit.activations.writer import Writer, create_file, grow_file, trim_file
from sae_toolkit.errors import RunFailure, SAEToolkitError

if TYPE_CHECKING:
    import torch

    from sae_toolkit.model.hookpoints import Hookpoint

def cache_activations(cfg: CacheConfig) -> Path:
    """Run ``cfg.model`` over ``cfg.dataset`` and write the hookpoints' activations to ``cfg.out``; returns it.

    Result layout (DESIGN §3): ``tokens`` int32 [n_seqs, context_size]; ``acts/<hookpoint>``
    [n_seqs * context_size, d], row ``s * context_size + p`` = sequence s, position p.
    Only one run writes a given ``out`` at a time (``<out>.lock``).
    """
    out = Path(cfg.out).expanduser()
    if out.is_dir():
        raise SAEToolkitError(f"--out {out} is a folder; give a file path such as {out / 'acts.h5'}")
    with OutputLock(out):
        return _cache_locked(cfg, out)


def _cache_locked(cfg: CacheConfig, out: Path) -> Path:
    import torch
    from tqdm.auto import tqdm

    from sae_toolkit.model.corpus import open_corpus, token_windows, window_batches
    from sae_toolkit.model.hookpoints import resolve_all
    from sae_toolkit.model.loading import canonical_spec, load_model
    from sae_toolkit.units import resolve_device

    identity = _identity(cfg, canonical_spec)
    existing = _check_existing(out, cfg, identity)  # before any slow work: refuse overwrite / bad resume
    if existing is not None and existing[0] >= existing[1]:
        print(f"{out} already holds all {existing[0]} sequences it can; nothing to do")
        return out
    done = None if existing is None else existing[0]
    documents = open_corpus(cfg.dataset, split=cfg.split, text_column=cfg.text_column)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device, dtype=_model_dtype(cfg.dtype, device))
    hookpoints = resolve_all(model, cfg.hookpoints)
    _check_context(model, cfg.context_size)
    widths = _probe_widths(model, hookpoints, device)

    windows = token_windows(documents, tokenizer, cfg.context_size)
    if cfg.first_window:  # a rank's shard: tokenized and dropped, never run through the model
        windows = _drop_windows(windows, cfg.first_window)
    per_forward = cfg.windows_per_forward(device)
    batches = window_batches(windows, per_forward)
    if done:  # regenerate and skip what is stored; the last stored window proves the corpus is unchanged
        batches = _skip_stored(batches, out, done, per_forward)
    batches = _prefetch(batches)
    # The first batch before any file is made: an empty corpus or a bad first record is an error, not a
    # 0-sequence file that calls itself complete.
    first = next(batches, None)
    if first is None and not done:
        raise SAEToolkitError(
            f"dataset {cfg.dataset!r} gives no window of {cfg.context_size} tokens (it is empty, whitespace "
            "only, or shorter than one window); give a corpus with text or a smaller --context-size"
        )
    target = cfg.n_seqs_target if done is None else max(cfg.n_seqs_target, existing[1])
    _check_free_space(out, cfg, widths, target - (done or 0))
    created = done is None
    if created:
        try:
            create_file(out, cfg, identity, tokenizer, hookpoints, widths)
        except FileExistsError:  # made by someone else since the check: not ours to remove
            raise
        except BaseException:  # half made by this run (disk full, Ctrl-C): remove it
            out.unlink(missing_ok=True)
            raise
        done = 0
    try:
        if not created:
            target = grow_file(out, cfg)
            print(f"resuming {out} after {done} of {target} sequences")
        seq = done
        writer = Writer(out, committed=done)
        try:
            with (
                torch.inference_mode(),
                tqdm(
                    total=target * cfg.context_size,
                    initial=done * cfg.context_size,
                    unit="tok",
                    unit_scale=True,
                    desc="cache",
                    dynamic_ncols=True,
                ) as bar,
            ):
                for batch in itertools.chain([] if first is None else [first], batches):
                    batch = batch[: target - seq]
                    if len(batch) == 0:
                        break
                    arrays = _forward(model, hookpoints, batch, cfg, device, seq, out)
                    writer.put(seq, batch, arrays)
                    seq += len(batch)
                    bar.update(batch.size)
        finally:
            writer.close()  # commits every batch handed over, even on error or Ctrl-C, so --resume can continue
        if seq < target:  # the loop ended early without an error: the corpus ran out
            trim_file(out, seq, cfg)
    except BaseException:
        if created and _committed(out) == 0:  # made by this run and holds nothing: no empty file left behind
            out.unlink(missing_ok=True)
        raise
    return out


def _committed(out: Path) -> int | None:
    """n_seqs of the file, None when it cannot be read."""
    try:
        return int(read_root_attrs(out)["n_seqs"])
    except Exception:  # unreadable after a failure: keep it, the user decides
        return None


def _check_free_space(out: Path, cfg: CacheConfig, widths: dict[str, int], n_seqs: int) -> None:
    """Refuse to start a run the disk cannot hold: sequences x (tokens + every hookpoint's rows) vs free bytes."""
    itemsize = 2 if cfg.dtype in ("float16", "bfloat16") else 4
    need = n_seqs * cfg.context_size * (4 + itemsize * sum(widths.values()))
    need += len(widths) * (1 << 20) + (1 << 20)  # up to one unfilled chunk per dataset, plus metadata
    try:
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    except OSError:
        return  # no way to know; the writer still stops cleanly if the disk fills
    if need > free:
        raise RunFailure(
            f"caching {n_seqs * cfg.context_size:,} tokens needs about {_mib(need)} in {out.parent}, but only "
            f"{_mib(free)} is free; free space, pick another --out or lower --tokens"
        )


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _identity(cfg: CacheConfig, canonical_spec) -> dict:
    """The content-deciding settings, with local paths made absolute so a resume from another cwd matches."""
    ident = {k: getattr(cfg, k) for k in IDENTITY_FIELDS}
    ident["model"] = canonical_spec(cfg.model)
    data = Path(cfg.dataset).expanduser()
    if not cfg.dataset.startswith("builtin:") and data.exists():
        ident["dataset"] = str(data.resolve())
    return ident


def _check_existing(out: Path, cfg: CacheConfig, identity: dict) -> tuple[int, int] | None:
    """None for a new file; for ``--resume`` (stored sequences, sequences to reach) once the settings match."""
    if not out.exists():
        if cfg.resume:
            print(f"{out} does not exist yet; starting it (--resume has nothing to continue)")
        return None
    if not cfg.resume:
        raise SAEToolkitError(f"{out} already exists; pass --resume to continue it or delete it to start over")
    attrs = read_root_attrs(out, fix="delete it or pick another --out")
    stored = json.loads(attrs["config"])
    for key in IDENTITY_FIELDS:
        if stored.get(key) != identity[key]:
            raise SAEToolkitError(
                f"cannot resume {out}: it was cached with {key}={stored.get(key)!r}, not {identity[key]!r}; "
                "use the same settings or a new --out"
            )
    done = int(attrs["n_seqs"])
    if attrs.get("corpus_exhausted", False):
        print(f"{out}: the corpus ran out after {done} sequences when it was cached")
        return done, done
    return done, max(cfg.n_seqs_target, int(attrs["n_seqs_target"]))


def _model_dtype(dtype: str, device: str) -> torch.dtype:
    """float32 on CPU (exact, and CPU bf16 matmuls are not faster); bf16 on GPU unless float32 is stored.

    bf16 has float32's range, so a bf16 model does not overflow where an fp16 one could; its 8-bit mantissa
    fits in fp16's 10 bits, so storing its activations as float16 loses nothing but out-of-range values.
    """
    import torch

    if device.startswith("cuda") and dtype != "float32":
        return torch.bfloat16
    return torch.float32


def _check_context(model: torch.nn.Module, context_size: int) -> None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and context_size > limit:
        raise SAEToolkitError(f"context size {context_size} exceeds the model's {limit} positions; use <= {limit}")


def _probe_widths(model: torch.nn.Module, hookpoints: list[Hookpoint], device: str) -> dict[str, int]:
    """Activation width d of each hookpoint, from a 2-token forward; refuses non-[batch, seq, d] outputs."""
    import torch

    from sae_toolkit.model.hookpoints import run_capture

    with torch.inference_mode():
        acts = run_capture(model, hookpoints, torch.zeros(1, 2, dtype=torch.long, device=device))
    widths = {}
    for hp in hookpoints:
        shape = tuple(acts[hp.name].shape)
        if len(shape) != 3 or shape[:2] != (1, 2):
            raise SAEToolkitError(
                f"hookpoint {hp.name!r} gives activations of shape {shape}, not [batch, seq, d]; pick another module"
            )
        widths[hp.name] = shape[2]
    return widths


def _forward(
    model: torch.nn.Module,
    hookpoints: list[Hookpoint],
    batch: np.ndarray,
    cfg: CacheConfig,
    device: str,
    seq: int,
    out: Path,
) -> dict[str, np.ndarray]:
    """Activations of one batch of windows as storage arrays {name: [batch * seq, d]}, checked for overflow."""
    import torch

    from sae_toolkit.model.hookpoints import run_capture

    ids = torch.from_numpy(batch).to(device=device, dtype=torch.long, non_blocking=True)
    acts = run_capture(model, hookpoints, ids)
    peaks = torch.stack([acts[hp.name].abs().amax().float() for hp in hookpoints])  # NaN propagates through amax
    # Device → host copies queued without waiting (into pinned memory on CUDA, so they are DMA transfers), then
    # one sync for everything: the peaks, which the stream delivers after the copies.
    host = {hp.name: _to_host(acts[hp.name].reshape(-1, acts[hp.name].shape[-1]), cfg.dtype) for hp in hookpoints}
    limit = FLOAT16_MAX if cfg.dtype == "float16" else math.inf
    for hp, peak in zip(hookpoints, peaks.tolist()):
        if not peak < limit:
            _raise_bad_values(hp.name, peak, cfg.dtype, seq, len(batch), out)
    # numpy has no bfloat16: its bits are stored as uint16
    return {name: x.view(torch.int16).numpy().view(np.uint16) if cfg.dtype == "bfloat16" else x.numpy()
            for name, x in host.items()}


def _to_host(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """[n, d] device activations → a host tensor in the storage dtype; on CUDA the copy is queued (non_blocking)
    into fresh pinned memory and is complete after the caller's next sync. Elsewhere an ordinary copy."""
    import torch

    x = x.to(getattr(torch, dtype))
    if x.device.type != "cuda":
        return x.cpu()
    buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)  # the caching host allocator reuses these
    return buf.copy_(x, non_blocking=True)


def _raise_bad_values(name: str, peak: float, dtype: str, seq: int, n: int, out: Path) -> None:
    where = f"at hookpoint {name!r} in sequences {seq}-{seq + n - 1}"
    # A file left with 0 sequences is removed by cache_activations, so there is nothing to delete then.
    kept = f"{out} keeps the {seq} good sequences before them: delete it and" if seq else "nothing was kept;"
    if math.isfinite(peak):
        raise SAEToolkitError(
            f"activations {where} reach {peak:.4g}, beyond float16's ±65504; {kept} rerun with "
            "--dtype bfloat16 or float32"
        )
    raise SAEToolkitError(
        f"the model produced NaN/Inf activations {where}; {kept} rerun with --dtype float32 "
        "(or bfloat16) and check the model"
    )


def _skip_stored(batches, out: Path, done: int, batch_size: int):
    """Drop the first ``done`` windows of the regenerated corpus, checking the last one against the file."""
    import h5py

    from sae_toolkit.model.corpus import window_batches

    with h5py.File(out, "r") as f:
        last_stored = f["tokens"][done - 1]
    seen = 0
    for batch in batches:
        if seen + len(batch) >= done:
            if not np.array_equal(batch[done - 1 - seen], last_stored):
                raise SAEToolkitError(
                    f"cannot resume {out}: the corpus no longer gives the stored tokens at sequence {done - 1} "
                    "(dataset or tokenizer changed); delete the file to start over"
                )
            rest = batch[done - seen :]
            break
        seen += len(batch)
    else:
        raise SAEToolkitError(
            f"cannot resume {out}: the corpus now ends before the {done} stored sequences (dataset changed); "
            "delete the file to start over"
        )

    def remaining():
        if len(rest):
            yield rest
        yield from batches

    return window_batches(remaining(), batch_size)


def _drop_windows(blocks: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """The window blocks without their first ``n`` windows."""
    for block in blocks:
        if n >= len(block):
            n -= len(block)
            continue
        yield block[n:]
        n = 0


def _prefetch(items: Iterator[np.ndarray], depth: int = 8) -> Iterator[np.ndarray]:
    """Produce token batches on a background thread, so tokenization overlaps the forward pass.

    The Rust tokenizer releases the GIL; measured ~0.18M tokens/s on 2 busy cores for SmolLM2's BPE, which
    would cap a GPU cacher well below its forward speed if it ran in line.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    from sae_toolkit.activations.prefetch import put_unless_stopped  # imports torch: lazily, as this module does

    def put(item: object) -> bool:
        return put_unless_stopped(buffer, item, stop)

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    thread = threading.Thread(target=produce, name="sae-cache-tokenizer", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # joined, not left to run: a daemon thread still inside the tokenizer or torch when the interpreter exits
        # is ended by pthread_exit, whose forced unwind through native frames can abort the process. It stops
        # within one item plus 0.1 s.
        stop.set()
        thread.join(timeout=30)  # a corpus read stuck on the network is not waited for longer
