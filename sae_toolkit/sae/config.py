"""SAEConfig: everything needed to rebuild an SAE from its cfg.json (architecture, sizes, loss options, provenance)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sae_toolkit import __version__
from sae_toolkit.errors import SAEToolkitError

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
"""Archs whose sparsity is fixed by k (no sparsity coefficient)."""
DTYPES = ("float32", "float16", "bfloat16", "float64")

# Default sparsity coefficients assume the trainer's convention: activations scaled to mean norm √d_in and the MSE
# summed over d_in. With unit-norm decoder rows an L1 coefficient λ shrinks every activation by λ/2, so λ has to
# stay well below a typical feature's magnitude on that scale (≈ √(d_in / L0)). Anthropic's April-2024 λ = 5
# erased most features of the issue-11 toy (d_in 48, 3 active: MMCS 0.43, FVU 0.97); the values below are the
# largest that still recover ≥ 0.95 of its directions (see tests/training/test_toy_quality.py); jumprelu's 0.2
# (tanh penalty) is its starting λ under --target-l0 (the SmolLM2 grid was tuned with it); at a fixed λ the
# trainer uses FIXED_LAMBDA_JUMPRELU instead.
_DEFAULT_L1 = {"relu": 2.0, "gated": 4.0, "jumprelu": 0.2}
FIXED_LAMBDA_JUMPRELU = {"l1_coefficient": 1.0, "jumprelu_bandwidth": 0.5}
"""jumprelu (tanh loss) defaults when λ stays fixed, i.e. trained without --target-l0 (`fixed_lambda_defaults`).
Issue-11 toy (d 48, 192 directions, 1M tokens), MMCS seed 0 / 1: λ 0.2, ε 2 (the steered defaults) 0.931 / 0.963,
L0 7.8 against the toy's 3, 195 of 384 latents never firing and 37 directions covered only by latents that mix
several; λ 1, ε 0.5: 0.992 / 0.989, L0 2.7, 16 silent. Why ε: the estimator's band |π − θ| < ε/2 = 1 was as wide as
θ itself (~1 on the normalized scale), so closed gates of latents that never fire sat in it, and each pushed θ up
by λ·c·θ/ε through the tanh term (its slope c at f = 0) against the pre-activation term's λ_P: those latents
stayed parked just above their largest π. At ε 0.5 (λ raised with it to keep the L0 near the toy's, λ 0.5 / 2:
MMCS 0.973 / 0.999, L0 4.2 / 2.1) they come back. Under --target-l0 ε 0.5 with λ starting at 1 cost SmolLM2
mlp_out.9 held-out EV (0.866 → 0.858 at L0 16, 0.880 → 0.874 at L0 32, 500k tokens), so steered runs keep ε 2.
There a fixed-λ run ends at held-out L0 30.7, EV 0.855 (λ 0.2, ε 2: L0 61.5, EV 0.878), below the steered runs."""
# gated with its default tanh loss: 0.5 (issue-11 toy MMCS 0.948 at 1M tokens, 0.982 on the CI copy; at 0.2 the
# toy's gates stayed too open: L0 10.8 against 3, MMCS 0.881)
_DEFAULT_GATED_TANH = 0.5


@dataclass
class SAEConfig:
    """Architecture, sizes, loss options and provenance of one SAE; saved as its cfg.json."""

    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
    """Architecture family: relu (L1 penalty), topk, batchtopk, jumprelu (L0 penalty), gated or matryoshka
    (Matryoshka BatchTopK)."""

    d_in: int
    """Width of the activations the SAE reads and reconstructs."""

    d_sae: int
    """Number of latents (features)."""

    k: int | None = None
    """Active latents per token for topk; mean active latents per token for batchtopk and matryoshka. Required."""

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
    """Sparsity coefficient λ: of the L1 penalty for relu (and gated with gated_loss="l1"), of the tanh/L0 penalty
    for jumprelu and gated. None picks the architecture default (for mean norm √d_in: relu 2, gated 0.5 with the
    tanh loss and 4 with l1, jumprelu 0.2; the trainer passes 1 for a tanh JumpReLU at a fixed λ,
    FIXED_LAMBDA_JUMPRELU). Unused by topk."""

    decoder_norm_penalty: bool = False
    """relu only: the April-2024 variant, penalty λ Σ fᵢ‖W_dec,i‖ and no unit-norm constraint on decoder rows."""

    normalize_decoder: bool | None = None
    """Keep decoder rows unit norm (project the parallel gradient out, renormalize after each step).
    None: True for every architecture except relu with decoder_norm_penalty."""

    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from x before encoding. None: True except for jumprelu, whose paper encodes x directly, and
    relu with decoder_norm_penalty (Anthropic April 2024 encode ReLU(W_enc x + b_enc))."""

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

    jumprelu_loss: Literal["tanh", "step"] = "tanh"
    """jumprelu sparsity penalty. tanh: Anthropic's January-2025 recipe, λ Σᵢ tanh(c·fᵢ‖W_dec,i‖) plus the
    pre-activation term λ_P Σᵢ ReLU(θᵢ − πᵢ)‖W_dec,i‖; step: the L0 of Rajamanoharan et al. 2024 through the
    step function's straight-through estimator (its penalty bites only after very long training)."""

    gated_loss: Literal["tanh", "l1"] = "tanh"
    """gated training loss. tanh: the JumpReLU tanh recipe on the gate (a Gated SAE is a JumpReLU with per-latent
    thresholds; uses jumprelu_tanh_scale, jumprelu_bandwidth, jumprelu_pre_act_coefficient and
    jumprelu_init_threshold); l1: Rajamanoharan et al. 2024's L1 on ReLU(π_gate) plus the frozen-decoder auxiliary
    loss. See GatedSAE."""

    jumprelu_tanh_scale: float = 4.0
    """jumprelu tanh loss: c in tanh(c·fᵢ‖W_dec,i‖) (Anthropic January 2025 use 4)."""

    jumprelu_pre_act_coefficient: float = 3e-2
    """jumprelu tanh loss (and gated's): λ_P of the pre-activation term λ_P Σᵢ ReLU(θᵢ − πᵢ)‖W_dec,i‖, which pulls
    the thresholds of latents that stay below them down. π is detached in it (unlike Anthropic's January-2025 form,
    whose gradient also pushes every π up, i.e. W_enc towards the mean input): on SmolLM2 mlp_out.9 (L0 16, 200k
    tokens, thresholds started at the target rate) detaching lifted held-out EV 0.834 → 0.845 at λ_P 3e-3, and with
    π detached λ_P 3e-3 / 3e-2 / 0.1 / 0.3 left 31 / 13 / 3.4 / 0.4 % of the latents dead (EV 0.845 / 0.844 /
    0.840 / 0.838; attached, λ_P 3e-2 cost 0.19 EV); 3e-2 with the capped start (jumprelu.start_thresholds)
    left 0.9 %. Issue-11 toy: gated 0.986 MMCS (0.948 with the attached 3e-3), jumprelu 0.931. Anthropic use
    3e-6 on their loss scale (58 % of the toy's latents dead)."""

    jumprelu_bandwidth: float | None = None
    """jumprelu: width ε of the rectangle kernel in the threshold's straight-through gradient (in the units of
    activations scaled to mean norm √d_in). None: 2 for the tanh loss (Anthropic January 2025), 0.05 for step.
    The trainer passes 0.5 for a tanh JumpReLU trained at a fixed λ (FIXED_LAMBDA_JUMPRELU)."""

    jumprelu_init_threshold: float | None = None
    """jumprelu: initial threshold θ of every latent (gated with the tanh loss: −b_gate). None: 1 for the tanh loss,
    0.01 for step. Anthropic start at 0.1, but on activations scaled to mean norm √d_in half the pre-activations
    exceed 0.1 at init, and the thresholds then spent the first ~100 of 488 steps climbing out of the dense phase:
    on SmolLM2 mlp_out.9 (500k tokens, target L0 32) held-out EV 0.837 / 0.854 / 0.868 at θ₀ = 0.1 / 1 / 2, dead
    latents 0.9 / 1.3 / 10.7 %; on the issue-11 toy (CI copy) jumprelu MMCS 0.97 / 0.99 / 0.98, gated 0.76 / 0.95
    / 0.99. Under --target-l0 the trainer starts the thresholds from data instead (JumpReLUSAE.init_thresholds_:
    each latent firing on ~target/d_sae of the rows)."""

    matryoshka_groups: list[int] | None = None
    """matryoshka: sizes of the nested latent groups, summing to d_sae; prefix i = the first i groups, each
    prefix reconstructs x on its own. None: two halves (prefixes at d_sae/2 and d_sae). On the issue-11 toy, whose
    features have no hierarchy, prefixes at d_sae/16, /8, /4, /2, 1 reached MMCS 0.875 and halves 0.941 (both with a
    25% per-token start), halves 0.985 with the 50% start the trainer now uses. Pass more groups for real data."""

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
        if self.arch in TOPK_FAMILY:
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
            self.apply_b_dec_to_input = self.arch != "jumprelu" and not self.decoder_norm_penalty and not self.target
        if self.gated_loss not in ("tanh", "l1"):
            raise SAEToolkitError(f"gated_loss={self.gated_loss!r}; choose 'tanh' or 'l1'")
        if self.l1_coefficient is None:
            gated_tanh = self.arch == "gated" and self.gated_loss == "tanh"
            self.l1_coefficient = _DEFAULT_GATED_TANH if gated_tanh else _DEFAULT_L1.get(self.arch, 0.0)
        _check_nonneg("l1_coefficient", self.l1_coefficient)
        _check_nonneg("aux_coefficient", self.aux_coefficient)
        if not 0.0 <= self.batchtopk_threshold_decay < 1.0:
            raise SAEToolkitError(f"batchtopk_threshold_decay={self.batchtopk_threshold_decay!r} must be in [0, 1)")
        if self.jumprelu_loss not in ("tanh", "step"):
            raise SAEToolkitError(f"jumprelu_loss={self.jumprelu_loss!r}; choose 'tanh' or 'step'")
        tanh = self.jumprelu_loss == "tanh" if self.arch == "jumprelu" else True  # gated uses the tanh values
        if self.jumprelu_bandwidth is None:
            self.jumprelu_bandwidth = 2.0 if tanh else 0.05
        if self.jumprelu_init_threshold is None:
            self.jumprelu_init_threshold = 1.0 if tanh else 0.01
        _check_nonneg("jumprelu_pre_act_coefficient", self.jumprelu_pre_act_coefficient)
        if self.arch == "matryoshka":
            self.matryoshka_groups = _matryoshka_groups(self.matryoshka_groups, self.d_sae)
        elif self.matryoshka_groups is not None:
            raise SAEToolkitError(f"matryoshka_groups is a matryoshka option, not for arch {self.arch!r}; drop it")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_tanh_scale", "act_scale"):
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


