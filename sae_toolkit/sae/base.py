"""The SAE base class: parameters in paper notation, encode/decode/forward, decoder-norm upkeep, save/load."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_toolkit import __version__
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import kernels
from sae_toolkit.sae.config import ARCHS, SAEConfig
from sae_toolkit.sae.registry import load_foreign, make_sae

__all__ = ["ARCHS", "SAE", "SAEConfig", "SAEOutput", "TrainOutput"]

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"


class SAEOutput(NamedTuple):
    """What an SAE's forward returns."""

    x_hat: Tensor
    """[..., d_out] reconstruction of the input (a transcoder: prediction of the target; d_out = d_in for SAEs)."""

    feature_acts: Tensor
    """[..., d_sae] latent activations, dense (zeros where a latent is off)."""


class TrainOutput(NamedTuple):
    """What `SAE.training_loss` returns to the trainer."""

    loss: Tensor
    """Scalar the trainer backpropagates (sum of the weighted parts)."""

    x_hat: Tensor
    """[batch, d_out] reconstruction (of the main, k-sparse path for Multi-TopK); a transcoder's prediction."""

    fired: Tensor
    """[d_sae] bool, latents with an activation > 0 somewhere in the batch (dead-latent tracking)."""

    l0: Tensor
    """Scalar, mean number of active latents per token."""

    parts: dict[str, Tensor]
    """Scalar loss parts, already weighted as they enter `loss`: {"mse", "l1"}, {"mse", "auxk"}, {"mse", "l0"}, ..."""


