"""The activation cacher: corpus windows → model forward with hooks → HDF5 file (DESIGN §3), resumable.

One pass over the corpus fills every requested hookpoint. The forward pass stops after the deepest hook; a
background thread writes each batch to HDF5 while the next batch runs through the model, and commits
``n_seqs`` only after the rows are flushed, so a reader (or ``--resume``) never sees a half-written sequence.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_toolkit.activations.config import FLOAT16_MAX, IDENTITY_FIELDS, CacheConfig
from sae_toolkit.activations.format import read_root_attrs
from sae_toolkit.activations.writer import Writer, create_file, grow_file, trim_file
from sae_toolkit.errors import SAEToolkitError

if TYPE_CHECKING:
    import torch

    from sae_toolkit.model.hookpoints import Hookpoint

def cache_activations(cfg: CacheConfig) -> Path:
    """Run ``cfg.model`` over ``cfg.dataset`` and write the hookpoints' activations to ``cfg.out``; returns it.

    Result layout (DESIGN §3): ``tokens`` int32 [n_seqs, context_size]; ``acts/<hookpoint>``
    [n_seqs * context_size, d], row ``s * context_size + p`` = sequence s, position p.
    """
    import torch
    from tqdm.auto import tqdm

    from sae_toolkit.model.corpus import open_corpus, token_windows, window_batches
    from sae_toolkit.model.hookpoints import resolve_all
    from sae_toolkit.model.loading import canonical_spec, load_model
    from sae_toolkit.units import resolve_device

    out = Path(cfg.out).expanduser()
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

    windows = cfg.windows_per_forward(device)
    batches = window_batches(token_windows(documents, tokenizer, cfg.context_size), windows)
    if done:  # regenerate and skip what is stored; the last stored window proves the corpus is unchanged
        batches = _skip_stored(batches, out, done, windows)
    if done is None:
        create_file(out, cfg, identity, tokenizer, hookpoints, widths)
        done, target = 0, cfg.n_seqs_target
    else:
        target = grow_file(out, cfg)
        print(f"resuming {out} after {done} of {target} sequences")

    seq = done
    batches = _prefetch(batches)
    writer = Writer(out)
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
            for batch in batches:
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
    return out


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
    kept = f"{out} keeps the {seq} good sequences before them"
    if math.isfinite(peak):
        raise SAEToolkitError(
            f"activations {where} reach {peak:.4g}, beyond float16's ±65504; {kept}: delete it and rerun with "
            "--dtype bfloat16 or float32"
        )
    raise SAEToolkitError(
        f"the model produced NaN/Inf activations {where}; {kept}: delete it and rerun with --dtype float32 "
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


def _prefetch(items: Iterator[np.ndarray], depth: int = 8) -> Iterator[np.ndarray]:
    """Produce token batches on a background thread, so tokenization overlaps the forward pass.

    The Rust tokenizer releases the GIL; measured ~0.18M tokens/s on 2 busy cores for SmolLM2's BPE, which
    would cap a GPU cacher well below its forward speed if it ran in line.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(end)
        except BaseException as e:  # handed to the consumer, raised there
            buffer.put(e)

    threading.Thread(target=produce, name="sae-cache-tokenizer", daemon=True).start()
    try:
        while (item := buffer.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
