"""Activation-cacher throughput in tokens/s, one JSON line per measurement.

    python benchmarks/cache_throughput.py [--model tiny-llama] [--hookpoint mlp_out.2] [--tokens 64k]
        [--context-size 128] [--batch-size 32] [--dtype float16] [--device auto]

Measurements: tokenize+pack alone; forward with early stop; forward without it (the speed-up of stopping after
the deepest hook); HDF5 append alone (the background writer fed synthetic rows); the whole `cache` command.
The H200 target setting: --model random:smollm2-135m --hookpoint mlp_out.15 --context-size 1024
--tokens 20M --dtype float16 (bf16 model on CUDA, fp16 file; default 32 windows = 32k tokens per forward).
The corpus is builtin:pydoc repeated until it covers --tokens, written to a temporary .txt file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_toolkit.activations.cacher import CacheConfig, _model_dtype, cache_activations
from sae_toolkit.activations.writer import Writer, create_file
from sae_toolkit.model.corpus import open_corpus, token_windows, window_batches
from sae_toolkit.model.hookpoints import resolve_all, run_capture
from sae_toolkit.model.loading import load_model
from sae_toolkit.units import parse_size, resolve_device


def emit(name: str, tokens: int, seconds: float, **extra) -> None:
    print(
        json.dumps(
            {
                "measure": name,
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds),
                **extra,
            }
        ),
        flush=True,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write_corpus(path: Path, tokens: int, tokenizer) -> None:
    """pydoc repeated until it holds ~1.2x the needed tokens (measured with the model's tokenizer)."""
    docs = list(open_corpus("builtin:pydoc"))
    per_pass = sum(len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
    repeats = max(1, int(1.2 * tokens / per_pass) + 1)
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs * repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--hookpoint", default="mlp_out.2")
    p.add_argument("--tokens", default="64k")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: the cacher's, "
                   "32k tokens' worth on a GPU, 32 on CPU)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--forward-batches", type=int, default=10, help="batches timed for the forward measurements")
    args = p.parse_args()
    device = resolve_device(args.device)
    tokens = parse_size(args.tokens)
    ctx = args.context_size
    bs = CacheConfig(model=args.model, hookpoints=[args.hookpoint], dataset="-", tokens=1, out="-", context_size=ctx,
                     batch_size=args.batch_size).windows_per_forward(device)

    t = time.perf_counter()
    model, tokenizer = load_model(args.model, device=device, dtype=_model_dtype(args.dtype, device))
    sync(device)
    load_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "model": args.model,
                "hookpoint": args.hookpoint,
                "device": device,
                "model_dtype": str(next(model.parameters()).dtype),
                "load_s": round(load_s, 2),
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    hookpoints = resolve_all(model, [args.hookpoint])
    t = time.perf_counter()  # a second load, as cache_activations does it (imports already done)
    load_model(args.model, device=device, dtype=_model_dtype(args.dtype, device))
    reload_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(corpus, tokens, tokenizer)

        t = time.perf_counter()
        n = 0
        for block in token_windows(open_corpus(str(corpus)), tokenizer, ctx):
            n += block.size
            if n >= tokens:
                break
        emit("tokenize_pack", n, time.perf_counter() - t)

        batch = next(window_batches(token_windows(open_corpus(str(corpus)), tokenizer, ctx), bs))
        ids = torch.from_numpy(batch).to(device=device, dtype=torch.long)
        for stop_early in (True, False):
            with torch.inference_mode():
                run_capture(model, hookpoints, ids, stop_early=stop_early)  # warm-up
                sync(device)
                t = time.perf_counter()
                for _ in range(args.forward_batches):
                    run_capture(model, hookpoints, ids, stop_early=stop_early)
                sync(device)
            name = "forward_early_stop" if stop_early else "forward_full"
            emit(name, ids.numel() * args.forward_batches, time.perf_counter() - t)

        with torch.inference_mode():
            d = run_capture(model, hookpoints, ids[:1, :2])[args.hookpoint].shape[-1]
        cfg = CacheConfig(
            model=args.model,
            hookpoints=[args.hookpoint],
            dataset=str(corpus),
            tokens=tokens,
            context_size=ctx,
            batch_size=bs,
            dtype=args.dtype,
            device=device,
            out=str(Path(tmp) / "write.h5"),
        )
        create_file(
            Path(cfg.out), cfg, {"model": cfg.model, "dataset": cfg.dataset}, tokenizer, hookpoints, {args.hookpoint: d}
        )
        storage = np.uint16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
        rows = np.random.default_rng(0).standard_normal((bs * ctx, d)).astype(np.float32).astype(storage)
        toks = np.zeros((bs, ctx), np.int32)
        t = time.perf_counter()
        writer = Writer(Path(cfg.out))
        for seq in range(0, cfg.n_seqs_target - bs + 1, bs):
            writer.put(seq, toks, {args.hookpoint: rows})
        writer.close()
        written = (cfg.n_seqs_target // bs) * bs * ctx
        emit(
            "h5py_append",
            written,
            time.perf_counter() - t,
            mb_per_s=round(written * d * rows.itemsize / 1e6 / (time.perf_counter() - t)),
        )

        cfg.out = str(Path(tmp) / "cache.h5")
        t = time.perf_counter()
        cache_activations(cfg)
        wall = time.perf_counter() - t
        n_cached = cfg.n_seqs_target * ctx
        emit(
            "cache_end_to_end",
            n_cached,
            wall,
            includes_model_load_s=round(reload_s, 2),
            tokens_per_s_excluding_load=round(n_cached / max(wall - reload_s, 1e-9)),
        )


if __name__ == "__main__":
    main()
