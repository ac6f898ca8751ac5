"""The SAE trainer: Trainer.fit() and `train_sae` (one update: `training.step.train_step`, re-exported here).

    >>> run_dir = train_sae(TrainConfig(acts="a.h5", hookpoint="mlp_out.6", arch="topk", out="run"))  # doctest: +SKIP

RUN_DIR holds `sae/` (the final SAE, normalization folded in), `checkpoints/`, `metrics.jsonl` and
`train_config.json` (DESIGN.md §4). Batches, schedules and RNGs are all functions of saved state, so on CPU a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_toolkit import __version__
from sae_toolkit.activations.outliers import describe as describe_positions
from sae_toolkit.activations.pairs import open_store, split_batch
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import MARKER, only_names, remove_owned, replace_dir, write_marker
from sae_toolkit.sae import SAEConfig, TrainOutput, fold_scales_, make_sae
from sae_toolkit.sae.config import TOPK_FAMILY, fixed_lambda_defaults
from sae_toolkit.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from sae_toolkit.training.config import RESUMABLE_CHANGES, TrainConfig
from sae_toolkit.training.divergence import NonFiniteGuard
from sae_toolkit.training.memory import check_fits
from sae_toolkit.training.schedules import (
    default_lr,
    default_warmup_steps,
    lr_at,
    per_token_share_at,
    sparsity_scale_at,
)
from sae_toolkit.training.sparsity import L0Controller, controller_gain
from sae_toolkit.training.step import make_optimizer, train_step
from sae_toolkit.units import resolve_device

__all__ = ["TrainConfig", "Trainer", "train_sae", "train_step"]

COMPILE_BACKEND = "inductor"
"""torch.compile backend of `TrainConfig.compile` (tests use "aot_eager": same graph capture, no codegen)."""

_RUN_FILES = {"train_config.json", "metrics.jsonl", "checkpoints", "sae", ".tmp-sae", "tensorboard",
              ".tmp-train_config.json", ".tmp-metrics.jsonl", MARKER}
"""What a run directory may hold; anything else means --out points at someone else's directory."""

_CALIBRATION_SEED = 7_919
"""store.sample seed of the BatchTopK threshold calibration rows (init uses 0, resampling 1 + step)."""

_RUN_LEGACY = only_names(_RUN_FILES, lambda d: (d / "train_config.json").is_file())
"""A run folder an older sae-toolkit wrote (no ownership marker): --force may replace it."""


