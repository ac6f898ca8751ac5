"""Pieces every format loader shares: reading JSON, checking tensor shapes, building our SAE from paper-named
tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE
from sae_toolkit.sae.config import DTYPES, SAEConfig
from sae_toolkit.sae.registry import make_sae


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a damaged file or a non-object is a one-line error."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEToolkitError(f"cannot read {path} as JSON ({e}); the SAE directory is damaged") from None
    if not isinstance(d, dict):
        raise SAEToolkitError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEToolkitError(f"{path.parent} lacks {path.name}; the SAE directory is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise SAEToolkitError(f"cannot read {path} ({e}); the file is damaged, download it again") from None


def need(tensors: dict[str, Tensor], names: list[str], where: Path | str) -> None:
    """Fail naming the first missing tensor (and the ones present) when `tensors` lacks one of `names`."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEToolkitError(
            f"{where} lacks tensor {missing[0]!r} (it has {sorted(tensors)}); is it a complete SAE of this format?"
        )


def dtype_name(t: Tensor | str | None, default: str = "float32") -> str:
    """A dtype as SAEConfig spells it (`torch.bfloat16`, "torch.float32" → "bfloat16", "float32"); others → default."""
    name = str(t.dtype if isinstance(t, Tensor) else t or "").removeprefix("torch.")
    return name if name in DTYPES else default


def unit_rows(W_dec: Tensor) -> bool:
    """Whether every decoder row [d_sae, d_in] has norm 1 (then training may continue with the unit-norm constraint)."""
    norms = W_dec.double().norm(dim=-1)
    return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))


def build_sae(arch: str, tensors: dict[str, Tensor], *, device: str | torch.device, dtype: str, hookpoint: str,
              model: str, source: dict[str, Any], k: int | None = None, apply_b_dec_to_input: bool = True,
              act_scale: float = 1.0) -> SAE:
    """Our SAE of `arch` holding `tensors` (paper names: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
    b_dec [d_in] and the arch's extras), in eval mode. `source` lands in cfg.extra as provenance."""
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    if W_enc.ndim != 2 or W_dec.ndim != 2 or tuple(W_dec.shape) != tuple(W_enc.shape[::-1]):
        raise SAEToolkitError(
            f"encoder {tuple(W_enc.shape)} and decoder {tuple(W_dec.shape)} shapes do not fit together "
            f"({source.get('source', '?')}); expected W_enc [d_in, d_sae] and W_dec [d_sae, d_in]"
        )
    d_in, d_sae = W_enc.shape
    cfg = SAEConfig(
        arch=arch, d_in=int(d_in), d_sae=int(d_sae), k=k, hookpoint=hookpoint, model=model, dtype=dtype,
        apply_b_dec_to_input=apply_b_dec_to_input, act_scale=act_scale,
        normalize_decoder=unit_rows(W_dec), extra={key: v for key, v in source.items() if v is not None},
    )
    sae = make_sae(cfg, device=device)
    sae.load_state_tensors_(tensors)
    return sae.eval()
