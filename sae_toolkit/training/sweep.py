"""Several SAEs trained side by side on the same batches — one per hookpoint and per sweep value — from a cache or
straight from the model, in one process or under torchrun. The data is read (or the model run) once per step.

    RUN_DIR/                      one member: RUN_DIR is that run (sae/, checkpoints/, metrics.jsonl, ...)
    RUN_DIR/sweep.json            several members: their names, the source, world_size
    RUN_DIR/<member>/             each a complete run directory (DESIGN.md §4)

    >>> grid = dict(hookpoints=["mlp_out.1"], archs=["topk"], expansions=[8], ks=[16, 32, 64])
    >>> cfgs = sweep_configs(base, **grid)  # doctest: +SKIP
    >>> train_sweep(cfgs, stream=StreamConfig("tiny-llama", "builtin:pydoc", ["mlp_out.1"]))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from pathlib import Path

import torch

from sae_toolkit.activations.stream import StreamConfig
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.training.checkpoint import list_checkpoints
from sae_toolkit.training.config import TrainConfig
from sae_toolkit.training.distributed import DistContext, DistributedTrainer, rank_device
from sae_toolkit.training.sources import HookpointView, SharedBatches, open_shared

SHARED_FIELDS = ("acts", "batch_size", "tokens", "seed", "seq_range", "exclude_bos", "normalize", "in_memory",
                 "prefetch", "log_every", "checkpoint_every", "resume", "device")
"""Settings every member must share: they decide the batches, or when the loop logs and checkpoints."""


def sweep_configs(base: TrainConfig, *, hookpoints: list[str], archs: list[str], expansions: list[int],
                  ks: list[int]) -> list[TrainConfig]:
    """One TrainConfig per combination; `out` = base.out for a single member, else a sub-folder named after the
    values that vary (`mlp_out.1-topk-x8-k32`). k is dropped for archs that have none."""
    combos = []
    for hp, arch, exp, k in itertools.product(hookpoints, archs, expansions, ks):
        k = k if arch in ("topk", "batchtopk") else base.k
        if (hp, arch, exp, k) not in combos:
            combos.append((hp, arch, exp, k))
    varying = [len({c[i] for c in combos}) > 1 for i in range(4)]
    configs = []
    for hp, arch, exp, k in combos:
        name = "-".join(part for part, vary in zip((hp, arch, f"x{exp}", f"k{k}"), varying) if vary)
        out = str(Path(base.out) / name) if len(combos) > 1 else base.out
        # resample=None: re-derive the arch default (the base's was resolved for its own arch)
        configs.append(TrainConfig.from_dict({**base.to_dict(), "hookpoint": hp, "arch": arch, "expansion": exp,
                                              "k": k, "out": out, "resample": None}))
    return configs


def train_sweep(configs: list[TrainConfig], *, stream: StreamConfig | None = None, ctx: DistContext | None = None,
                n_parts: int = 1, distribute_modules: bool = False) -> Path:
    """Train every config on the same batches; returns the top RUN_DIR.

    stream: train from the model (the configs' `acts` is then unused). ctx: the torchrun context (None: one
    process). n_parts: in one process, hold the data of `n_parts` ranks — the exact global batches of an
    `n_parts`-rank torchrun run (used to check that a distributed run equals a one-process one).
    distribute_modules: under torchrun, each hookpoint's SAEs live on one rank (hookpoint i on rank i mod N);
    every rank still reads its own rows of every hookpoint and sends them to the owner, which trains on the
    global batch without any gradient all-reduce (sparsify's `distribute_modules`).
    """
    ctx = ctx or DistContext()
    first = configs[0]
    if distribute_modules and len({c.hookpoint for c in configs}) < ctx.world_size:
        raise SAEToolkitError(f"--distribute-modules puts each hookpoint on its own rank, but there are "
                              f"{len({c.hookpoint for c in configs})} hookpoint(s) for {ctx.world_size} processes; "
                              "give at least as many --hookpoint as processes, or drop --distribute-modules")
    for cfg in configs[1:]:
        for name in SHARED_FIELDS:
            if getattr(cfg, name) != getattr(first, name):
                raise SAEToolkitError(f"sweep members differ in {name} ({getattr(cfg, name)!r} vs "
                                      f"{getattr(first, name)!r}); members share the batches, so set it once")
    root = Path(first.out) if len(configs) == 1 else Path(configs[0].out).parent
    _prepare_root(root, configs, stream, ctx)
    device = torch.device(rank_device(first.device, ctx))
    configs = [dataclasses.replace(cfg, device=str(device)) for cfg in configs]
    hookpoints = list(dict.fromkeys(cfg.hookpoint for cfg in configs))
    if stream is not None:
        stream = dataclasses.replace(stream, hookpoints=hookpoints)
    shared = open_shared(
        acts=None if stream is not None else first.acts, stream=stream, hookpoints=hookpoints,
        batch_size=first.batch_size, device=device, seed=first.seed, seq_range=first.seq_range,
        exclude_bos=first.exclude_bos, normalize=first.normalize, in_memory=first.in_memory,
        prefetch=first.prefetch, tokens=first.tokens, ctx=ctx, n_parts=n_parts,
        outlier_multiple=first.outlier_multiple, exclude_first_positions=first.exclude_first_positions)
    try:
        source = None if stream is None else stream.to_dict()
        if stream is not None and ctx.is_main:
            buffer = shared.parts[0].buffer_windows * stream.context_size * ctx.world_size * len(shared.parts)  # type: ignore[attr-defined]
            print(f"streaming {', '.join(hookpoints)} from {stream.model} on {stream.dataset}: shuffle buffer "
                  f"{buffer:,} tokens ({buffer / first.batch_size:.0f} batches of {first.batch_size})")
        owner = {hp: (i % ctx.world_size if distribute_modules else ctx.rank) for i, hp in enumerate(hookpoints)}
        # An owned SAE sees the gathered global batch, so its trainer runs as if alone (no gradient all-reduce).
        member_ctx = DistContext() if distribute_modules else ctx
        members = [DistributedTrainer(cfg, HookpointView(shared, cfg.hookpoint, cfg.seq_range), member_ctx, source,
                                      world_size=ctx.world_size)
                   if owner[cfg.hookpoint] == ctx.rank else None for cfg in configs]
        ctx.barrier()
        _fit(members, shared, ctx, first, owner if distribute_modules else None)
    finally:
        shared.close()
    return root


def _prepare_root(root: Path, configs: list[TrainConfig], stream: StreamConfig | None, ctx: DistContext) -> None:
    """Check the sweep folder (several members), write sweep.json, align members' checkpoints for --resume."""
    if len(configs) > 1:
        manifest = {"members": [Path(c.out).name for c in configs], "world_size": ctx.world_size,
                    "source": None if stream is None else stream.to_dict(), "acts": configs[0].acts}
        path = root / "sweep.json"
        if configs[0].resume and path.exists():
            saved = json.loads(path.read_text())
            if saved["members"] != manifest["members"]:
                raise SAEToolkitError(f"cannot resume {root}: it holds members {saved['members']}, not "
                                      f"{manifest['members']}; pass the original sweep or a new --out")
        elif root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise SAEToolkitError(f"run directory {root} exists and is not empty; pass --resume to continue it or "
                                  "choose a new --out")
        ctx.barrier()  # every rank has looked before rank 0 writes
        if ctx.is_main:
            root.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(manifest, indent=2) + "\n")
    if configs[0].resume and ctx.is_main:
        _align_checkpoints([Path(c.out) for c in configs])
    ctx.barrier()