class Trainer:
    """Trains one SAE on one hookpoint of an activation file, writing RUN_DIR as it goes."""

    def __init__(self, cfg: TrainConfig, store: Any = None, force: bool = False):
        """store: where batches come from — anything with ActivationStore's attributes (training/sources.py);
        None opens `cfg.acts` at `cfg.hookpoint`. force: delete an earlier run's own files in cfg.out first
        (never others' files; not with resume)."""
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        checkpoint = self._check_run_dir(force)
        self.device = torch.device(resolve_device(cfg.device))
        self.store = store if store is not None else open_store(
            cfg.acts, cfg.hookpoint, cfg.target, batch_size=cfg.batch_size, device=self.device, seed=cfg.seed,
            seq_range=cfg.seq_range, exclude_bos=cfg.exclude_bos, normalize=cfg.normalize,
            in_memory=cfg.in_memory, prefetch=cfg.prefetch, outlier_multiple=cfg.outlier_multiple,
            exclude_first_positions=cfg.exclude_first_positions)
        try:
            self._build(checkpoint)
        except BaseException:
            self.store.close()
            raise

    def _build(self, checkpoint: Path | None) -> None:
        cfg = self.cfg
        self.d_in = self.store.d_in
        self.d_sae = cfg.n_features or cfg.expansion * self.d_in
        self.total_tokens = cfg.tokens or self.store.n_rows
        self.total_steps = self.total_tokens // cfg.batch_size
        if self.total_steps < 1:
            raise SAEToolkitError(f"--tokens {self.total_tokens} is less than one batch of {cfg.batch_size}; "
                                  "raise --tokens or lower --batch-size")
        check_fits(self.d_in, self.d_sae, cfg.batch_size, self.device)
        self.lr = cfg.lr or default_lr(self.d_sae, cfg.arch)
        self.warmup_steps = (default_warmup_steps(cfg.arch, self.total_steps) if cfg.lr_warmup_steps is None
                             else cfg.lr_warmup_steps)
        self.dead_window = cfg.dead_window_tokens or max(cfg.batch_size, min(10_000_000, self.total_tokens // 8))
        self.resample_steps = ({round(f * self.total_steps) for f in cfg.resample_fractions} - {0}
                               if cfg.resample else set())
        # Seeded initialisation without touching the caller's global RNG state.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            self.sae = make_sae(self._sae_config(), device=self.device)
        # fullgraph: a graph break or data-dependent shape is an error, not a silent slow path; dynamic=False:
        # every batch has the same shape
        self._loss_fn = (torch.compile(self.sae.training_loss, fullgraph=True, dynamic=False,
                                       backend=COMPILE_BACKEND) if cfg.compile else None)
        self.opt = make_optimizer(self.sae, self.lr, betas=cfg.adam_betas, steered=cfg.target_l0 is not None,
                                  device=self.device)
        self.step = 0
        self.l0_controller = (L0Controller(cfg.target_l0, gain=controller_gain(self.total_steps), device=self.device)
                              if cfg.target_l0 is not None else None)
        self.tokens_since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.guard = NonFiniteGuard(self.device)
        self._loggers: list[Any] = []
        self._tick = (time.perf_counter(), 0)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        else:
            self._start_run()

    # ---- set-up ----

    def _check_run_dir(self, force: bool = False) -> Path | None:
        """The checkpoint to resume from (None for a new run); refuses to write into a used directory."""
        if force and self.cfg.resume:
            raise SAEToolkitError("--force starts the run over and --resume continues it; pass one of them")
        if not self.cfg.resume:
            if force and self.run_dir.is_dir():
                remove_owned(self.run_dir, "run", force=True, legacy=_RUN_LEGACY)
            if self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
                raise SAEToolkitError(f"run directory {self.run_dir} exists and is not empty; pass --resume to "
                                      "continue it, --force to start it over, or choose a new --out")
            return None
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            # A run killed before its first checkpoint leaves only our own files: start it again from scratch.
            others = sorted(p.name for p in self.run_dir.iterdir() if p.name not in _RUN_FILES) \
                if self.run_dir.is_dir() else []
            if others:
                raise SAEToolkitError(f"--resume: {self.run_dir} has no checkpoint but holds other files "
                                      f"({', '.join(others[:5])}); choose a new --out")
            print(f"--resume: no checkpoint in {self.run_dir} yet; starting from step 0")
        return checkpoint

    def _sae_config(self) -> SAEConfig:
        cfg = self.cfg
        topk_family = cfg.arch in TOPK_FAMILY
        # λ fixed (no target L0): a tanh JumpReLU takes its fixed-λ defaults (sae.config.FIXED_LAMBDA_JUMPRELU)
        fixed = fixed_lambda_defaults(cfg.arch, cfg.jumprelu_loss) if cfg.target_l0 is None else {}
        return SAEConfig(
            arch=cfg.arch, d_in=self.d_in, d_sae=self.d_sae, k=cfg.k if topk_family else None,
            hookpoint=cfg.hookpoint, model=self.store.model,
            l1_coefficient=fixed.get("l1_coefficient") if cfg.l1_coefficient is None else cfg.l1_coefficient,
            jumprelu_bandwidth=fixed.get("jumprelu_bandwidth"),
            decoder_norm_penalty=cfg.decoder_norm_penalty, k_aux=cfg.k_aux if topk_family else None,
            aux_coefficient=cfg.aux_coefficient, multi_topk=cfg.multi_topk, jumprelu_loss=cfg.jumprelu_loss,
            gated_loss=cfg.gated_loss,
            matryoshka_groups=list(cfg.matryoshka_groups) if cfg.matryoshka_groups else None,
            target=cfg.target, d_out=getattr(self.store, "d_out", self.d_in), skip=cfg.skip,
            extra={"train_tokens": self.total_tokens, "train_steps": self.total_steps,
                   "excluded_positions": np.flatnonzero(self.store.excluded_positions).tolist(),
                   "acts": str(cfg.acts), "seq_range": list(self.store.seq_range)})

    def _start_run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(self.run_dir, "run", sorted(_RUN_FILES - {MARKER}))
        rate = self._init_rate()
        if self.cfg.b_dec_init != "zeros" or rate is not None:
            x, y = split_batch(self.store.sample(self.cfg.init_sample, seed=0))
            if self.cfg.b_dec_init != "zeros":
                self.sae.init_b_dec_(x if y is None else y, method=self.cfg.b_dec_init)  # b_dec lives in x̂'s space
            if rate is not None:
                # after b_dec: quantiles of the pre-activations the SAE will see (of x − b_dec where it subtracts b_dec)
                self.sae.init_thresholds_(x.to(self.device), rate)
        resolved = {"d_in": self.d_in, "d_sae": self.d_sae, "lr": self.lr, "total_steps": self.total_steps,
                    "total_tokens": self.total_tokens, "lr_warmup_steps": self.warmup_steps,
                    "dead_window_tokens": self.dead_window, "scale": self.store.scale,
                    "usable_rows": self.store.n_rows,
                    "excluded_positions": np.flatnonzero(self.store.excluded_positions).tolist(),
                    "excluded_outlier_rows": self.store.n_outlier_rows, "device": str(self.device),
                    "toolkit_version": __version__}
        _write_atomic(self.run_dir / "train_config.json",
                      json.dumps({**self.cfg.to_dict(), "resolved": resolved}, indent=2) + "\n")
        (self.run_dir / "metrics.jsonl").write_text("")

    def _init_rate(self) -> float | None:
        """The firing rate every latent's threshold starts at (JumpReLU, tanh Gated: `init_thresholds_`), target L0 /
        d_sae under --target-l0; None (θ₀ = cfg.jumprelu_init_threshold for all) otherwise."""
        if self.cfg.target_l0 is None or not hasattr(self.sae, "init_thresholds_"):
            return None
        return min(self.cfg.target_l0 / self.d_sae, 0.5)

    def _load_checkpoint(self, path: Path) -> None:
        tensors, state = load_checkpoint(path, device=self.device)
        saved = state["train_config"]
        if state["sae_cfg"]["d_in"] != self.d_in:
            raise SAEToolkitError(f"cannot resume {self.run_dir}: it was trained on d_in={state['sae_cfg']['d_in']} "
                                  f"but acts/{self.cfg.hookpoint} in {self.cfg.acts} has d={self.d_in}; resume with "
                                  "the same activations or start a new --out")
        now = self.cfg.to_dict()
        # a key an older version did not write had its default then (e.g. target="" before transcoders)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        defaults["gated_loss"] = "l1"  # gated runs from before the option trained with the L1 loss
        changed = [f"{k} was {saved.get(k, defaults[k])!r}, now {now[k]!r}" for k in now
                   if k not in RESUMABLE_CHANGES and json.loads(json.dumps(now[k])) != saved.get(k, defaults[k])]
        if changed:
            raise SAEToolkitError(f"cannot resume {self.run_dir} with other settings ({'; '.join(changed)}); pass "
                                  "the original arguments or start a new --out")
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        scales = [g["lr_scale"] for g in self.opt.param_groups]
        optimizer_from_flat(self.opt, tensors, state["optimizer"])
        # the groups' lr factors are this code's, not the checkpoint's: they are not settings of the run (a steered
        # Gated run saved before b_gate's factor went from 10 to 3 would otherwise keep the 10)
        for group, scale in zip(self.opt.param_groups, scales, strict=True):
            group["lr_scale"] = scale
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        if self.l0_controller is not None:
            self.l0_controller.load_state_tensors_(tensors)
        self.generator.set_state(tensors["rng.resample"].cpu())
        self.store.load_state_dict(state["store"])
        self.step = int(state["step"])
        # Lines logged after this checkpoint belong to the lost future; the resumed run writes them again.
        metrics = self.run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        kept = [line for line in lines if _logged_step(line) <= self.step]
        _write_atomic(metrics, "".join(line + "\n" for line in kept))
        print(f"resuming {self.run_dir} from step {self.step}/{self.total_steps} ({path.name})")

    # ---- the loop ----

    def fit(self) -> Path:
        """Train to `total_steps`, logging and checkpointing on the way; returns RUN_DIR."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        print(f"training {cfg.arch} SAE d_in={self.d_in} d_sae={self.d_sae} on {self.total_tokens:,} tokens "
              f"({self.total_steps} steps of {cfg.batch_size}; {self.total_tokens / self.store.n_rows:.2f} passes over "
              f"{self.store.n_rows:,} usable rows; massive-activation "
              f"{describe_positions(self.store.excluded_positions)} excluded: {self.store.n_outlier_rows:,} rows) "
              f"on {self.device} → {self.run_dir}")
        bar = tqdm(total=self.total_steps * cfg.batch_size, initial=self.step * cfg.batch_size, unit="tok",
                   unit_scale=True, desc=f"train {cfg.arch}", dynamic_ncols=True)
        self._tick = (time.perf_counter(), self.step)
        last_saved = self.step
        try:
            self._open_loggers()
            while self.step < self.total_steps:
                if self.step in self.resample_steps:
                    self.resample(bar)
                x, y = split_batch(self.store.next_batch())  # y: a transcoder's target, else None
                out = self.train_one(x) if y is None else self.train_one(x, y)  # one-argument overrides still work
                self.step += 1
                self.guard.update(out.loss, self.step)
                bar.update(cfg.batch_size)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.guard.check(self.sae, self.step, self.run_dir, self.lr)
                    bar.set_postfix(self.log(x if y is None else y, out), refresh=False)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            if last_saved != self.step:
                self.save_checkpoint()
            self.save_sae()
        finally:
            bar.close()
            self.store.close()
            self._close_loggers()
        return self.run_dir

    def train_one(self, x: torch.Tensor, y: torch.Tensor | None = None) -> TrainOutput:
        """One update at the current step's lr and λ scale (y: a transcoder's target); updates the dead-latent
        counters (and λ for a target L0)."""
        sparsity_scale = sparsity_scale_at(self.step, self.total_steps, self.cfg.l1_warmup_fraction)
        steer = self.l0_controller is not None and sparsity_scale == 1.0
        if self.l0_controller is not None:
            sparsity_scale = sparsity_scale * self.l0_controller.scale()
        if self.cfg.compile and not isinstance(sparsity_scale, torch.Tensor):
            # a tensor, or every new float value would recompile the graph
            sparsity_scale = torch.tensor(sparsity_scale, device=self.device)
        if hasattr(self.sae, "per_token_share"):  # BatchTopK family: from per-token TopK to BatchTopK
            self.sae.per_token_share = per_token_share_at(self.step, self.total_steps, self.cfg.topk_start_fraction)
        out = train_step(
            self.sae, self.opt, x,
            lr=lr_at(self.step, self.total_steps, self.lr, warmup_steps=self.warmup_steps,
                     decay=self.cfg.lr_decay, decay_fraction=self.cfg.lr_decay_fraction),
            dead_mask=self.dead_mask(),
            sparsity_scale=sparsity_scale, autocast=self.cfg.autocast and self.device.type == "cuda",
            max_grad_norm=self.cfg.max_grad_norm, loss_fn=self._loss_fn, target=y)
        self.tokens_since_fired = torch.where(out.fired, 0, self.tokens_since_fired + x.shape[0])
        if steer:
            self.l0_controller.update_(out.l0)
        return out

    def sparsity_coefficient(self) -> float:
        """λ the run uses now (after any target-L0 steering), without the warm-up ramp."""
        base = self.sae.cfg.l1_coefficient
        return base * float(self.l0_controller.scale()) if self.l0_controller is not None else base

    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired in the last `dead_window` tokens."""
        return self.tokens_since_fired >= self.dead_window

    def resample(self, bar: Any = None) -> int:
        from sae_toolkit.training.resample import resample_dead_latents_, resample_thresholded_

        inputs = self.store.sample(self.cfg.resample_sample, seed=1 + self.step)
        if self.cfg.arch == "relu":
            n = resample_dead_latents_(self.sae, self.opt, self.dead_mask(), inputs, self.generator)
        else:  # jumprelu, tanh gated: thresholds from data at the run's start rate (or its current L0 without target)
            n = resample_thresholded_(self.sae, self.opt, self.dead_mask(), inputs, self.generator, self._init_rate())
        self.tokens_since_fired[self.dead_mask()] = 0
        if bar is not None and n:
            bar.write(f"step {self.step}: resampled {n} dead latents")
        return n

    # ---- logging ----

    @torch.no_grad()
    def log(self, x: torch.Tensor, out: TrainOutput) -> dict[str, float]:
        """Append one line to metrics.jsonl (and the optional loggers); returns a short summary for the bar.
        x is what out.x_hat approximates: the batch, or a transcoder's target batch."""
        now = time.perf_counter()
        x_hat = out.x_hat.float()
        sq_err = (x - x_hat).pow(2).sum()
        row = {"step": self.step, "tokens": self.step * self.cfg.batch_size, "loss": out.loss.item()}
        row.update({f"loss_{name}": v.item() for name, v in out.parts.items()})
        row.update({
            "mse": sq_err.item() / x.numel(),
            "fvu": (sq_err / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)).item(),
            "l0": out.l0.item(),
            "dead_fraction": self.dead_mask().float().mean().item(),
            "lr": self.opt.param_groups[0]["lr"],
            "sparsity_scale": sparsity_scale_at(self.step - 1, self.total_steps, self.cfg.l1_warmup_fraction),
            "l1_coefficient": self.sparsity_coefficient(),
            "epoch": self.store.epoch,
            "tokens_per_s": (self.step - self._tick[1]) * self.cfg.batch_size / max(now - self._tick[0], 1e-9),
        })
        self._tick = (now, self.step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for log_row, _ in self._loggers:
            log_row(row)
        return {"loss": f"{row['loss']:.4g}", "fvu": f"{row['fvu']:.3f}", "l0": f"{row['l0']:.1f}",
                "dead": f"{row['dead_fraction']:.1%}"}

    def _open_loggers(self) -> None:
        """Optional external loggers, each a `(log(row), close())` pair."""
        name = self.cfg.run_name or self.run_dir.name
        if self.cfg.logger == "wandb":
            try:
                import wandb
            except ImportError:
                raise SAEToolkitError("logger='wandb' needs wandb: pip install 'sae-toolkit[wandb]'") from None
            run = wandb.init(project=self.cfg.wandb_project, name=name, config=self.cfg.to_dict(), resume="allow")
            self._loggers.append((lambda row: run.log(row, step=row["step"]), run.finish))
        elif self.cfg.logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SAEToolkitError("logger='tensorboard' needs tensorboard: pip install "
                                      "'sae-toolkit[tensorboard]'") from None
            writer = SummaryWriter(str(self.run_dir / "tensorboard" / name))

            def log_scalars(row: dict[str, float]) -> None:
                for key, value in row.items():
                    if key != "step":
                        writer.add_scalar(key, value, row["step"])

            self._loggers.append((log_scalars, writer.close))

    def _close_loggers(self) -> None:
        for _, close in self._loggers:
            close()
        self._loggers = []

    # ---- checkpoints and the final SAE ----

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: weights, Adam state, counters, RNGs, stream position."""
        self.guard.check(self.sae, self.step, self.run_dir, self.lr)  # never save a diverged state
        opt_tensors, opt_meta = optimizer_to_flat(self.opt)
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors.update(opt_tensors)
        tensors.update({"tokens_since_fired": self.tokens_since_fired, "rng.resample": self.generator.get_state()})
        if self.l0_controller is not None:
            tensors.update(self.l0_controller.state_tensors())
        state = {"step": self.step, "total_steps": self.total_steps, "store": self.store.state_dict(),
                 "optimizer": opt_meta, "sae_cfg": self.sae.cfg.to_dict(), "train_config": self.cfg.to_dict(),
                 "toolkit_version": __version__}
        return save_checkpoint(self.run_dir, self.step, tensors, state, keep=self.cfg.keep_checkpoints)

    def save_sae(self) -> Path:
        """Write RUN_DIR/sae with the activation scale folded in, so it works on raw activations."""
        sae = copy.deepcopy(self.sae)
        if hasattr(sae, "calibrate_threshold_") and self.cfg.threshold_calibration_rows:
            # BatchTopK family: θ from the final weights on training rows, so inference keeps k per token
            rows = self.store.sample(self.cfg.threshold_calibration_rows, seed=_CALIBRATION_SEED)
            sae.calibrate_threshold_(split_batch(rows)[0].to(self.device))
        if self.l0_controller is not None:
            # the steered λ, so the saved config says what the run ended with (λ is in normalized units)
            sae.cfg.l1_coefficient = self.sparsity_coefficient()
            sae.cfg.extra["target_l0"] = self.cfg.target_l0
        if self.cfg.target:
            fold_scales_(sae, self.store.scale, self.store.target_scale)
        else:
            sae.fold_scale_(self.store.scale)
        final, tmp = self.run_dir / "sae", self.run_dir / ".tmp-sae"
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save(tmp)
        replace_dir(tmp, final)  # a kill leaves the old sae/ or the new one, never a half-written one that loads
        return final


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short by a kill (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_sae(cfg: TrainConfig, force: bool = False) -> Path:
    """Train an SAE as `cfg` says; returns RUN_DIR (final SAE in RUN_DIR/sae). force: start over in an earlier
    run's RUN_DIR (only its own files are deleted)."""
    return Trainer(cfg, force=force).fit()