def _matryoshka_groups(groups: list[int] | None, d_sae: int) -> list[int]:
    """Validated group sizes summing to d_sae; None → two halves."""
    if groups is None:
        return [d_sae // 2, d_sae - d_sae // 2] if d_sae > 1 else [d_sae]
    groups = list(groups)
    if not groups or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in groups):
        raise SAEToolkitError(f"matryoshka_groups={groups!r} must be positive integers, e.g. 64,64,128,256")
    if sum(groups) != d_sae:
        raise SAEToolkitError(f"matryoshka_groups={groups} sum to {sum(groups)}, not d_sae={d_sae}; make them add up")
    return groups


def _check_nonneg(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SAEToolkitError(f"{name}={v!r} must be a non-negative finite number")


def fixed_lambda_defaults(arch: str, jumprelu_loss: str = "tanh") -> dict[str, float]:
    """SAEConfig values the trainer uses in place of the defaults when λ stays fixed (no target L0):
    FIXED_LAMBDA_JUMPRELU for a tanh JumpReLU, nothing for the other archs.

    >>> fixed_lambda_defaults("jumprelu"), fixed_lambda_defaults("gated"), fixed_lambda_defaults("jumprelu", "step")
    ({'l1_coefficient': 1.0, 'jumprelu_bandwidth': 0.5}, {}, {})
    """
    return dict(FIXED_LAMBDA_JUMPRELU) if arch == "jumprelu" and jumprelu_loss == "tanh" else {}