def _align_checkpoints(run_dirs: list[Path]) -> None:
    """A kill while the members were checkpointing one after another leaves some a checkpoint ahead: drop those
    newer checkpoints (ours), so that every member resumes from the same step and the shared stream position."""
    steps = [{int(p.name.split("_")[1]): p for p in list_checkpoints(d)} for d in run_dirs]
    if not all(steps):
        return
    common = set.intersection(*(set(s) for s in steps))
    if not common:
        raise SAEToolkitError(f"cannot resume: the members of {run_dirs[0].parent} share no checkpoint step; "
                              "start a new --out")
    target = max(common)
    for s in steps:
        for step, path in s.items():
            if step > target:
                shutil.rmtree(path)


def _fit(members: list[DistributedTrainer | None], shared: SharedBatches, ctx: DistContext, cfg: TrainConfig,
         owner: dict[str, int] | None = None) -> None:
    """The loop of Trainer.fit for several trainers: one shared batch per step, each SAE one update on its rows.

    members: one entry per sweep member, None where another rank owns it (owner: hookpoint → rank, with
    distribute_modules: each hookpoint's rows are then gathered to its owner every step). cfg: the settings the
    members share (batch, logging, checkpoints).
    """
    from tqdm.auto import tqdm

    trainers = [t for t in members if t is not None]
    positions = {p for per_rank in ctx.all_gather_object([(t.total_steps, t.step) for t in trainers])
                 for p in per_rank}
    if len(positions) != 1:
        raise SAEToolkitError("sweep members are at different steps; resume each from the same checkpoint step")
    (total, step), = positions
    for t in trainers if owner or ctx.is_main else ():  # each rank names the SAEs it owns; else rank 0 names all
        print(f"training {t.cfg.arch} SAE d_in={t.d_in} d_sae={t.d_sae} on {t.cfg.hookpoint} → {t.run_dir}"
              + (f" (rank {ctx.rank})" if owner else ""))
    if ctx.is_main:
        print(f"{len(members)} SAE(s), {trainers[0].total_tokens:,} tokens ({total} steps of {cfg.batch_size} over "
              f"{ctx.world_size} process(es)) on {trainers[0].device}")
    bar = tqdm(total=total * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True,
               desc=f"train {len(members)} SAE(s)", dynamic_ncols=True,
               **({} if ctx.is_main else {"disable": True}))  # rank 0's bar only; TQDM_DISABLE still works
    last_saved = step
    try:
        for t in trainers:
            t._open_loggers()
            t._tick = (time.perf_counter(), t.step)
        while step < total:
            batches = shared.next_batches()
            if owner is not None:  # [rows of this rank, d] → [global batch, d] on the owner
                batches = {hp: ctx.gather_rows(x, dst=owner[hp]) for hp, x in batches.items()}
            for t in trainers:
                if t.step in t.resample_steps:
                    t.resample(bar)
                x = batches[t.cfg.hookpoint]
                out = t.train_one(x)
                t.step += 1
                if t.step % cfg.log_every == 0 or t.step == total:
                    t.log(x, out)
            step += 1
            bar.update(cfg.batch_size)
            if step % cfg.checkpoint_every == 0:
                _checkpoint(members, shared)
                last_saved = step
        if last_saved != step:
            _checkpoint(members, shared)
        for t in trainers:
            t.save_sae()
    finally:
        bar.close()
        for t in trainers:
            t._close_loggers()


def _checkpoint(members: list[DistributedTrainer | None], shared: SharedBatches) -> None:
    """Every member's checkpoint, in member order: each one gathers all ranks' stream positions (a collective),
    so a rank that does not own a member still takes part in its gather."""
    for t in members:
        if t is not None:
            t.save_checkpoint()
        else:
            shared.state_dict()