class SAE(nn.Module, ABC):
    """A sparse autoencoder  f = σ(W_encᵀ(x − b_dec) + b_enc),  x̂ = W_decᵀ f + b_dec.

    σ is the architecture's activation (ReLU, TopK, BatchTopK, JumpReLU, gate × magnitude); subclasses implement
    `encode` and `training_loss`. Parameters: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in];
    the b_dec subtraction before encoding follows `cfg.apply_b_dec_to_input`.

    Transcoders (cfg.target set) read one hookpoint and predict another: W_dec [d_sae, d_out], b_dec [d_out],
    b_dec never subtracted from x, and with cfg.skip  x̂ = W_decᵀ f + b_dec + W_skipᵀ x, W_skip [d_in, d_out]
    (see sae/transcoder.py). The training loss then compares x̂ with the target batch, not x.

    Example:
        >>> from sae_toolkit.sae import make_sae
        >>> sae = make_sae(SAEConfig(arch="topk", d_in=8, d_sae=32, k=4))
        >>> out = sae(torch.randn(5, 8))
        >>> out.x_hat.shape, int((out.feature_acts > 0).sum(-1).max()) <= 4
        (torch.Size([5, 8]), True)
    """

    archs: ClassVar[tuple[str, ...]] = ()
    """The cfg.arch values a subclass implements (`registry.register` maps them to it for make_sae / load)."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None) -> None:
        super().__init__()
        if cfg.arch not in self.archs:
            raise SAEToolkitError(f"{type(self).__name__} implements {self.archs}, not arch {cfg.arch!r}; use make_sae")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        # Random unit directions for the decoder, encoder initialised as its transpose (Gao et al. 2024 §A.1;
        # Anthropic April 2024 do the same with row norm 0.1 for the decoder-norm-penalty variant).
        W_dec = torch.randn(cfg.d_sae, cfg.d_out, device=device)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        if cfg.decoder_norm_penalty:
            W_dec *= 0.1
        # A transcoder whose input and output widths differ cannot start its encoder as the decoder transpose;
        # it gets its own random unit columns. Equal widths keep the transpose start.
        W_enc = W_dec.T if cfg.d_out == cfg.d_in else _unit_columns(cfg.d_in, cfg.d_sae, device)
        # W_enc [d_in, d_sae] is stored latent-major (strides (1, d_in): each latent's column contiguous, the layout
        # of nn.Linear's weight), a copy (tied storage would apply every update to both). The sparse backwards sum
        # ∂W_enc per latent, [d_sae, d_in], which is then its gradient as is: d_in-major storage cost a transposed
        # copy every step (3.3 ms on one CPU thread at 576 × 4608); the encoder GEMM takes either layout at one
        # speed when it writes [batch, d_sae] (JumpReLU's latent-major output is ~4 % slower on one thread).
        self.W_enc = nn.Parameter(W_enc.t().to(dtype, copy=True, memory_format=torch.contiguous_format).t())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, device=device, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, device=device, dtype=dtype))

    # ---- the model -------------------------------------------------------------------------------------------

    def _sae_in(self, x: Tensor) -> Tensor:
        """[..., d_in] → the encoder's input: x − b_dec, or x itself when apply_b_dec_to_input is off."""
        self._check_input(x)
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae] encoder pre-activations W_encᵀ(x − b_dec) + b_enc."""
        # addmm-fused bias: a separate add over [batch, d_sae] costs ~40% of the matmul on CPU
        return F.linear(self._sae_in(x), self.W_enc.t(), self.b_enc)

    @torch.no_grad()
    def _encoder_pass(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pre [batch, d_sae], sae_in [batch, d_in]) of a training batch, without autograd: kernels that write
        their own backward attach the gradients (`kernels.dense_pre_acts`, `jumprelu._TanhStep`)."""
        sae_in = self._sae_in(x)
        return F.linear(sae_in, self.W_enc.t(), self.b_enc), sae_in

    def _pre_acts_with_grad(self, x: Tensor, computed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`pre_acts` of a [batch, d_in] training batch through `kernels.dense_pre_acts`: the same values and
        gradients, with ∂b_dec as one matvec and ∂W_enc from G's non-zero entries when few gates are open.
        computed: `_encoder_pass(x)` when the caller already ran it."""
        pre, sae_in = computed if computed is not None else self._encoder_pass(x)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return kernels.dense_pre_acts(pre, sae_in, self.W_enc, self.b_enc, b_dec)

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae] latent activations (dense)."""

    def decode(self, f: Tensor) -> Tensor:
        """[..., d_sae] → [..., d_out] reconstruction W_decᵀ f + b_dec (without a skip transcoder's W_skipᵀ x)."""
        if f.shape[-1] != self.cfg.d_sae:
            raise SAEToolkitError(f"decode got latents of width {f.shape[-1]}, this SAE has d_sae={self.cfg.d_sae}")
        if not torch.is_autocast_enabled(f.device.type):  # under autocast the matmul picks the dtype; a cast
            f = f.to(self.W_dec.dtype)  # here would write a float32 [..., d_sae] copy only to cast it back
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        """[..., d_in] → SAEOutput(x_hat [..., d_out], feature_acts [..., d_sae]); equals decode(encode(x)),
        plus skip(x) for a skip transcoder."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return SAEOutput(x_hat + self.skip_out(x) if self.cfg.skip else x_hat, f)

    def skip_out(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_out] the skip path W_skipᵀ x of a skip transcoder (zeros without one)."""
        if not self.cfg.skip:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out)
        return x.to(self.W_skip.dtype) @ self.W_skip

    def _target(self, x: Tensor, target: Tensor | None) -> Tensor:
        """What the training loss compares x̂ with: `target` [batch, d_out] for a transcoder, else x itself."""
        if target is None:
            if self.cfg.target:
                raise SAEToolkitError(f"this transcoder predicts {self.cfg.target!r}; pass its batch as target=")
            return x
        if target.shape != (*x.shape[:-1], self.cfg.d_out):
            raise SAEToolkitError(f"target has shape {tuple(target.shape)}, expected {(*x.shape[:-1], self.cfg.d_out)}"
                                  " (the input's rows, d_out wide)")
        return target.to(self.W_dec.dtype)

    @abstractmethod
    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one training batch.

        x: [batch, d_in]. dead_mask: [d_sae] bool, latents the trainer counts as dead (TopK-family AuxK uses it).
        sparsity_scale: factor in [0, 1] on the sparsity coefficient λ (the trainer's warm-up; relu, jumprelu,
        gated). target: [batch, d_out], what a transcoder predicts (None for an SAE: x itself). The reconstruction
        term is the MSE summed over d_out and averaged over the batch, mean_b ‖y_b − x̂_b‖² (y the target or x), in
        every architecture; a skip transcoder's x̂ includes W_skipᵀ x.
        """

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise SAEToolkitError(
                f"input has width {x.shape[-1]} but this SAE has d_in={self.cfg.d_in}"
                f" (hookpoint {self.cfg.hookpoint or '?'}); pass activations of the hookpoint it was trained on"
            )

    @staticmethod
    def _row_sum(t: Tensor) -> Tensor:
        """[batch, d_sae] → [batch] sums in at least float32 (bf16 autocast rows would round to 3 digits)."""
        return t.sum(-1, dtype=torch.promote_types(t.dtype, torch.float32))

    @staticmethod
    def _mse(x: Tensor, x_hat: Tensor) -> Tensor:
        """mean_b ‖x_b − x̂_b‖²: summed over d_in, averaged over the batch."""
        return (x - x_hat).pow(2).sum(-1).mean()

    # ---- decoder-norm upkeep (trainer: remove_parallel_grad_ before step, normalize_decoder_ after) ------------

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether this SAE keeps decoder rows at unit norm (the trainer then calls the two methods below)."""
        return bool(self.cfg.normalize_decoder)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from W_dec.grad each row's component parallel to that row (the step then moves along the sphere)."""
        if self.W_dec.grad is None:
            return
        dt = torch.promote_types(self.W_dec.dtype, torch.float32)  # bf16 rows: project in float32
        W = self.W_dec.detach().to(dt)
        g = self.W_dec.grad.to(dt)
        # row dots / vector_norm: no [d_sae, d_in] temporaries (this runs every step)
        coef = kernels.row_dots(g, W) / torch.linalg.vector_norm(W, dim=-1).square().clamp_min(1e-12)  # [d_sae]
        if g.data_ptr() == self.W_dec.grad.data_ptr():
            self.W_dec.grad.addcmul_(coef[:, None], W, value=-1)  # in one pass, no [d_sae, d_in] temporary
        else:
            self.W_dec.grad.copy_(g - coef[:, None] * W)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row W_dec[i] to unit norm."""
        dt = torch.promote_types(self.W_dec.dtype, torch.float32)  # bf16 rows: norms in float32
        norm = torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True, dtype=dt)
        self.W_dec.div_(norm.clamp_min(1e-12).to(self.W_dec.dtype))

    @torch.no_grad()
    def project_(self) -> None:
        """Put the parameters back into the set the architecture trains in (the trainer calls it after every
        optimizer step, after normalize_decoder_). Default: nothing; GatedSAE keeps its magnitude positive wherever
        its gate opens."""

    # ---- initialisation and normalisation --------------------------------------------------------------------

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor, method: Literal["geometric_median", "mean"] = "geometric_median") -> None:
        """Set b_dec from sample [n, d_out] (what the decoder outputs: the input, or a transcoder's target): its
        geometric median (Anthropic 2023) or its mean."""
        if sample.ndim != 2 or sample.shape[0] < 1:
            raise SAEToolkitError(f"init_b_dec_ needs a [n, d_out] sample with n >= 1, got shape {tuple(sample.shape)}")
        if sample.shape[1] != self.cfg.d_out:
            raise SAEToolkitError(f"init_b_dec_ got a sample of width {sample.shape[1]}, b_dec has d_out="
                                  f"{self.cfg.d_out}; pass rows of the activations the decoder outputs")
        sample = sample.to(self.b_dec.device, torch.float32)
        if method == "mean":
            center = sample.mean(0)
        elif method == "geometric_median":
            center = geometric_median(sample)
        else:
            raise SAEToolkitError(f"init_b_dec_ method={method!r}; choose 'geometric_median' or 'mean'")
        self.b_dec.copy_(center)

    @torch.no_grad()
    def fold_scale_(self, scale: float) -> None:
        """The SAE was trained on x·scale; rewrite it so it works on raw x with x̂(x) = x̂_trained(x·scale) / scale.

        Latent activations come out divided by `scale` (in raw units) and decoder rows keep their norms: biases and
        thresholds are divided by `scale`, W_enc and W_dec stay. Records the factor in cfg.act_scale.
        """
        try:
            scale = float(scale)  # numpy / 0-d tensor scales too
        except (TypeError, ValueError):
            raise SAEToolkitError(f"fold_scale_ needs a positive finite number, got {scale!r}") from None
        if not 0 < scale < float("inf"):
            raise SAEToolkitError(f"fold_scale_ needs a positive finite scale, got {scale!r}")
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)
        self._fold_extra_(scale)
        self.cfg.act_scale *= scale

    def _fold_extra_(self, scale: float) -> None:
        """Subclasses divide their own biases/thresholds by `scale` here."""

    # ---- save / load -----------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors sae.safetensors holds, by their paper names (+ W_skip [d_in, d_out] for a skip transcoder)."""
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return {**tensors, "W_skip": self.W_skip} if self.cfg.skip else tensors

    def load_state_tensors_(self, tensors: dict[str, Tensor]) -> None:
        """Copy tensors (named as in `state_tensors`) into this SAE; a missing or misshaped one is an error."""
        with torch.no_grad():
            for name, dst in self.state_tensors().items():
                if name not in tensors:
                    raise SAEToolkitError(f"SAE weights lack tensor {name!r} needed by arch {self.cfg.arch!r}")
                src = tensors[name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise SAEToolkitError(
                        f"SAE tensor {name!r} has shape {tuple(src.shape)}, cfg.json implies {tuple(dst.shape)}"
                    )
                dst.copy_(src)

    def save(self, path: str | Path) -> Path:
        """Write directory `path` with cfg.json and sae.safetensors; returns the directory."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.cfg.dtype = str(self.W_enc.dtype).removeprefix("torch.")
        self.cfg.toolkit_version = __version__
        tensors = {n: t.detach().contiguous().cpu() for n, t in self.state_tensors().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "sae_toolkit.sae"})
        (path / CFG_NAME).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load an SAE directory (or a training run directory holding `sae/`) in eval mode; the class follows
        cfg.json's arch. Call .train() to continue training it. Other toolkits' SAE folders (SAELens, sparsify,
        Gemma Scope, dictionary_learning) and hf:ORG/REPO[/SUBFOLDER] ids load too (sae/formats/)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        foreign = load_foreign(path, device)  # sae/formats registers its loader in the registry (no import circle)
        if foreign is not None:
            return foreign
        path = _sae_dir(Path(path))
        try:
            d = json.loads((path / CFG_NAME).read_text())
        except json.JSONDecodeError as e:
            raise SAEToolkitError(f"{path / CFG_NAME} is not valid JSON ({e}); re-save or re-train the SAE") from None
        if not isinstance(d, dict):
            raise SAEToolkitError(f"{path / CFG_NAME} must hold a JSON object, got {type(d).__name__}")
        sae = make_sae(SAEConfig.from_dict(d), device=device)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise SAEToolkitError(f"{path} has cfg.json but no {WEIGHTS_NAME}; the SAE directory is incomplete")
        try:
            tensors = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError) as e:
            raise SAEToolkitError(f"cannot read {weights} ({e}); the file is damaged, re-save the SAE") from None
        sae.load_state_tensors_(tensors)
        return sae.eval()


def _sae_dir(path: Path) -> Path:
    if not path.exists():
        raise SAEToolkitError(f"SAE directory {path} does not exist")
    if path.is_dir() and not (path / CFG_NAME).is_file() and (path / "sae" / CFG_NAME).is_file():
        return path / "sae"
    if not path.is_dir() or not (path / CFG_NAME).is_file():
        raise SAEToolkitError(
            f"{path} is not an SAE directory (no {CFG_NAME}); pass the folder with cfg.json + {WEIGHTS_NAME},"
            " e.g. RUN_DIR/sae"
        )
    return path


def _unit_columns(d_in: int, d_sae: int, device: str | torch.device | None) -> Tensor:
    """[d_in, d_sae] random directions of unit norm per latent (an encoder that is not a decoder transpose)."""
    W = torch.randn(d_in, d_sae, device=device)
    return W / W.norm(dim=0, keepdim=True)


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """[n, d] → [d] point minimising the summed Euclidean distance (Weiszfeld's algorithm)."""
    median = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)  # [n]
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - median).norm() <= tol * (1.0 + median.norm()):
            return new
        median = new
    return median
