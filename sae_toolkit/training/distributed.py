"""Data-parallel training under `torchrun`: the process group, the few collectives we need, DistributedTrainer.

Every rank holds a full copy of each SAE and its Adam state and reads its own rows. The step runs through
`torch.nn.parallel.DistributedDataParallel` wrapped around `TrainingLoss` (a module whose forward is the SAE's
`training_loss`, since the step needs the loss, not `forward`'s reconstruction): DDP all-reduces the gradients in
buckets during backward, so they are averaged over ranks before the trainer's decoder-gradient projection (linear
and the same on every rank, so it commutes with the average), before `max_grad_norm` clipping (which thus clips
the global batch's gradient, as one process would) and before Adam. With identical parameters and identical
averaged gradients, Adam, the projection and the decoder renormalisation keep the weights identical on every
rank. Dead-latent counters use the OR of `fired` over ranks and the global batch; BatchTopK's running threshold
(a buffer, which DDP leaves alone) is averaged. Only rank 0 writes the run folder.

    torchrun --nproc_per_node=8 -m sae_toolkit train acts.h5 --hookpoint mlp_out.6 --arch topk --out run
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE, TrainOutput
from sae_toolkit.training.config import TrainConfig
from sae_toolkit.training.trainer import Trainer


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. world_size 1 = no process group; every collective is then the identity."""

    rank: int = 0
    """Global rank (0 writes files)."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this node (picks the GPU)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def sum_float(self, value: float) -> float:
        """Sum over ranks, in float64."""
        if not self.active:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item())

    def sum_int(self, value: int) -> int:
        return int(round(self.sum_float(float(value))))

    def all_gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (JSON-able objects)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, ...] of equal size on every rank → [world_size * rows, ...] in rank order."""
        if not self.active:
            return x
        import torch.distributed as dist

        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    def gather_rows(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        """[rows, ...] of equal size on every rank → [world_size * rows, ...] in rank order on rank `dst`, None
        elsewhere."""
        if not self.active:
            return x
        import torch.distributed as dist

        out = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(x.contiguous(), out, dst=dst)
        return torch.cat(out) if out is not None else None

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place average over ranks."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world_size
        return t

    def any_(self, mask: torch.Tensor) -> torch.Tensor:
        """OR over ranks of a bool tensor (gloo reduces no bools: as uint8 with MAX)."""
        if not self.active:
            return mask
        import torch.distributed as dist

        t = mask.to(torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.bool()

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers onto every rank."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def _device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); else a one-process context.

    Backend: nccl when the device is CUDA, gloo on CPU. Each rank takes GPU `LOCAL_RANK`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    from sae_toolkit.units import resolve_device

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        from sae_toolkit.process_group import init_process_group

        init_process_group("nccl" if cuda else "gloo")
    if rank != 0:
        os.environ.setdefault("TQDM_DISABLE", "1")  # one progress bar per job, rank 0's
    return DistContext(rank=rank, world_size=world, local_rank=local)


def rank_device(device: str, ctx: DistContext) -> str:
    """`auto`/`cuda` → `cuda:LOCAL_RANK` under torchrun; anything else unchanged."""
    from sae_toolkit.units import resolve_device

    resolved = resolve_device(device)
    if ctx.active and resolved == "cuda":
        return f"cuda:{ctx.local_rank}"
    return resolved


class TrainingLoss(nn.Module):
    """The module DistributedDataParallel wraps: forward(x, dead_mask, sparsity_scale) = `sae.training_loss(...)`.

    DDP hooks the gradients of the parameters of the module it wraps and runs that module's forward; the SAE's
    own forward returns a reconstruction, not the loss, so this wrapper makes the loss the forward. Its
    parameters are the SAE's (the same tensors): checkpoints, resampling and the decoder upkeep keep working on
    `sae` directly.
    """

    def __init__(self, sae: SAE, loss_fn: Callable[..., TrainOutput] | None = None):
        """loss_fn: the trainer's compiled `sae.training_loss` (None: the eager one)."""
        super().__init__()
        self.sae = sae
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                sparsity_scale: float | torch.Tensor = 1.0) -> TrainOutput:
        """x [batch, d_in] → the SAE's TrainOutput (loss, x_hat [batch, d_in], fired [d_sae], l0, parts)."""
        return (self.loss_fn or self.sae.training_loss)(x, dead_mask=dead_mask, sparsity_scale=sparsity_scale)


def wrap_ddp(sae: SAE, loss_fn: Callable[..., TrainOutput] | None, device: torch.device) -> nn.Module:
    """`TrainingLoss(sae, loss_fn)` in DistributedDataParallel (a collective: every rank calls it, in the same
    order for each SAE). Rank 0's parameters are broadcast to all ranks on construction."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Buffers (BatchTopK's threshold) are averaged by the trainer after each step; rank 0's copy must not overwrite
    # them before each forward. torch >= 2.13 names that forward_sync_buffers (broadcast_buffers is deprecated);
    # its one sync at construction is harmless, every rank holds the same buffers then.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(
        TrainingLoss(sae, loss_fn),
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda" else None,
        **no_buffer_sync,
        # every architecture's training_loss gives every parameter a gradient on every batch (AuxK with no dead
        # latent adds nothing, but the main term reaches all of W_enc, b_enc, W_dec, b_dec; unselected TopK rows
        # get zero rows of a dense gradient): tests/training/test_distributed.py checks it per arch, so DDP
        # skips the per-step autograd-graph search for unused parameters
        find_unused_parameters=False,
        # gradients are views into DDP's all-reduce buckets: no second gradient-sized copy per SAE. The trainer
        # edits them in place only (projection, clipping), which views allow
        gradient_as_bucket_view=True,
    )


class DistributedTrainer(Trainer):
    """A Trainer fed by a sweep (see training/sweep.py) that keeps its SAE identical on every rank: its step runs
    through DistributedDataParallel (`self.ddp`, None in a one-process context).

    With `ctx.world_size == 1` it is a plain Trainer that also records `world_size` and `source` in
    train_config.json. `extra_config` is that `source` (the StreamConfig dict, or None for a cache).
    """

    def __init__(self, cfg: TrainConfig, store: Any, ctx: DistContext, extra_config: dict | None = None,
                 world_size: int | None = None):
        """world_size: what train_config.json records (default ctx.world_size; with --distribute-modules the
        trainer's own ctx is a one-process one while the job has more processes)."""
        self.ctx = ctx
        self.extra_config = extra_config
        self.world_size = world_size or ctx.world_size
        super().__init__(cfg, store=store)
        # Under torchrun the step calls DDP (train_step's loss_fn), which averages the gradients during backward.
        self.ddp = wrap_ddp(self.sae, self._loss_fn, self.device) if ctx.active else None
        if self.ddp is not None:
            self._loss_fn = self.ddp

    # ---- set-up: rank 0 writes, everyone reads the same checkpoint ----

    def _check_run_dir(self, force: bool = False) -> Path | None:
        checkpoint = super()._check_run_dir(force)
        self.ctx.barrier()  # every rank has looked before rank 0 creates anything
        return checkpoint

    def _start_run(self) -> None:
        if self.ctx.is_main:
            super()._start_run()
            path = self.run_dir / "train_config.json"
            saved = json.loads(path.read_text())
            saved.update({"world_size": self.world_size, "source": self.extra_config})
            path.write_text(json.dumps(saved, indent=2) + "\n")
        self.ctx.broadcast_module_(self.sae)  # rank 0's b_dec initialisation
        self.ctx.barrier()

    def _load_checkpoint(self, path: Path) -> None:
        saved = json.loads((self.run_dir / "train_config.json").read_text())
        if saved.get("source") != json.loads(json.dumps(self.extra_config)):
            raise SAEToolkitError(f"cannot resume {self.run_dir}: it was trained from source {saved.get('source')!r}, "
                                  f"not {self.extra_config!r}; pass the original arguments or start a new --out")
        # Rank 0 trims metrics.jsonl first; the others then rewrite the same content, one after another.
        for turn in range(2):
            if (turn == 0) == self.ctx.is_main:
                super()._load_checkpoint(path)
            self.ctx.barrier()

    # ---- the step ----

    def train_one(self, x: torch.Tensor) -> TrainOutput:
        before = self.tokens_since_fired.clone()
        out = super().train_one(x)
        if self.ctx.active:
            fired = self.ctx.any_(out.fired)
            self.tokens_since_fired = torch.where(fired, 0, before + x.shape[0] * self.ctx.world_size)
            for buf in self.sae.buffers():
                if buf.is_floating_point():
                    self.ctx.mean_(buf.data)
        return out

    def resample(self, bar: Any = None) -> int:
        n = super().resample(bar)
        self.ctx.broadcast_module_(self.sae)  # rank 0's choice of directions everywhere
        return n

    # ---- logging and files: gathered to rank 0, written there ----

    @torch.no_grad()
    def log(self, x: torch.Tensor, out: TrainOutput) -> dict[str, float]:
        if self.ctx.active:
            x = self.ctx.all_gather_rows(x)
            out = out._replace(
                x_hat=self.ctx.all_gather_rows(out.x_hat.float()),
                loss=self.ctx.mean_(out.loss.detach().float().clone()),
                l0=self.ctx.mean_(out.l0.detach().float().clone()),
                parts={k: self.ctx.mean_(v.detach().float().clone()) for k, v in out.parts.items()})
        return super().log(x, out) if self.ctx.is_main else {}

    def _open_loggers(self) -> None:
        if self.ctx.is_main:
            super()._open_loggers()

    def save_checkpoint(self) -> Path:
        if self.ctx.is_main:
            path = super().save_checkpoint()
        else:
            self.store.state_dict()  # its collective gathers every rank's stream position into rank 0's file
            path = self.run_dir
        self.ctx.barrier()
        return path

    def save_sae(self) -> Path:
        path = super().save_sae() if self.ctx.is_main else self.run_dir / "sae"
        self.ctx.barrier()
        return path
