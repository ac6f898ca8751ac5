"""SAELens' SAE directories: `cfg.json` + `sae_weights.safetensors`, the flat pre-6 cfg and the 6.x cfg with
`architecture` + `metadata`; architectures standard, topk, batchtopk, jumprelu, gated.

Their forward (sae_lens/saes/*_sae.py): x̃ = x − b_dec·apply_b_dec_to_input, π = x̃ W_enc + b_enc, then
standard ReLU(π); topk the k largest of π, ReLU'd (with `rescale_acts_by_decoder_norm` the choice is made on
π·‖W_dec,i‖ and decoding divides by it again); jumprelu ReLU(π)·1[π > threshold]; gated 1[x̃W_enc + b_gate > 0]·
ReLU(x̃(W_enc·exp r_mag) + b_mag); a batchtopk training save keeps a scalar `topk_threshold` that SAELens' inference
save turns into jumprelu's (after folding the decoder norms when `rescale_acts_by_decoder_norm`, its default).
x̂ = f W_dec + b_dec. Everything that can be folded into fixed weights is: the decoder-norm rescaling, the old
`finetuning_scaling_factor`, and an `expected_average_only_in` scale stored beside the SAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE
from sae_toolkit.sae.formats.common import build_sae, dtype_name, need, read_json, read_safetensors
from sae_toolkit.sae.formats.hookpoints import from_transformerlens
from sae_toolkit.sae.transcoder import SAELENS_TRANSCODER_ARCHS, from_saelens

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SCALER = "activation_scaler.json"
"""Where SAELens' trainer saves the `expected_average_only_in` factor of a checkpoint it has not folded yet."""

_ARCHS = ("standard", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated")


def is_saelens(path: Path) -> bool:
    """A directory with SAELens' weight file name and a cfg.json."""
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


def normalized_cfg(raw: dict[str, Any]) -> dict[str, Any]:
    """Both cfg layouts as one flat dict: architecture, d_in, d_sae, dtype, apply_b_dec_to_input,
    normalize_activations, k, hook_name, model_name, ... (SAELens' own `handle_pre_6_0_config` rules: hook_point →
    hook_name, activation_fn_str → activation_fn, activation_fn "topk" with activation_fn_kwargs.k → topk,
    a boolean normalize_activations True → expected_average_only_in)."""
    cfg = {**raw, **(raw.get("metadata") or {})} if isinstance(raw.get("metadata"), dict) else dict(raw)
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    cfg = {renames.get(k, k): v for k, v in cfg.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    arch = cfg.get("architecture") or "standard"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch == "standard" and cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        arch, cfg["k"] = "topk", kwargs["k"]
    cfg["architecture"] = arch
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return cfg


def hookpoint_of(path: Path) -> str:
    """Our hookpoint for the SAE in `path` (its TransformerLens hook_name mapped)."""
    return from_transformerlens(str(normalized_cfg(read_json(path / CFG)).get("hook_name") or ""))


def load(path: Path, device: str | torch.device = "cpu") -> SAE:
    """The SAELens SAE in directory `path` as our SAE (see the module docstring for the formulas)."""
    raw = read_json(path / CFG)
    if raw.get("architecture") in SAELENS_TRANSCODER_ARCHS:  # SAELens' transcoders: sae/transcoder.py reads them
        return from_saelens(path, raw, device)
    cfg = normalized_cfg(raw)
    arch = cfg["architecture"]
    if arch not in _ARCHS:
        raise SAEToolkitError(
            f"{path / CFG} has SAELens architecture {arch!r}; sae-toolkit loads {', '.join(_ARCHS)}"
        )
    if cfg.get("hook_head_index") is not None:
        raise SAEToolkitError(
            f"{path} is an SAE of one attention head (hook_head_index={cfg['hook_head_index']}); sae-toolkit"
            " hooks whole modules, so it cannot be spliced in"
        )
    w = read_safetensors(path / WEIGHTS)
    need(w, ["W_enc", "W_dec", "b_dec"] + (["b_gate", "r_mag", "b_mag"] if arch == "gated" else ["b_enc"]),
         path / WEIGHTS)
    w = {n: t.to(torch.float64) if t.is_floating_point() else t for n, t in w.items()}  # fold in float64
    W_dec = _fold_finetuning_scale(w, cfg, path)
    scale = _norm_scale(cfg, path)
    W_enc, b_dec = w["W_enc"], w["b_dec"]
    if scale != 1.0:
        # SAELens' fold_activation_norm_scaling_factor: trained on x·s, so W_enc·s, W_dec/s, b_dec/s give the same
        # latents on raw x and x̂ in raw units
        W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale
    tensors: dict[str, Tensor] = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec}
    k = None
    if arch == "gated":
        tensors.update(b_enc=w["b_gate"], r_mag=w["r_mag"], b_mag=w["b_mag"])
        ours = "gated"
    else:
        tensors["b_enc"] = w["b_enc"]
        ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(arch, "batchtopk")
    if arch == "topk":
        k = _int_k(cfg, path)
        if cfg.get("rescale_acts_by_decoder_norm"):
            _fold_decoder_norm(tensors)
    elif arch == "jumprelu":
        tensors["threshold"] = _threshold(w, path)
    elif ours == "batchtopk":
        k = _int_k(cfg, path)
        if "topk_threshold" not in w:
            raise SAEToolkitError(
                f"{path / WEIGHTS} is a {arch} training save without its `topk_threshold`; save the inference"
                " SAE with SAELens (it stores the threshold as a jumprelu) and load that"
            )
        tensors["threshold"] = w["topk_threshold"].reshape(())
        if cfg.get("rescale_acts_by_decoder_norm"):  # SAELens' default; its inference save folds the same way
            _fold_decoder_norm(tensors)
    source = {
        "source_format": "saelens", "source": str(path), "saelens_architecture": arch,
        "saelens_hook_name": cfg.get("hook_name"), "context_size": cfg.get("context_size"),
        "dataset": cfg.get("dataset_path"), "prepend_bos": cfg.get("prepend_bos"),
        "normalize_activations": cfg["normalize_activations"],
    }
    return build_sae(
        ours, tensors, device=device, dtype=dtype_name(cfg.get("dtype")), k=k,
        hookpoint=from_transformerlens(str(cfg.get("hook_name") or "")), model=str(cfg.get("model_name") or ""),
        apply_b_dec_to_input=bool(cfg["apply_b_dec_to_input"]), act_scale=scale, source=source,
    )


def _int_k(cfg: dict[str, Any], path: Path) -> int:
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 1:
        raise SAEToolkitError(f"{path / CFG} has k={k!r}; a {cfg['architecture']} SAE needs a positive k")
    return max(1, round(k))  # batchtopk's k is a mean over the batch and may be fractional


def _threshold(w: dict[str, Tensor], path: Path) -> Tensor:
    if "threshold" in w:
        return w["threshold"]
    if "log_threshold" in w:  # a JumpReLU training save
        return w["log_threshold"].exp()
    raise SAEToolkitError(f"{path / WEIGHTS} lacks the jumprelu tensor 'threshold'; is the file complete?")


def _fold_decoder_norm(t: dict[str, Tensor]) -> None:
    """TopK with rescale_acts_by_decoder_norm picks the top k of π·n (n = ‖W_dec,i‖) and decodes (f/n) W_dec: the
    same function as plain TopK with W_enc·n, b_enc·n and W_dec/n."""
    n = t["W_dec"].norm(dim=-1)  # [d_sae]
    t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]


