"""EleutherAI sparsify's SAE folders: `cfg.json` + `sae.safetensors` per hookpoint, the folder named after the
hookpoint (`layers.9`), several of them under one run folder (with sparsify's own `config.json`).

Their forward (sparsify/sparse_coder.py, fused_encoder.py): f = TopK_k(ReLU(encoder(x − b_dec))) with
`encoder.weight` [d_sae, d_in] and `encoder.bias` [d_sae]; x̂ = f W_dec + b_dec with `W_dec` [d_sae, d_in].
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE
from sae_toolkit.sae.formats.common import build_sae, dtype_name, need, read_json, read_safetensors
from sae_toolkit.sae.formats.hookpoints import from_sparsify

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"


def is_sparsify(path: Path) -> bool:
    """cfg.json + sae.safetensors without our `arch` key (ours) or SAELens' `architecture`/hook name keys."""
    if not ((path / CFG).is_file() and (path / WEIGHTS).is_file()):
        return False
    try:
        cfg = read_json(path / CFG)
    except SAEToolkitError:
        return False
    return not {"arch", "architecture", "hook_name", "hook_point"} & set(cfg)


def hookpoint_of(path: Path) -> str:
    """Our hookpoint for the folder `path` (sparsify names the folder after the hookpoint)."""
    return from_sparsify(path.name)


def _model_of(path: Path) -> str:
    """The model the run trained on, from the run folder's config.json (sparsify's RunConfig), if it is there."""
    run_cfg = path.parent / "config.json"
    if not run_cfg.is_file():
        return ""
    try:
        model = read_json(run_cfg).get("model")
    except SAEToolkitError:
        return ""
    return model if isinstance(model, str) else ""


def load(path: Path, device: str | torch.device = "cpu") -> SAE:
    """The sparsify SAE in folder `path` as our topk SAE."""
    cfg = read_json(path / CFG)
    for flag, what in (("transcode", "a transcoder"), ("skip_connection", "an SAE with a skip connection"),
                       ("signed", "a signed SAE")):
        if cfg.get(flag):
            raise SAEToolkitError(f"{path} holds {what} ({flag}=true in cfg.json); sae-toolkit loads plain SAEs")
    if cfg.get("activation", "topk") != "topk":
        raise SAEToolkitError(
            f"{path / CFG} has activation={cfg['activation']!r}; sae-toolkit loads sparsify's topk SAEs only"
        )
    w = read_safetensors(path / WEIGHTS)
    need(w, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], path / WEIGHTS)
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SAEToolkitError(f"{path / CFG} has k={k!r}; sparsify's TopK SAEs need a positive integer k")
    tensors = {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if cfg.get("d_in") not in (None, tensors["b_dec"].shape[0]):
        raise SAEToolkitError(f"{path / CFG} says d_in={cfg['d_in']} but b_dec has {tensors['b_dec'].shape[0]}")
    return build_sae(
        "topk", tensors, device=device, dtype=dtype_name(w["W_dec"]), k=k, hookpoint=hookpoint_of(path),
        model=_model_of(path), apply_b_dec_to_input=True,
        source={"source_format": "sparsify", "source": str(path), "sparsify_hookpoint": path.name},
    )
