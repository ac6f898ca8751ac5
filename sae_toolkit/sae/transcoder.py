"""Transcoders: scale folding for two activation spaces, and SAELens' transcoder format (export layout + loader).

A transcoder is an SAE whose decoder predicts another hookpoint than the encoder reads (`cfg.target`), usually
an MLP replaced by sparse features: encoder on `mlp_in.N`, decoder onto `mlp_out.N` (Dunefsky et al. 2024;
skip transcoders add W_skipᵀ x, Paulo et al. 2025). Every architecture can be one; the parameters live in
`SAE` (base.py): W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_in, d_out] with cfg.skip, and b_dec is never
subtracted from the input, whose space it does not live in (SAELens refuses apply_b_dec_to_input for
transcoders too).

SAELens (`sae_lens/saes/transcoder.py`) names the four inference classes "transcoder" (ReLU), "skip_transcoder",
"jumprelu_transcoder" and "jumprelu_skip_transcoder"; they store W_skip as [d_out, d_in] (`x @ W_skip.T`) and
the output hookpoint as `hook_name_out` next to `d_out`. It has no TopK transcoder, so a per-token TopK
transcoder cannot be exported with the same outputs (BatchTopK can: one shared JumpReLU threshold).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE
from sae_toolkit.sae.config import SAEConfig
from sae_toolkit.sae.registry import make_sae

SAELENS_TRANSCODER_ARCHS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
SAELENS_WEIGHTS = "sae_weights.safetensors"


@torch.no_grad()
def fold_scales_(sae: SAE, scale_in: float, scale_out: float) -> None:
    """The SAE was trained on x·scale_in predicting y·scale_out; rewrite it to work on raw x and predict raw y.

    ŷ(x) = ŷ_trained(x·scale_in) / scale_out holds when W_enc and W_skip are multiplied by scale_in / scale_out
    and then every bias / threshold is divided by scale_out (`fold_scale_`): the latents come out in raw target
    units, decoder rows keep their norms. With scale_in == scale_out this is exactly `fold_scale_(scale)`.
    """
    for name, v in (("scale_in", scale_in), ("scale_out", scale_out)):
        if not 0 < float(v) < float("inf"):
            raise SAEToolkitError(f"fold_scales_ needs positive finite scales, got {name}={v!r}")
    ratio = float(scale_in) / float(scale_out)
    if ratio != 1.0:
        sae.W_enc.mul_(ratio)
        if sae.cfg.skip:
            sae.W_skip.mul_(ratio)
    sae.fold_scale_(float(scale_out))
    if sae.cfg.target:
        sae.cfg.extra["act_scale_in"] = sae.cfg.extra.get("act_scale_in", 1.0) * float(scale_in)


# ---- SAELens format ----------------------------------------------------------------------------------------


def saelens_transcoder_layout(sae: SAE) -> tuple[str, dict[str, Tensor], dict[str, object]]:
    """(SAELens architecture, its tensors, top-level cfg keys) computing the same function as transcoder `sae`."""
    cfg = sae.cfg
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if cfg.arch == "relu":
        arch = "transcoder"
    elif cfg.arch == "jumprelu":
        arch, tensors = "jumprelu_transcoder", {**tensors, "threshold": sae.threshold}
    elif cfg.arch == "batchtopk" and sae.threshold >= 0:
        # BatchTopK at inference is a JumpReLU with one threshold shared by all latents
        arch, tensors = "jumprelu_transcoder", {**tensors, "threshold": sae.threshold.expand(cfg.d_sae)}
    else:
        raise SAEToolkitError(
            f"SAELens has no transcoder class computing arch {cfg.arch!r} (its transcoders are ReLU or JumpReLU); "
            "train the transcoder with --arch relu, jumprelu or batchtopk to export it"
        )
    if cfg.skip:
        arch = arch.replace("transcoder", "skip_transcoder")
        tensors["W_skip"] = sae.W_skip.T  # SAELens: [d_out, d_in], applied as x @ W_skip.T
    keys = {"d_out": cfg.d_out, "hook_layer_out": _layer_of(cfg.target), "hook_head_index_out": None}
    return arch, tensors, keys


def _layer_of(hookpoint: str) -> int:
    """The block index in a hookpoint name (`mlp_out.6`, `model.layers.6.mlp` → 6), 0 when it has none."""
    m = re.search(r"(?:^|\.)(?:layers|h|layer)\.(\d+)(?:\.|$)", hookpoint) or re.search(r"\.(\d+)$", hookpoint)
    return int(m.group(1)) if m else 0


def load_saelens_transcoder(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a directory in SAELens' transcoder format (cfg.json with `architecture` one of
    SAELENS_TRANSCODER_ARCHS + sae_weights.safetensors) as an sae-toolkit transcoder in eval mode."""
    path = Path(path)
    try:
        d = json.loads((path / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEToolkitError(f"cannot read {path / 'cfg.json'} ({e}); is this a SAELens transcoder "
                              "directory?") from None
    sae = from_saelens(path, d, device)
    if sae is None:
        raise SAEToolkitError(f"{path} is not a SAELens transcoder (architecture {d.get('architecture')!r}; expected "
                              f"one of {', '.join(SAELENS_TRANSCODER_ARCHS)})")
    return sae.eval()


def from_saelens(path: Path, d: dict[str, Any], device: str | torch.device) -> SAE | None:
    """The transcoder in `path` (cfg.json read into `d`), or None unless `d` is one of SAELens' transcoder
    architectures; sae/formats/saelens.py hands these to it, so `SAE.load` reads them."""
    arch = d.get("architecture")
    if "arch" in d or arch not in SAELENS_TRANSCODER_ARCHS:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [k for k in ("d_in", "d_sae", "d_out") if k not in d]
    if missing:
        raise SAEToolkitError(f"{path / 'cfg.json'} ({arch}) lacks {missing}; the SAELens transcoder config is "
                              "incomplete")
    weights = path / SAELENS_WEIGHTS
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise SAEToolkitError(f"cannot read {weights} ({e}); the SAELens transcoder directory is incomplete") from None
    meta = d.get("metadata") or {}
    jump = arch.startswith("jumprelu")
    skip = "skip" in arch
    cfg = SAEConfig(
        arch="jumprelu" if jump else "relu", d_in=int(d["d_in"]), d_sae=int(d["d_sae"]), d_out=int(d["d_out"]),
        hookpoint=str(meta.get("hf_hook_name") or meta.get("hook_name") or d.get("hook_name") or ""),
        target=str(meta.get("hf_hook_name_out") or d.get("hook_name_out") or meta.get("hook_name_out") or "?"),
        skip=skip, model=str(meta.get("model_name") or d.get("model_name") or ""),
        dtype=str(d.get("dtype", "float32")).removeprefix("torch."),
        apply_b_dec_to_input=False, normalize_decoder=False,  # foreign weights are taken as they are
        act_scale=float(meta.get("sae_toolkit_act_scale", 1.0)),
        extra={"source": "saelens", "saelens_architecture": arch},
    )
    sae = make_sae(cfg, device=device)
    ours = dict(tensors)
    if skip:
        if "W_skip" not in ours:
            raise SAEToolkitError(f"{weights} lacks W_skip, which architecture {arch!r} needs")
        ours["W_skip"] = ours["W_skip"].T  # SAELens [d_out, d_in] → ours [d_in, d_out]
    if jump and "threshold" not in ours:
        raise SAEToolkitError(f"{weights} lacks threshold, which architecture {arch!r} needs")
    sae.load_state_tensors_(ours)
    return sae


__all__ = ["SAELENS_TRANSCODER_ARCHS", "fold_scales_", "load_saelens_transcoder", "saelens_transcoder_layout"]