def _fold_finetuning_scale(w: dict[str, Tensor], cfg: dict[str, Any], path: Path) -> Tensor:
    """Old SAELens decoded (f ⊙ scaling_factor) W_dec; fold the factor into the decoder rows."""
    sf = w.get("finetuning_scaling_factor", w.get("scaling_factor"))
    if sf is None or torch.allclose(sf, torch.ones_like(sf)):
        return w["W_dec"]
    if not cfg.get("finetuning_scaling_factor"):
        raise SAEToolkitError(
            f"{path / WEIGHTS} has a scaling_factor but cfg.json says finetuning_scaling_factor=false; SAELens"
            " refuses this file too: fix the cfg or the weights"
        )
    return w["W_dec"] * sf[:, None]


def _norm_scale(cfg: dict[str, Any], path: Path) -> float:
    """The factor the activations were multiplied by in training (1.0 when none is left to fold)."""
    mode = cfg["normalize_activations"]
    if mode == "none":
        return 1.0
    if mode == "expected_average_only_in":
        scaler = path / SCALER
        factor = read_json(scaler).get("scaling_factor") if scaler.is_file() else None
        if factor is None:
            raise SAEToolkitError(
                f"{path / CFG} says normalize_activations='expected_average_only_in' but no scaling factor is"
                f" stored beside it ({SCALER}); SAELens lists it for hub releases (norm_scaling_factor in"
                " pretrained_saes.yaml): write {\"scaling_factor\": S} to " + str(scaler) + " and load again"
            )
        factor = float(factor)
        if not 0 < factor < float("inf"):
            raise SAEToolkitError(f"{scaler} has scaling_factor={factor!r}; it must be a positive finite number")
        return factor
    if mode in ("constant_norm_rescale", "layer_norm"):
        raise SAEToolkitError(
            f"{path / CFG} has normalize_activations={mode!r}, which rescales every token by its own statistics at"
            " run time; that cannot be folded into fixed weights, so sae-toolkit cannot load this SAE"
        )
    raise SAEToolkitError(
        f"{path / CFG} has normalize_activations={mode!r}, which sae-toolkit cannot fold; fold it with SAELens"
        " (e.g. its fold_activation_* methods), save_model, and load that"
    )
