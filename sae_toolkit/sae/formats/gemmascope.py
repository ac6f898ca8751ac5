"""Gemma Scope's JumpReLU SAEs: `params.npz` in `layer_N/width_W/average_l0_L` folders of the
google/gemma-scope-* repositories.

Their forward (the Gemma Scope tutorial): π = x W_enc + b_enc (x is not centred), f = 1[π > threshold]·ReLU(π),
x̂ = f W_dec + b_dec, with W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, threshold [d_sae], b_dec [d_in].
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE
from sae_toolkit.sae.formats.common import build_sae, dtype_name, need
from sae_toolkit.sae.formats.hookpoints import gemma_scope_info

PARAMS = "params.npz"


def is_gemma_scope(path: Path) -> bool:
    return (path / PARAMS).is_file()


def hookpoint_of(path: Path, origin: str = "") -> str:
    """Our hookpoint for the folder `path`; `origin` is the hub location when known (hf:google/gemma-scope-...)."""
    return gemma_scope_info(origin or str(path))[0]


def load(path: Path, device: str | torch.device = "cpu", origin: str = "") -> SAE:
    """The Gemma Scope SAE in folder `path` as our jumprelu SAE (apply_b_dec_to_input off, as in the tutorial)."""
    try:
        # allow_pickle=False: an .npz from the internet must never run code on load
        with np.load(path / PARAMS, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SAEToolkitError(f"cannot read {path / PARAMS} ({e}); download it again") from None
    # SAELens' loader also accepts lower-case w_enc / w_dec
    w = {("W_" + n[2:] if n.startswith("w_") else n): torch.from_numpy(np.ascontiguousarray(a))
         for n, a in arrays.items()}
    need(w, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], path / PARAMS)
    hookpoint, model = gemma_scope_info(origin or str(path))
    return build_sae(
        "jumprelu", {n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}, device=device,
        dtype=dtype_name(w["W_dec"]), hookpoint=hookpoint, model=model, apply_b_dec_to_input=False,
        source={"source_format": "gemma_scope", "source": origin or str(path)},
    )
