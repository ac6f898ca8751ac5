"""Rank-sharded caching under torchrun: each rank caches its own contiguous range of corpus windows into a shard
file; rank 0 then writes OUT, an HDF5 file of *virtual datasets* that maps the shards' rows in window order.

    OUT                          tokens + acts/<hp> as virtual datasets (DESIGN §3 layout; plain h5py reads it)
    OUT.shards/shard-00001-of-00004.h5   an ordinary activation file: windows [n/4, 2n/4) of the corpus

So `info`, `train`, `analyze` and plain `h5py` read OUT like a one-process cache, row for row. Each shard resumes
on its own (`--resume`), exactly as a one-process file does; OUT is rebuilt when every shard is complete.
Keep OUT and OUT.shards/ together: OUT stores the shard paths relative to its own folder.

    torchrun --nproc_per_node=8 -m sae_toolkit cache --model M --hookpoint mlp_out.6 --dataset D \
        --tokens 100M --out a.h5
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import timedelta
from pathlib import Path

from sae_toolkit.activations.cacher import cache_activations
from sae_toolkit.activations.config import CacheConfig
from sae_toolkit.activations.format import read_root_attrs
from sae_toolkit.errors import SAEToolkitError


def shard_path(out: Path, rank: int, world_size: int) -> Path:
    return out.parent / f"{out.name}.shards" / f"shard-{rank:05d}-of-{world_size:05d}.h5"


def shard_windows(n_windows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The windows `[start, stop)` rank `rank` caches: contiguous, so OUT needs one mapping per shard."""
    return n_windows * rank // world_size, n_windows * (rank + 1) // world_size


def cache_distributed(cfg: CacheConfig) -> Path:
    """Run this rank's shard of `cfg` (torchrun's RANK / WORLD_SIZE / LOCAL_RANK), then rank 0 writes OUT."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(cfg.out).expanduser()
    n = cfg.n_seqs_target
    if n < world:
        raise SAEToolkitError(f"--tokens {cfg.tokens} makes {n} windows, fewer than the {world} processes; "
                              "cache more tokens or use fewer processes")
    _check_out(out, cfg.resume)
    start, stop = shard_windows(n, rank, world)
    device = cfg.device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    shard = shard_path(out, rank, world)
    if shard.exists() and cfg.resume:
        stored = json.loads(read_root_attrs(shard)["config"])
        if stored.get("first_window") != start:
            raise SAEToolkitError(f"cannot resume {shard}: it starts at window {stored.get('first_window')}, not "
                                  f"{start}; resume with the original --tokens and number of processes")
    # Gloo only carries barriers here (no tensors), so no GPU collectives are needed; a long timeout because a
    # rank that finishes its shard early waits at the barrier for the slowest one.
    if not dist.is_initialized():
        from sae_toolkit.process_group import init_process_group

        init_process_group("gloo", timeout=timedelta(hours=48))
    try:
        dist.barrier()  # every rank has checked OUT before anything is written
        cache_activations(dataclasses.replace(cfg, out=str(shard), tokens=(stop - start) * cfg.context_size,
                                              first_window=start, device=device))
        dist.barrier()
        if rank == 0:
            join_shards(out, [shard_path(out, r, world) for r in range(world)], cfg)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return out


def _check_out(out: Path, resume: bool) -> None:
    if not out.exists():
        return
    if not resume:
        raise SAEToolkitError(f"{out} already exists; pass --resume to continue it or delete it to start over")
    if "shards" not in read_root_attrs(out):
        raise SAEToolkitError(f"{out} was cached by one process; resume it without torchrun or choose a new --out")


def refuse_joined(cfg: CacheConfig) -> None:
    """A one-process `cache --resume` cannot grow a joined file (its datasets are virtual): say how to resume it."""
    out = Path(cfg.out).expanduser()
    if cfg.resume and out.is_file() and "shards" in read_root_attrs(out):
        world = json.loads(read_root_attrs(out)["config"]).get("world_size")
        raise SAEToolkitError(f"{out} joins {world} rank shards; resume it under torchrun with "
                              f"--nproc_per_node={world} (in total), or choose a new --out")


def join_shards(out: Path, shards: list[Path], cfg: CacheConfig) -> Path:
    """Write OUT: virtual `tokens` and `acts/<hp>` over the shards' stored rows, in window order.

    A shard that stopped short (the corpus ran out) ends the data: later shards are not mapped, so the windows
    stay contiguous, as in a one-process file.
    """
    import h5py

    out = Path(out)
    counts, first_attrs, acts_meta = [], None, {}
    for shard in shards:
        with h5py.File(shard, "r") as f:
            counts.append((int(f.attrs["n_seqs"]), int(f.attrs["n_seqs_target"])))
            if first_attrs is None:
                first_attrs = dict(f.attrs)
                acts_meta = {name: (d.shape[1], d.dtype, dict(d.attrs)) for name, d in f["acts"].items()}
    assert first_attrs is not None
    ctx = int(first_attrs["context_size"])
    used: list[tuple[Path, int]] = []
    for shard, (n_seqs, target) in zip(shards, counts):
        used.append((shard, n_seqs))
        if n_seqs < target or n_seqs == 0:
            break
    total = sum(n for _, n in used)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.unlink(missing_ok=True)
    rel = [os.path.relpath(shard, out.parent) for shard, _ in used]
    config = {**json.loads(first_attrs["config"]), "out": str(out), "tokens": cfg.tokens, "first_window": 0,
              "world_size": len(shards)}
    with h5py.File(tmp, "w") as f:
        f.attrs.update({k: v for k, v in first_attrs.items()})
        f.attrs.update(n_seqs=total, n_seqs_target=total if total < cfg.n_seqs_target else cfg.n_seqs_target,
                       corpus_exhausted=total < cfg.n_seqs_target, config=json.dumps(config),
                       shards=json.dumps(rel))
        _virtual(f, "tokens", (total, ctx), "int32", [(r, "tokens", n, ctx, n) for r, (_, n) in zip(rel, used)])
        for name, (d, dtype, attrs) in acts_meta.items():
            dset = _virtual(f, f"acts/{name}", (total * ctx, d), dtype,
                            [(r, f"acts/{name}", n * ctx, d, n * ctx) for r, (_, n) in zip(rel, used)])
            dset.attrs.update(attrs)
    os.replace(tmp, out)
    return out


def _virtual(f, name: str, shape: tuple[int, int], dtype, sources: list[tuple[str, str, int, int, int]]):
    """A virtual dataset `name` of `shape` stacking, along rows, the first `take` rows of each (file, dataset)."""
    import h5py

    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    row = 0
    for path, dset, rows, width, take in sources:
        if take:
            source = h5py.VirtualSource(path, dset, shape=(rows, width), dtype=dtype)
            layout[row:row + take] = source[:take]
        row += take
    return f.create_virtual_dataset(name, layout)
