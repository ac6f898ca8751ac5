"""Batch sources for several SAEs trained side by side: one read of the data feeds every hookpoint's SAEs.

    SharedBatches ── parts ── StoreSet (one ActivationStore per hookpoint of an HDF5 file)
                          └── ModelStream (the model run over a corpus, shuffle buffer; activations/stream.py)
    HookpointView(shared, hp)  shaped like an ActivationStore, so a Trainer takes it as its `store`

A *part* is the data of one rank: under torchrun each rank holds one part (disjoint sequences of the cache,
or disjoint corpus windows), and the global batch is the concatenation of the parts' batches in rank order.
One process can hold all N parts (`n_parts=N`) and then sees exactly the global batches of an N-rank run.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy as np
import torch

from sae_toolkit.activations.store import ActivationStore
from sae_toolkit.activations.stream import ModelStream, StreamConfig
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.training.distributed import DistContext


class Part(Protocol):
    """What SharedBatches needs from one rank's data."""

    d: dict[str, int]
    raw_mean_norm: dict[str, float]
    scale: dict[str, float]
    model: str
    epoch: float

    def next_batches(self) -> dict[str, torch.Tensor]: ...
    def sample(self, name: str, n: int, *, seed: int = 0, normalized: bool = True) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


class StoreSet:
    """One ActivationStore per hookpoint over the same sequences, read in lock-step (the cache-side Part)."""

    def __init__(self, acts: str, hookpoints: list[str], *, batch_size: int, device: torch.device, seed: int,
                 seq_range: tuple[int, int] | None, exclude_bos: bool, normalize: bool,
                 in_memory: bool | Literal["auto"], prefetch: int):
        self.stores: dict[str, ActivationStore] = {}
        try:
            for hp in hookpoints:
                self.stores[hp] = ActivationStore(
                    acts, hp, batch_size=batch_size, device=device, seed=seed, seq_range=seq_range,
                    exclude_bos=exclude_bos, normalize=normalize, in_memory=in_memory, prefetch=prefetch)
        except BaseException:
            self.close()
            raise
        first = next(iter(self.stores.values()))
        self.model, self.n_rows, self.seq_range = first.model, first.n_rows, first.seq_range
        self.d = {hp: s.d_in for hp, s in self.stores.items()}
        self.raw_mean_norm = {hp: math.sqrt(s.d_in) / s.scale for hp, s in self.stores.items()}

    @property
    def scale(self) -> dict[str, float]:
        return {hp: s.scale for hp, s in self.stores.items()}

    @scale.setter
    def scale(self, value: dict[str, float]) -> None:
        for hp, s in value.items():
            self.stores[hp].scale = s

    @property
    def epoch(self) -> float:
        return next(iter(self.stores.values())).epoch

    def next_batches(self) -> dict[str, torch.Tensor]:
        return {hp: s.next_batch() for hp, s in self.stores.items()}

    def sample(self, name: str, n: int, *, seed: int = 0, normalized: bool = True) -> torch.Tensor:
        return self.stores[name].sample(n, seed=seed, normalized=normalized)

    def state_dict(self) -> dict:
        return {hp: s.state_dict() for hp, s in self.stores.items()}

    def load_state_dict(self, state: dict) -> None:
        for hp, s in self.stores.items():
            s.load_state_dict(state[hp])

    def close(self) -> None:
        for s in self.stores.values():
            s.close()


class SharedBatches:
    """The global batch of every hookpoint: this process's parts concatenated (and, across ranks, the sum).

    The normalization scale is computed once from all parts of all ranks (mean of their mean row norms), so every
    rank — and a one-process run holding all parts — scales identically.
    """

    def __init__(self, parts: list[Part], ctx: DistContext, *, normalize: bool, n_rows: int):
        self.parts, self.ctx = parts, ctx
        self.d = dict(parts[0].d)
        self.model = parts[0].model
        self.n_rows = n_rows
        if normalize:
            total = len(parts) * ctx.world_size
            scale = {}
            for name, d in self.d.items():
                mean_norm = ctx.sum_float(sum(p.raw_mean_norm[name] for p in parts)) / total
                scale[name] = math.sqrt(d) / mean_norm
            for p in parts:
                p.scale = dict(scale)

    @property
    def scale(self) -> dict[str, float]:
        return self.parts[0].scale

    @property
    def epoch(self) -> float:
        return self.parts[0].epoch

    def next_batches(self) -> dict[str, torch.Tensor]:
        """{hookpoint: [rows of this process, d]} — the global batch when one process holds every part."""
        got = [p.next_batches() for p in self.parts]
        return {name: torch.cat([g[name] for g in got]) for name in self.d}

    def sample(self, name: str, n: int, *, seed: int = 0, normalized: bool = True) -> torch.Tensor:
        """Rows of rank 0's first part (the trainer broadcasts what it derives from them)."""
        return self.parts[0].sample(name, n, seed=seed, normalized=normalized)

    def state_dict(self) -> dict:
        """Every rank's part positions (a collective under torchrun: all ranks must call it)."""
        return {"world_size": self.ctx.world_size, "n_parts": len(self.parts),
                "ranks": self.ctx.all_gather_object([p.state_dict() for p in self.parts])}

    def load_state_dict(self, state: dict) -> None:
        if "ranks" not in state:
            raise SAEToolkitError("cannot resume: this run was trained by plain `sae-toolkit train FILE` (one SAE, "
                                  "one process); resume it the same way, without torchrun")
        if (state.get("world_size"), state.get("n_parts")) != (self.ctx.world_size, len(self.parts)):
            raise SAEToolkitError(f"cannot resume: the run was trained with {state.get('world_size')} processes and "
                                  f"now has {self.ctx.world_size}; resume under torchrun with "
                                  f"--nproc_per_node={state.get('world_size')} in total")
        for p, s in zip(self.parts, state["ranks"][self.ctx.rank]):
            p.load_state_dict(s)

    def close(self) -> None:
        for p in self.parts:
            p.close()


