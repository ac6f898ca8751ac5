"""ActivationStore throughput against a raw h5py read of the same fp16 file, and the trainer fed by it.

Writes (once, reused) an fp16 activation file in the format of DESIGN.md §3, then in interleaved rounds:
  h5py_sequential   raw `dset[lo:hi]` reads in file order, ~4 MiB at a time (the ceiling for streaming)
  store_stream      ActivationStore(in_memory=False).next_batch(): shuffled, BOS-free, normalized, on the device
  store_memory      ActivationStore(in_memory=True).next_batch()
  store_stream_h5py (with --h5py-store) the streaming store with memory_map=False: h5py reads instead of the map
and, with --train, the trainer's step (Trainer.train_one: train_step + dead-latent counters) fed
  step_only         one fixed batch already on the device (the step-only rate)
  step_streaming    the streaming store's next batch (what `sae-toolkit train` does with in_memory=False)
One JSON line per contender (median rows/s over rounds) and the ratios with their targets.

    python benchmarks/store_throughput.py                          # CPU, d=576, batch 4096
    python benchmarks/store_throughput.py --train                  # + trainer (d_sae 4608, batch 1024 on CPU)
    python benchmarks/store_throughput.py --device cuda --train --d-sae 18432 --train-batch 4096
    python benchmarks/store_throughput.py --quick --train          # tiny: checks that it runs
    python benchmarks/store_throughput.py --profile                # + CPU time per batch of each store thread (Linux)
    python benchmarks/store_throughput.py --batches-per-round 48 --h5py-store   # steady state, map vs h5py reads
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from sae_toolkit.activations.store import ActivationStore
from sae_toolkit.training.trainer import TrainConfig, Trainer


def write_file(path: Path, n_seqs: int, ctx: int, d: int) -> Path:
    """An fp16 activation file (hookpoint "hp", BOS at position 0 of every sequence), written once.

    A file written here is flushed to disk and its pages dropped from the page cache (`_evict`), so that the
    warm-up round reads it back as any activation file is read: written earlier (by `sae-toolkit cache`), read from
    storage into the page cache. Freshly written pages favoured the raw read: 5.9–6.5M rows/s against 4.7–4.8M once
    read back, while the store ran at 2.9–3.1M rows/s either way (RESULTS.md, eighth round). An existing file is
    used as it is."""
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".part")
    rng = np.random.default_rng(0)
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"format": "sae_toolkit.activations", "format_version": 1, "model": "bench",
                        "dataset": "bench", "context_size": ctx, "n_seqs": n_seqs, "tokenizer": "bench",
                        "created": "2026-01-01T00:00:00Z", "toolkit_version": "bench", "config": "{}",
                        "bos_token_id": 0})
        tokens = rng.integers(1, 1000, size=(n_seqs, ctx), dtype=np.int32)
        tokens[:, 0] = 0
        f.create_dataset("tokens", data=tokens)
        rows = n_seqs * ctx
        chunk = min(rows, max(1, (1 << 20) // (2 * d)))  # ~1 MiB chunks, as the cacher writes
        ds = f.create_dataset("acts/hp", shape=(rows, d), dtype=np.float16, chunks=(chunk, d))
        ds.attrs.update({"hookpoint": "hp", "module": "hp", "io": "output", "d": d, "dtype": "float16"})
        block = 65536
        for lo in range(0, rows, block):
            hi = min(rows, lo + block)
            ds[lo:hi] = (rng.standard_normal((hi - lo, d), dtype=np.float32) * 2).astype(np.float16)
    os.replace(tmp, path)
    _evict(path)
    return path


def _evict(path: Path) -> None:
    """Write `path`'s dirty pages to disk and drop its pages from the page cache (a hint; Linux honours it for
    clean pages). Where posix_fadvise is missing, nothing."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def emit(row: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seqs", type=int, default=1024, help="sequences of 128 tokens in the file")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batches-per-round", type=int, default=8)
    p.add_argument("--file", default=None, help="where to write/reuse the file (default: a temp dir)")
    p.add_argument("--train", action="store_true", help="also time the trainer fed by the streaming store")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--train-batch", type=int, default=1024)
    p.add_argument("--arch", default="topk")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds: only checks that it runs")
    p.add_argument("--profile", action="store_true",
                   help="also print the CPU time per batch of the raw read and of each streaming-store thread")
    p.add_argument("--h5py-store", action="store_true",
                   help="also time the streaming store reading through h5py (memory_map=False)")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.batch, args.seqs, args.rounds, args.batches_per_round = 32, 256, 64, 3, 2
        args.d_sae, args.train_batch = 128, 128
    device = torch.device(args.device)
    ctx = 128
    tmpdir = None
    if args.file is None:
        tmpdir = tempfile.TemporaryDirectory()
        args.file = str(Path(tmpdir.name) / "acts.h5")
    path = write_file(Path(args.file), args.seqs, ctx, args.d)
    common = {"device": str(device), "d": args.d, "batch": args.batch, "rows_in_file": args.seqs * ctx,
              "dtype": "float16", "rounds": args.rounds, "threads": torch.get_num_threads()}
    n = args.batch * args.batches_per_round

    f = h5py.File(path, "r")
    dset = f["acts/hp"]
    raw_pos = [0]

    def h5py_sequential() -> None:
        left = n  # the same rows/round as the store contenders, ~4 MiB reads, wrapping at the end of the file
        step = max(1, (4 << 20) // (2 * args.d))
        while left:
            lo = raw_pos[0]
            hi = min(dset.shape[0], lo + min(step, left))
            dset[lo:hi]
            left -= hi - lo
            raw_pos[0] = 0 if hi == dset.shape[0] else hi

    kinds = [("store_stream", False, True), ("store_memory", True, True)]
    if args.h5py_store:
        kinds.append(("store_stream_h5py", False, False))
    stores = {name: ActivationStore(path, "hp", batch_size=args.batch, device=device, normalize=True,
                                    in_memory=mem, prefetch=4, memory_map=mapped)
              for name, mem, mapped in kinds}

    def drain(store: ActivationStore):
        def run() -> None:
            for _ in range(args.batches_per_round):
                x = store.next_batch()
            if device.type == "cuda":
                x.sum().item()  # the batch really arrived
        return run

    contenders = {"h5py_sequential": h5py_sequential, **{k: drain(s) for k, s in stores.items()}}
    rates = _rounds(contenders, args.rounds, n)
    for name, r in rates.items():
        emit({"bench": "store", "contender": name, **common, "rows_per_s": r})
    emit({"bench": "store_ratio", "ratio": "store_stream/h5py_sequential",
          "value": rates["store_stream"] / rates["h5py_sequential"], "target": 0.5,
          "met": rates["store_stream"] / rates["h5py_sequential"] >= 0.5,
          "memory_mapped": stores["store_stream"].memory_mapped})
    if args.h5py_store:
        emit({"bench": "store_ratio", "ratio": "store_stream_h5py/h5py_sequential",
              "value": rates["store_stream_h5py"] / rates["h5py_sequential"]})
    if args.profile:
        _profile(h5py_sequential, drain(stores["store_stream"]), args.batches_per_round, common)
    for s in stores.values():
        s.close()
    f.close()

    if args.train:
        rates.update(_train(args, path, device))
    if tmpdir is not None:
        tmpdir.cleanup()
    return rates


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id (Linux /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _profile(raw, stream, batches: int, common: dict, rounds: int = 8) -> None:
    """Where the time goes: CPU time per batch of the raw read (this thread) and of each thread while the streaming
    store delivers batches. A wall time far above the busiest thread's CPU time means the threads waited (for
    a core on a busy machine, or for each other)."""
    if not os.path.isdir("/proc/self/task"):
        return
    raw_cpu = stream_wall = 0.0
    per: dict[str, float] = {}
    for _ in range(rounds):
        t = time.thread_time()
        raw()
        raw_cpu += time.thread_time() - t
        before, t = _thread_cpu(), time.perf_counter()
        stream()
        stream_wall += time.perf_counter() - t
        for tid, v in _thread_cpu().items():
            per[tid] = per.get(tid, 0.0) + v - before.get(tid, v)
    n = rounds * batches
    main_tid = str(threading.get_native_id())
    threads = sorted((v for tid, v in per.items() if tid != main_tid and v > 0), reverse=True)
    emit({"bench": "store_profile", **common, "raw_read_cpu_ms_per_batch": 1e3 * raw_cpu / n,
          "store_wall_ms_per_batch": 1e3 * stream_wall / n, "consumer_cpu_ms_per_batch": 1e3 * per.get(main_tid, 0) / n,
          "store_thread_cpu_ms_per_batch": [round(1e3 * v / n, 3) for v in threads]})


def _rounds(contenders: dict, rounds: int, rows: int) -> dict[str, float]:
    for fn in contenders.values():  # warm-up: threads started, caches filled
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: rows / statistics.median(v) for k, v in times.items()}


def _train(args: argparse.Namespace, path: Path, device: torch.device) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(acts=str(path), hookpoint="hp", arch=args.arch, n_features=args.d_sae,
                          batch_size=args.train_batch, device=str(device), out=str(Path(out) / "run"),
                          in_memory=False, b_dec_init="mean", init_sample=4096)
        t = Trainer(cfg)
        fixed = t.store.next_batch()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def step_only() -> None:
            t.train_one(fixed)
            sync()

        def step_streaming() -> None:
            t.train_one(t.store.next_batch())
            sync()

        rates = _rounds({"step_only": step_only, "step_streaming": step_streaming}, max(args.rounds, 9),
                        args.train_batch)
        t.store.close()
    common = {"device": str(device), "d": args.d, "d_sae": args.d_sae, "batch": args.train_batch, "arch": args.arch,
              "in_memory": False, "threads": torch.get_num_threads()}
    for name, r in rates.items():
        emit({"bench": "train_from_store", "contender": name, **common, "tokens_per_s": r})
    v = rates["step_streaming"] / rates["step_only"]
    emit({"bench": "train_from_store_ratio", "ratio": "step_streaming/step_only", "value": v, "target": 0.9,
          "met": v >= 0.9})
    return rates


if __name__ == "__main__":
    main()
