"""TrainConfig: every setting of an SAE training run, validated on construction; saved as train_config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import ARCHS

# Fields that may change between a run and its --resume without changing what is computed.
RESUMABLE_CHANGES = {"acts", "out", "resume", "device", "log_every", "checkpoint_every", "keep_checkpoints",
                      "logger", "wandb_project", "run_name", "prefetch",
                      "compile", "threshold_calibration_rows"}


@dataclass
class TrainConfig:
    """Everything `train_sae` needs; saved as RUN_DIR/train_config.json."""

    acts: str
    """Activation file (HDF5, DESIGN.md §3)."""
    hookpoint: str
    """Dataset under acts/ to train on."""
    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
    """SAE architecture."""
    expansion: int = 8
    """d_sae = expansion · d_in (ignored when n_features is set)."""
    n_features: int | None = None
    """d_sae, overriding expansion."""
    k: int = 32
    """Active latents per token (topk; mean per token for batchtopk, matryoshka). Unused by the other archs."""
    l1_coefficient: float | None = None
    """Sparsity coefficient λ (relu, gated: L1; jumprelu: tanh/L0). None: the arch default for normalized inputs;
    with target_l0, the starting value."""
    target_l0: float | None = None
    """relu, gated, jumprelu: steer λ during training so the run ends at this mean L0 (the final λ is saved in
    the SAE's cfg.json)."""
    lr: float | None = None
    """Adam learning rate. None: 2e-4 · sqrt(2^14 / d_sae) (Gao et al. 2024) times a per-arch factor
    (schedules.default_lr)."""
    batch_size: int = 4096
    """Tokens per step."""
    tokens: int | None = None
    """Training tokens. None: one pass over the usable rows; more than the file holds cycles through it."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    seed: int = 0
    """Seeds the SAE initialisation, the batch order and resampling."""
    out: str = ""
    """RUN_DIR. Must be empty or absent unless resume is set."""
    resume: bool = False
    """Continue from the newest checkpoint in RUN_DIR."""
    target: str = ""
    """Train a transcoder: the dataset under acts/ the decoder predicts from `hookpoint` (e.g. mlp_out.6 from
    mlp_in.6). Empty: an SAE reconstructing `hookpoint`."""
    skip: bool = False
    """Transcoders: add a learned linear skip path W_skip x (initialised to zero) to the decoder output."""

    seq_range: tuple[int, int] | None = None
    """Train only on sequences [start, stop) of the file, e.g. to hold out the rest for evaluation."""
    normalize: bool = True
    """Scale activations to mean norm sqrt(d_in) during training (folded into the saved SAE), so that λ and lr
    defaults carry across models and layers."""
    exclude_bos: bool = True
    """Skip BOS positions (their activations are huge outliers that waste latents)."""
    outlier_multiple: float | None = 5.0
    """Exclude massive-activation positions (attention sinks): window positions whose median activation norm is
    above this multiple of the overall median (activations/outliers.py). None or 0: keep them."""
    exclude_first_positions: int = 0
    """Also exclude the first N positions of every window."""
    in_memory: bool | Literal["auto"] = "auto"
    """Load the usable rows into RAM (full shuffle each pass); auto: when they take at most half the available RAM
    in the file's dtype."""
    prefetch: int = 4
    """Batches the store prepares ahead in its background thread."""

    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial b_dec: geometric median (Anthropic 2023) or mean of a sample, or zeros."""
    init_sample: int = 16384
    """Rows sampled for the b_dec initialisation."""

    lr_warmup_steps: int | None = None
    """Linear lr warm-up. None: min(1000, 5% of the steps) for the TopK family, 0 for relu, gated, jumprelu."""
    lr_decay: Literal["linear", "cosine", "none"] = "linear"
    """Decay to ~0 over the last lr_decay_fraction of training."""
    lr_decay_fraction: float = 0.2
    """Share of training (at the end) over which lr decays."""
    l1_warmup_fraction: float = 0.05
    """Share of training (at the start) over which λ ramps up linearly from 0."""
    adam_betas: tuple[float, float] | None = None
    """Adam β1, β2. None: (0, 0.999) for jumprelu (Rajamanoharan et al. 2024: without momentum its thresholds'
    straight-through gradients trained better; on SmolLM2 activations at L0 32 held-out EV 0.842 vs 0.819, dead
    latents 0.1 % vs 2.2 %) and for gated with gated_loss="tanh" (the same estimator on its gate), else
    (0.9, 0.999)."""
    max_grad_norm: float | None = None
    """Clip the gradient norm to this value. None: 1 for relu with decoder_norm_penalty (Anthropic April 2024),
    else no clipping."""
    autocast: bool = True
    """bf16 autocast on CUDA (weights and Adam state stay fp32). No effect on CPU."""
    compile: bool = False
    """Run the training loss and its backward through torch.compile(fullgraph=True) (one graph, no host syncs).
    The first step pays the compilation (a minute or more on CPU); worth it for long GPU runs."""

    decoder_norm_penalty: bool = False
    """relu: Anthropic's April-2024 variant (λ Σ fᵢ‖W_dec,i‖, decoder norms free) instead of unit-norm rows."""
    k_aux: int | None = None
    """topk/batchtopk: dead latents in the AuxK loss. None: d_in // 2."""
    aux_coefficient: float = 1 / 32
    """topk/batchtopk: AuxK loss weight (0 disables AuxK)."""
    multi_topk: bool = False
    """topk: add the Multi-TopK loss L(4k)/8."""
    topk_start_fraction: float = 0.5
    """batchtopk, matryoshka: share of training (at the start) over which the selection moves linearly from the top
    k per token, as TopK, to the batch-wide top k·batch (BatchTopKSAE.per_token_share); 0: batch-wide from the
    first step."""
    threshold_calibration_rows: int = 65536
    """batchtopk, matryoshka: training rows on which the saved SAE's inference threshold θ is set from the final
    weights, so that it keeps k latents per token on average (BatchTopKSAE.calibrate_threshold_). 0: keep the
    EMA of the per-batch minima instead."""
    jumprelu_loss: Literal["tanh", "step"] = "tanh"
    """jumprelu: Anthropic's January-2025 tanh penalty with the pre-activation term, or the L0 step-function
    estimator of Rajamanoharan et al. 2024."""
    gated_loss: Literal["tanh", "l1"] = "tanh"
    """gated: the JumpReLU tanh recipe on the gate (default) or the paper's L1 + auxiliary loss (SAEConfig)."""
    matryoshka_groups: tuple[int, ...] | None = None
    """matryoshka: nested group sizes summing to d_sae. None: two halves (see SAEConfig.matryoshka_groups)."""

    dead_window_tokens: int | None = None
    """A latent is dead when it has not fired in this many tokens. None: min(10M (Gao et al.), tokens / 8)."""
    resample: bool | None = None
    """relu: resample dead latents (Anthropic 2023) at resample_fractions of training; jumprelu and gated (tanh
    loss): re-point dead and starving latents at residual directions, their thresholds set to fire at a tenth of the
    run's rate (training/resample.py). None: on for relu, and for jumprelu under target_l0 (not for transcoders)."""
    resample_fractions: tuple[float, ...] | None = None
    """Points of training (fractions of the steps) where dead latents are resampled. None: (0.125, 0.25, 0.375,
    0.5) for relu, (0.25, 0.5, 0.75) for jumprelu and gated."""
    resample_sample: int = 16384
    """Inputs scored to choose resampling directions."""

    log_every: int = 50
    """Steps between lines of metrics.jsonl."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    logger: Literal["none", "wandb", "tensorboard"] = "none"
    """Also send metrics to Weights & Biases or TensorBoard (optional packages)."""
    wandb_project: str = "sae-toolkit"
    """W&B project when logger is wandb."""
    run_name: str = ""
    """Name for W&B / TensorBoard (default: the RUN_DIR name)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SAEToolkitError(f"arch {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
        if not self.out:
            raise SAEToolkitError("no run directory given; pass --out RUN_DIR")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise SAEToolkitError(f"seed={self.seed!r} must be an integer from 0 to 2**32 - 1, e.g. --seed 0")
        for name in ("expansion", "k", "batch_size", "init_sample", "log_every", "checkpoint_every",
                     "resample_sample", "prefetch"):
            _check_positive_int(name, getattr(self, name))
        for name in ("n_features", "tokens", "dead_window_tokens"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if isinstance(self.threshold_calibration_rows, bool) or not isinstance(self.threshold_calibration_rows, int) \
                or self.threshold_calibration_rows < 0:
            raise SAEToolkitError(f"threshold_calibration_rows={self.threshold_calibration_rows!r} must be a "
                                  "non-negative integer (0 keeps the EMA threshold)")
        if self.lr_warmup_steps is not None and (not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0):
            raise SAEToolkitError(f"lr_warmup_steps={self.lr_warmup_steps!r} must be a non-negative integer")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise SAEToolkitError(f"lr={self.lr!r} must be a positive number, e.g. 2e-4")
        for name in ("lr_decay_fraction", "l1_warmup_fraction", "topk_start_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SAEToolkitError(f"{name}={getattr(self, name)!r} must be between 0 and 1")
        if self.resample_fractions is None:
            self.resample_fractions = (0.125, 0.25, 0.375, 0.5) if self.arch == "relu" else (0.25, 0.5, 0.75)
        self.resample_fractions = tuple(float(f) for f in self.resample_fractions)
        if any(not 0.0 < f < 1.0 for f in self.resample_fractions):
            raise SAEToolkitError(f"resample_fractions={self.resample_fractions} must lie strictly between 0 and 1")
        if self.skip and not self.target:
            raise SAEToolkitError("skip=True (--skip) needs a transcoder; pass target (--target HP) as well")
        if self.resample and self.target:
            raise SAEToolkitError("dead-latent resampling is not implemented for transcoders; set resample=False "
                                  "(or use arch topk, whose AuxK loss revives dead latents)")
        thresholded = self.arch == "jumprelu" or (self.arch == "gated" and self.gated_loss == "tanh")
        if self.resample is None:
            # not gated by default: on SmolLM2 at L0 16 its resampled latents died again (2.6 → 4.1 % dead)
            self.resample = not self.target and (self.arch == "relu" or (self.arch == "jumprelu"
                                                                         and self.target_l0 is not None))
        if self.resample and self.arch != "relu" and not thresholded:
            what = f"{self.arch!r}" + (f" with gated_loss={self.gated_loss!r}" if self.arch == "gated" else "")
            raise SAEToolkitError(f"resample applies to relu, jumprelu and gated (gated_loss='tanh') SAEs, not {what} "
                                  "(topk/batchtopk revive dead latents with AuxK); set resample=False")
        if self.target_l0 is not None:
            if self.arch not in ("relu", "gated", "jumprelu"):
                raise SAEToolkitError(f"target_l0 steers the sparsity coefficient of relu, gated and jumprelu; arch "
                                      f"{self.arch!r} sets its L0 with k (pass --k {int(self.target_l0)} instead)")
            if not (isinstance(self.target_l0, (int, float)) and 0 < self.target_l0 < math.inf):
                raise SAEToolkitError(f"target_l0={self.target_l0!r} must be a positive number, e.g. 32")
        if self.max_grad_norm is None and self.decoder_norm_penalty:
            self.max_grad_norm = 1.0
        if self.decoder_norm_penalty and self.arch != "relu":
            raise SAEToolkitError(f"decoder_norm_penalty is the relu April-2024 variant, not for arch {self.arch!r}")
        if self.jumprelu_loss not in ("tanh", "step"):
            raise SAEToolkitError(f"jumprelu_loss={self.jumprelu_loss!r}; choose 'tanh' or 'step'")
        if self.gated_loss not in ("tanh", "l1"):
            raise SAEToolkitError(f"gated_loss={self.gated_loss!r}; choose 'tanh' or 'l1'")
        if self.matryoshka_groups is not None:
            if self.arch != "matryoshka":
                raise SAEToolkitError(f"matryoshka_groups is a matryoshka option, not for arch {self.arch!r}")
            self.matryoshka_groups = tuple(int(g) for g in self.matryoshka_groups)
        if self.seq_range is not None:
            if len(self.seq_range) != 2 or not 0 <= int(self.seq_range[0]) < int(self.seq_range[1]):
                raise SAEToolkitError(f"seq_range={self.seq_range!r} must be (start, stop) with 0 <= start < stop")
            self.seq_range = (int(self.seq_range[0]), int(self.seq_range[1]))
        if self.adam_betas is None:
            ste = self.arch == "jumprelu" or (self.arch == "gated" and self.gated_loss == "tanh")
            self.adam_betas = (0.0, 0.999) if ste else (0.9, 0.999)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        for name, choices in (("b_dec_init", ("geometric_median", "mean", "zeros")),
                              ("lr_decay", ("linear", "cosine", "none")),
                              ("logger", ("none", "wandb", "tensorboard"))):
            if getattr(self, name) not in choices:
                raise SAEToolkitError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(choices)}")
        if self.in_memory not in (True, False, "auto"):
            raise SAEToolkitError(f"in_memory={self.in_memory!r}; choose True, False or 'auto'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SAEToolkitError(f"{name}={v!r} must be a positive integer")
