"""load_sae / import_sae: any supported SAE source (a folder written by sae-toolkit, SAELens, sparsify,
Gemma Scope or dictionary_learning, or hf:ORG/REPO[/SUBFOLDER]) → our SAE, and → our SAE directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE
from sae_toolkit.sae.formats import dictionary_learning, gemmascope, hub, saelens, sparsify
from sae_toolkit.sae.formats.detect import detect, locate

_WEIGHT_FILES = {"cfg.json", "sae.safetensors", "sae_weights.safetensors", "params.npz", "ae.pt", "config.json"}


def load_sae(source: str | Path, device: str | torch.device = "cpu", *, hookpoint: str | None = None) -> SAE:
    """Load the SAE in `source`, in eval mode, whichever toolkit wrote it.

    source: an SAE folder (or one of its files), a training RUN_DIR, a folder of several SAEs (choose one with
    `hookpoint`), or `hf:ORG/REPO[/SUBFOLDER]`. hookpoint: ours for the SAE (it replaces what its files say, e.g.
    when the mapping from the other toolkit's names is unknown), or the sub-folder to pick.
    """
    origin = str(source) if hub.is_hub_id(str(source)) else ""
    path = hub.fetch(origin) if origin else Path(source)
    if not path.exists():
        raise SAEToolkitError(f"SAE directory {path} does not exist")
    if path.is_file() and path.name in _WEIGHT_FILES:
        path = path.parent
    if path.is_file():
        raise SAEToolkitError(f"{path} is a file; pass the SAE's folder (with cfg.json, params.npz or ae.pt)")
    fmt, folder, set_hookpoint = locate(path, hookpoint)
    if fmt == "sae_toolkit":
        sae = SAE.load(folder, device=device)  # base finds no foreign format here and reads our own directory
    elif fmt == "gemma_scope":
        where = f"{origin.rstrip('/')}/{folder.relative_to(path).as_posix()}" if origin else ""
        sae = gemmascope.load(folder, device, origin=where.removesuffix("/."))
    else:
        sae = {"saelens": saelens.load, "sparsify": sparsify.load,
               "dictionary_learning": dictionary_learning.load}[fmt](folder, device)
    if set_hookpoint:
        sae.cfg.hookpoint = set_hookpoint
    if origin and fmt != "sae_toolkit":
        sae.cfg.extra["source"] = origin if folder == path else f"{origin.rstrip('/')}/{folder.relative_to(path)}"
    return sae


def load_foreign(path: str | Path, device: str | torch.device = "cpu") -> SAE | None:
    """SAE.load's hook (registered in sae.registry): the SAE when `path` is another toolkit's or a hub id; None
    for our own directories (and run directories), which SAE.load reads itself."""
    if hub.is_hub_id(str(path)):
        return load_sae(str(path), device)
    p = Path(path)
    if p.is_file() and p.name in _WEIGHT_FILES:
        return load_sae(p.parent, device)
    if not p.is_dir():
        return None
    fmt = detect(p)
    if fmt == "sae_toolkit" or fmt is None and (p / "sae" / "cfg.json").is_file():
        return None
    return load_sae(p, device)


def import_sae(source: str | Path, out: str | Path, *, hookpoint: str | None = None) -> tuple[Path, SAE]:
    """Write the SAE in `source` (any format load_sae reads) as our SAE directory `out`; returns (out, the SAE).

    `out` must not exist yet (or be an empty folder): nothing the toolkit did not write is overwritten. The folder
    appears all at once (written beside it, then renamed).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SAEToolkitError(f"--out {out} already exists and is not empty; pass a new directory")
    sae = load_sae(source, "cpu", hookpoint=hookpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    try:
        sae.save(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out, sae
