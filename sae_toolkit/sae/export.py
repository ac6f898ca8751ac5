"""Export an sae-toolkit SAE directory to SAELens' on-disk format (cfg.json + sae_weights.safetensors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from sae_toolkit import __version__
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import atomic_dir, check_out_dir, only_names
from sae_toolkit.sae.transcoder import saelens_transcoder_layout

# SAELens >= 6 reads `metadata.sae_lens_version` to decide the config layout; 6.0 is the layout written here
# (checked against sae-lens 6.54's SAE.load_from_disk).
SAELENS_FORMAT_VERSION = "6.0.0"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

# Our hookpoint aliases and common HF module paths → TransformerLens hook names (SAELens' `hook_name`).
_TL_HOOKS = {
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "mlp_hidden": "mlp.hook_post",
    "mlp_in": "ln2.hook_normalized",  # the MLP's input: the normalized residual it reads
}
_HF_MODULE = re.compile(
    r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)"
    r"(?:\.(mlp|self_attn|attn|attention)(?:\.(down_proj|c_proj|fc2|dense_4h_to_h):input)?)?$"
)


def tl_hook_name(hookpoint: str) -> str:
    """Best TransformerLens name for a hookpoint (`mlp_out.6` → `blocks.6.hook_mlp_out`); unknown ones unchanged."""
    alias = re.fullmatch(r"(resid_post|mlp_out|attn_out|mlp_hidden|mlp_in)\.(\d+)", hookpoint)
    if alias:
        return f"blocks.{alias[2]}.{_TL_HOOKS[alias[1]]}"
    m = _HF_MODULE.fullmatch(hookpoint)
    if not m:
        return hookpoint
    layer, sub, proj = m.groups()
    if sub is None:
        kind = "resid_post"
    elif sub == "mlp":
        kind = "mlp_hidden" if proj else "mlp_out"
    else:
        if proj:
            return hookpoint
        kind = "attn_out"
    return f"blocks.{layer}.{_TL_HOOKS[kind]}"


def _saelens_layout(sae) -> tuple[str, dict[str, Tensor], dict[str, object]]:
    """(SAELens architecture, its tensors, architecture-specific cfg keys) computing the same function as `sae`."""
    cfg = sae.cfg
    if cfg.target:
        return saelens_transcoder_layout(sae)
    base = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if cfg.arch == "relu":
        return "standard", base, {}
    if cfg.arch == "topk" or (cfg.arch in ("batchtopk", "matryoshka") and sae.threshold < 0):
        # a BatchTopK SAE without an estimated threshold encodes with per-token TopK (see BatchTopKSAE.encode)
        return "topk", base, {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    if cfg.arch in ("batchtopk", "matryoshka"):
        # BatchTopK (Matryoshka too) at inference is a JumpReLU with one shared threshold (SAELens saves it so)
        return "jumprelu", {**base, "threshold": sae.threshold.expand(cfg.d_sae)}, {}
    if cfg.arch == "jumprelu":
        return "jumprelu", {**base, "threshold": sae.threshold}, {}
    if cfg.arch == "gated":
        tensors = {
            "W_enc": sae.W_enc,
            "b_gate": sae.b_enc,
            "r_mag": sae.r_mag,
            "b_mag": sae.b_mag,
            "W_dec": sae.W_dec,
            "b_dec": sae.b_dec,
        }
        return "gated", tensors, {}
    raise SAEToolkitError(f"no SAELens export for arch {cfg.arch!r}")


def _acts_provenance(acts: object) -> dict[str, object]:
    """context_size / dataset / prepend_bos from the activation file the SAE was trained on, when it is still there."""
    if not isinstance(acts, str) or not Path(acts).is_file():
        return {}
    import h5py

    from sae_toolkit.activations.format import FORMAT, bos_token_id, root_attrs

    try:
        with h5py.File(acts, "r") as f:
            attrs = root_attrs(f)
    except OSError:  # moved, damaged or not HDF5: the metadata is optional
        return {}
    if attrs.get("format") != FORMAT:
        return {}
    out: dict[str, object] = {}
    if "context_size" in attrs:
        out["context_size"] = int(attrs["context_size"])
    if "dataset" in attrs:
        out["dataset"] = str(attrs["dataset"])
    if "bos_token_id" in attrs:
        out["prepend_bos"] = bos_token_id(attrs) is not None
    return out


def _written_by_us(folder: Path) -> bool:
    try:
        return "sae_toolkit_version" in json.loads((folder / SAELENS_CFG).read_text())["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


EXPORT_LEGACY = only_names({SAELENS_CFG, SAELENS_WEIGHTS}, _written_by_us)
"""An unmarked export an older sae-toolkit wrote (its cfg.json names our version): --force may replace it."""


def export_saelens(sae_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write the SAE in sae_dir (or RUN_DIR/sae) as SAELens' cfg.json + sae_weights.safetensors into out_dir.

    `sae_lens.SAE.load_from_disk(out_dir)` then computes the same encode/decode on raw activations: relu →
    "standard", topk → "topk" (k), batchtopk and matryoshka → "jumprelu" with the inference threshold broadcast to
    every latent, jumprelu → "jumprelu", gated → "gated" (b_enc saved as b_gate); transcoders → SAELens' transcoder
    classes (see sae/transcoder.py). Normalization is already folded into the weights, so normalize_activations is
    "none". Returns out_dir.

    out_dir must be new, empty or an earlier export (sae_toolkit.files); it appears complete or not at all.
    An SAE with NaN/Inf weights is refused.
    """
    from safetensors.torch import save_file

    from sae_toolkit.sae.base import SAE
    from sae_toolkit.sae.checks import require_finite_weights

    check_out_dir(out_dir, "saelens-export", force=force, legacy=EXPORT_LEGACY)
    sae = SAE.load(sae_dir)
    require_finite_weights(sae, sae_dir)
    cfg = sae.cfg
    arch, tensors, arch_keys = _saelens_layout(sae)
    extra = {**_acts_provenance(cfg.extra.get("acts")), **cfg.extra}
    saelens_cfg = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **arch_keys,
        **({"hook_name_out": tl_hook_name(cfg.target)} if cfg.target else {}),
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": cfg.model,
            "hook_name": tl_hook_name(cfg.hookpoint),
            "hf_hook_name": cfg.hookpoint,
            **({"hook_name_out": tl_hook_name(cfg.target), "hf_hook_name_out": cfg.target} if cfg.target else {}),
            "hook_head_index": None,
            "prepend_bos": bool(extra.get("prepend_bos", True)),
            "context_size": extra.get("context_size"),
            "dataset_path": extra.get("dataset"),
            "sae_toolkit_version": __version__,
            "sae_toolkit_arch": cfg.arch,
            "sae_toolkit_act_scale": cfg.act_scale,
        },
    }
    with atomic_dir(out_dir, "saelens-export", force=force, legacy=EXPORT_LEGACY) as tmp:
        save_file({n: t.detach().contiguous().to(torch.device("cpu")) for n, t in tensors.items()},
                  str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CFG).write_text(json.dumps(saelens_cfg, indent=2) + "\n")
    return Path(out_dir)