class HookpointView:
    """One hookpoint of a SharedBatches, with the attributes of an ActivationStore that the Trainer reads.

    `next_batch` is not used: the sweep loop reads the shared batch once and hands each SAE its hookpoint's rows.
    """

    def __init__(self, shared: SharedBatches, hookpoint: str, seq_range: tuple[int, int] | None):
        self.shared, self.hookpoint = shared, hookpoint
        self.d_in = shared.d[hookpoint]
        self.model = shared.model
        self.n_rows = shared.n_rows
        self.seq_range = seq_range or (0, 0)
        # The shared sources keep every position (no massive-activation exclusion yet), as the Trainer records.
        self.excluded_positions = np.zeros(0, dtype=bool)
        self.n_outlier_rows = 0

    @property
    def scale(self) -> float:
        return self.shared.scale[self.hookpoint]

    @property
    def epoch(self) -> float:
        return self.shared.epoch

    def next_batch(self) -> torch.Tensor:
        raise SAEToolkitError("a HookpointView is fed by its sweep; read SharedBatches.next_batches() instead")

    def sample(self, n: int, *, seed: int = 0, normalized: bool = True) -> torch.Tensor:
        return self.shared.sample(self.hookpoint, n, seed=seed, normalized=normalized)

    def state_dict(self) -> dict:
        return self.shared.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shared.load_state_dict(state)

    def close(self) -> None:
        """The sweep closes the shared source once, after every SAE is done."""


def open_shared(*, acts: str | None, stream: StreamConfig | None, hookpoints: list[str], batch_size: int,
                device: torch.device, seed: int, seq_range: tuple[int, int] | None, exclude_bos: bool,
                normalize: bool, in_memory: bool | Literal["auto"], prefetch: int, tokens: int | None,
                ctx: DistContext, n_parts: int = 1) -> SharedBatches:
    """The data of this process: part `ctx.rank` of `ctx.world_size` under torchrun, else parts 0..n_parts-1.

    `batch_size` is the global batch; each part gives `batch_size / (parts in all)` rows per step.
    """
    total_parts = ctx.world_size * n_parts
    if batch_size % total_parts:
        raise SAEToolkitError(f"--batch-size {batch_size} does not split evenly over {total_parts} processes; "
                              f"use a multiple of {total_parts}")
    rows = batch_size // total_parts
    part_ids = [ctx.rank] if ctx.world_size > 1 else list(range(n_parts))
    parts: list[Part] = []
    try:
        if stream is not None:
            if tokens is None:
                raise SAEToolkitError("training from the model needs --tokens (e.g. --tokens 10M)")
            for r in part_ids:
                parts.append(ModelStream(stream, batch_size=rows, device=device, seed=seed, exclude_bos=exclude_bos,
                                         normalize=normalize, rank=r, world_size=total_parts))
            n_rows = tokens
        else:
            if acts is None:
                raise SAEToolkitError("no activations given: pass an .h5 file, or --model and --dataset")
            with ActivationStore(acts, hookpoints[0], batch_size=1, seq_range=seq_range,
                                 exclude_bos=exclude_bos) as probe:
                lo, hi = probe.seq_range
            if hi - lo < total_parts:
                raise SAEToolkitError(f"{acts} has {hi - lo} sequences, fewer than the {total_parts} processes")
            for r in part_ids:
                shard = (lo + (hi - lo) * r // total_parts, lo + (hi - lo) * (r + 1) // total_parts)
                parts.append(StoreSet(acts, hookpoints, batch_size=rows, device=device, seed=seed, seq_range=shard,
                                      exclude_bos=exclude_bos, normalize=normalize, in_memory=in_memory,
                                      prefetch=prefetch))
            n_rows = ctx.sum_int(sum(p.n_rows for p in parts))  # type: ignore[attr-defined]  # StoreSet has n_rows
        return SharedBatches(parts, ctx, normalize=normalize, n_rows=n_rows)
    except BaseException:
        for p in parts:
            p.close()
        raise
