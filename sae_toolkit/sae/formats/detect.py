"""Which toolkit wrote an SAE folder, and which folder of a multi-SAE tree (a sparsify run, a Gemma Scope
repository) the user means."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.formats import dictionary_learning, gemmascope, saelens, sparsify
from sae_toolkit.sae.formats.common import read_json

FORMATS = ("sae_toolkit", "saelens", "sparsify", "gemma_scope", "dictionary_learning")
_MAX_DEPTH = 3  # gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71


class Candidate(NamedTuple):
    """One SAE folder below the folder the user gave."""

    rel: str
    """Its path relative to that folder (`layers.9`, `layer_20/width_16k/average_l0_71`)."""
    format: str
    """One of FORMATS."""
    hookpoint: str
    """Our hookpoint for it ("" when its files do not say)."""


def detect(path: Path) -> str | None:
    """The format of the SAE in folder `path` itself, or None when it holds none."""
    cfg = path / "cfg.json"
    if cfg.is_file():
        try:
            keys = set(read_json(cfg))
        except SAEToolkitError:
            return "sae_toolkit"  # our loader names the damage
        if "arch" in keys:
            return "sae_toolkit"
        if saelens.is_saelens(path) or {"architecture", "hook_name", "hook_point"} & keys:
            return "saelens"
        if sparsify.is_sparsify(path):
            return "sparsify"
        return "sae_toolkit"
    if gemmascope.is_gemma_scope(path):
        return "gemma_scope"
    if dictionary_learning.is_dictionary_learning(path):
        return "dictionary_learning"
    return None


def hookpoint_of(path: Path, fmt: str, origin: str = "") -> str:
    """Our hookpoint for the SAE folder `path` of format `fmt`, from its metadata only (no weights are read)."""
    try:
        if fmt == "saelens":
            return saelens.hookpoint_of(path)
        if fmt == "sparsify":
            return sparsify.hookpoint_of(path)
        if fmt == "gemma_scope":
            return gemmascope.hookpoint_of(path, origin)
        if fmt == "dictionary_learning":
            return dictionary_learning.hookpoint_of(path)
        return str(read_json(path / "cfg.json").get("hookpoint") or "")
    except SAEToolkitError:
        return ""


def candidates(root: Path) -> list[Candidate]:
    """SAE folders below `root` (up to three levels down), in natural order (layers.2 before layers.10)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if depth < _MAX_DEPTH else []
        if here == root:
            continue
        fmt = detect(here)
        if fmt is not None:
            dirnames[:] = []
            rel = here.relative_to(root).as_posix()
            found.append(Candidate(rel, fmt, hookpoint_of(here, fmt, str(here))))
    natural = lambda c: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", c.rel)]
    return sorted(found, key=natural)


def locate(root: Path, hookpoint: str | None = None) -> tuple[str, Path, str | None]:
    """(format, SAE folder, hookpoint to set on the loaded SAE or None) for what the user passed.

    A folder that is itself an SAE is taken as is, and a given hookpoint becomes the SAE's. A folder holding
    several SAEs needs `hookpoint` to choose: the sub-folder's own name (`layers.9`, as sparsify names it) or our
    name for its hookpoint (`resid_post.9`).
    """
    fmt = detect(root)
    if fmt is not None:
        return fmt, root, hookpoint
    found = candidates(root)
    if not found:
        raise SAEToolkitError(
            f"{root} is not an SAE directory (no cfg.json, params.npz or ae.pt, here or in its sub-folders); pass the"
            " folder of one SAE (sae-toolkit, SAELens, sparsify, Gemma Scope or dictionary_learning)"
        )
    if hookpoint:
        chosen = [c for c in found if hookpoint in (c.rel, c.rel.rsplit("/", 1)[-1])]
        by_ours = [c for c in found if c.hookpoint == hookpoint]
        if len(chosen) == 1:
            return chosen[0].format, root / chosen[0].rel, None
        if len(by_ours) == 1:
            return by_ours[0].format, root / by_ours[0].rel, hookpoint
        if not chosen and not by_ours and len(found) == 1:
            return found[0].format, root / found[0].rel, hookpoint
    elif len(found) == 1:
        return found[0].format, root / found[0].rel, None
    listing = ", ".join(f"{c.rel} ({c.hookpoint or '?'})" for c in found[:8]) + (" ..." if len(found) > 8 else "")
    what = f"none of them matches hookpoint {hookpoint!r}" if hookpoint else "which one?"
    raise SAEToolkitError(
        f"{root} holds {len(found)} SAEs: {listing}; {what} Pass one folder ({root / found[0].rel}) or"
        f" --hookpoint with its folder name or hookpoint (e.g. {found[0].hookpoint or found[0].rel})"
    )
