"""SAEConfig: everything needed to rebuild an SAE from its cfg.json (architecture, sizes, loss options, provenance)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sae_toolkit import __version__
from sae_toolkit.errors import SAEToolkitError

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "gated")
DTYPES = ("float32", "float16", "bfloat16", "float64")

# Default sparsity coefficients assume the trainer's convention: activations scaled to mean norm √d_in and the MSE
# summed over d_in. relu/gated: λ = 5 as in Anthropic's "Circuits Updates – April 2024" on that scale;
# jumprelu: λ = 1 for the L0 term, SAELens 6's default on the same scale (raise it for a lower L0).
_DEFAULT_L1 = {"relu": 5.0, "gated": 5.0, "jumprelu": 1.0}


@dataclass
class SAEConfig:
    """Architecture, sizes, loss options and provenance of one SAE; saved as its cfg.json."""

    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
    """Architecture family: relu (L1 penalty), topk, batchtopk, jumprelu (L0 penalty) or gated."""

    d_in: int
    """Width of the activations the SAE reads and reconstructs."""

    d_sae: int
    """Number of latents (features)."""

    k: int | None = None
    """Active latents per token for topk; mean active latents per token for batchtopk. Required for both."""

    hookpoint: str = ""
    """Hookpoint the SAE was trained on (provenance, used by analysis to splice it back into the model). For a
    transcoder: the hookpoint the encoder reads."""

    target: str = ""
    """Transcoders only: the hookpoint the decoder predicts (e.g. `mlp_out.6` for `hookpoint="mlp_in.6"`).
    Empty for an autoencoder, which reconstructs its own input."""

    d_out: int | None = None
    """Width of the decoder's output (W_dec [d_sae, d_out], b_dec [d_out]). None: d_in. Only a transcoder may
    have d_out ≠ d_in."""

    skip: bool = False
    """Transcoders only: add a learned linear skip path W_skip x (W_skip [d_in, d_out], initialised to zero) to
    the decoder output (skip transcoders, Paulo et al. 2025)."""

    model: str = ""
    """Model SPEC the activations came from (provenance)."""

    dtype: str = "float32"
    """Parameter dtype: float32, float16, bfloat16 or float64."""

    toolkit_version: str = __version__
    """sae-toolkit version that wrote the SAE."""

    l1_coefficient: float | None = None
    """Sparsity coefficient λ: of the L1 penalty for relu and gated, of the L0 penalty for jumprelu.
    None picks the architecture default (relu 5, gated 5, jumprelu 1, for mean norm √d_in). Unused by topk."""

    decoder_norm_penalty: bool = False
    """relu only: the April-2024 variant, penalty λ Σ fᵢ‖W_dec,i‖ and no unit-norm constraint on decoder rows."""

    normalize_decoder: bool | None = None
    """Keep decoder rows unit norm (project the parallel gradient out, renormalize after each step).
    None: True for every architecture except relu with decoder_norm_penalty."""

    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from x before encoding. None: True except for jumprelu, whose paper encodes x directly."""

    k_aux: int | None = None
    """topk/batchtopk AuxK: dead latents used to model the residual. None: d_in // 2 (Gao et al. 2024)."""

    aux_coefficient: float = 1 / 32
    """Weight α of the AuxK loss (Gao et al. 2024 use 1/32). 0 disables AuxK."""

    multi_topk: bool = False
    """topk only: Multi-TopK loss L(k) + L(4k)/8 (Gao et al. 2024), so k can be raised at inference.
    Needs 4k ≤ d_sae."""

    batchtopk_threshold_decay: float = 0.99
    """batchtopk: EMA decay of the inference threshold, updated each training step with the batch's smallest kept
    activation (Bussmann et al. 2024 average it over batches)."""

    jumprelu_bandwidth: float = 0.05
    """jumprelu: width ε of the rectangle kernel in the threshold's straight-through gradient
    (in the units of activations scaled to mean norm √d_in)."""

    jumprelu_init_threshold: float = 0.01
    """jumprelu: initial threshold θ of every latent."""

    act_scale: float = 1.0
    """Factor the activations were multiplied by during training; already folded into the weights (provenance)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (e.g. training run name); not interpreted."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SAEToolkitError(f"unknown SAE arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SAEToolkitError(f"{name}={v!r} must be a positive integer")
        if self.dtype not in DTYPES:
            raise SAEToolkitError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.arch in ("topk", "batchtopk"):
            if self.k is None:
                raise SAEToolkitError(f"arch {self.arch!r} needs k (active latents per token); pass e.g. k=32")
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise SAEToolkitError(f"k={self.k!r} must be a positive integer")
            if self.k >= self.d_sae:
                raise SAEToolkitError(
                    f"k={self.k} must be smaller than d_sae={self.d_sae}; lower k or raise d_sae/expansion"
                )
            if self.multi_topk and self.arch != "topk":
                raise SAEToolkitError(f"multi_topk is a topk option, not for arch {self.arch!r}; set multi_topk=False")
            if self.multi_topk and 4 * self.k > self.d_sae:
                raise SAEToolkitError(
                    f"multi_topk needs 4*k={4 * self.k} <= d_sae={self.d_sae}; lower k, raise d_sae or drop multi_topk"
                )
            if self.k_aux is None:
                self.k_aux = max(1, self.d_in // 2)
            if isinstance(self.k_aux, bool) or not isinstance(self.k_aux, int) or self.k_aux < 1:
                raise SAEToolkitError(f"k_aux={self.k_aux!r} must be a positive integer")
        elif self.multi_topk:
            raise SAEToolkitError(f"multi_topk is a topk option, not for arch {self.arch!r}; set multi_topk=False")
        if self.decoder_norm_penalty and self.arch != "relu":
            raise SAEToolkitError(
                f"decoder_norm_penalty is the relu April-2024 variant, not for arch {self.arch!r}; set it False"
            )
        if self.normalize_decoder is None:
            self.normalize_decoder = not self.decoder_norm_penalty
        if self.decoder_norm_penalty and self.normalize_decoder:
            raise SAEToolkitError(
                "decoder_norm_penalty=True already controls decoder norms; set normalize_decoder=False"
            )
        self._check_transcoder()
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.arch != "jumprelu" and not self.target
        if self.l1_coefficient is None:
            self.l1_coefficient = _DEFAULT_L1.get(self.arch, 0.0)
        _check_nonneg("l1_coefficient", self.l1_coefficient)
        _check_nonneg("aux_coefficient", self.aux_coefficient)
        if not 0.0 <= self.batchtopk_threshold_decay < 1.0:
            raise SAEToolkitError(f"batchtopk_threshold_decay={self.batchtopk_threshold_decay!r} must be in [0, 1)")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "act_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SAEToolkitError(f"{name}={v!r} must be a positive finite number")

    def _check_transcoder(self) -> None:
        """d_out, target and skip agree; b_dec (an output-space bias) is never subtracted from a transcoder's input."""
        if self.d_out is None:
            self.d_out = self.d_in
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 1:
            raise SAEToolkitError(f"d_out={self.d_out!r} must be a positive integer")
        if not self.target:
            if self.skip:
                raise SAEToolkitError("skip=True needs a transcoder; pass target (the hookpoint to predict)")
            if self.d_out != self.d_in:
                raise SAEToolkitError(f"d_out={self.d_out} differs from d_in={self.d_in} but no target is set; "
                                      "only a transcoder (target=...) predicts another width")
        elif self.apply_b_dec_to_input:
            raise SAEToolkitError(f"apply_b_dec_to_input=True for a transcoder (target={self.target!r}): b_dec lives "
                                  "in the target's space, not the input's; leave it None or False")

    @property
    def is_transcoder(self) -> bool:
        """Whether the decoder predicts another hookpoint (`target`) rather than reconstructing the input."""
        return bool(self.target)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (what cfg.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Rebuild from a cfg.json dict; unknown keys are an error naming them (a newer or foreign file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if "arch" not in d and "architecture" in d:
            raise SAEToolkitError(
                "this cfg.json is in SAELens' format (it has 'architecture'); sae-toolkit loads the SAE directories it"
                " writes itself (cfg.json with 'arch' + sae.safetensors)"
            )
        unknown = sorted(set(d) - names)
        if unknown:
            raise SAEToolkitError(
                f"cfg.json has unknown keys {unknown}; it was written by another tool or a newer sae-toolkit"
            )
        missing = [n for n in ("arch", "d_in", "d_sae") if n not in d]
        if missing:
            raise SAEToolkitError(f"cfg.json lacks required keys {missing}; is this an sae-toolkit SAE directory?")
        return cls(**d)


def _check_nonneg(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SAEToolkitError(f"{name}={v!r} must be a non-negative finite number")
