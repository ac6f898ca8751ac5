"""`hf:ORG/REPO[/SUBFOLDER]` SAE sources: downloaded with huggingface_hub when online, read from the local Hugging
Face cache (HF_HUB_CACHE) when offline or unreachable."""

from __future__ import annotations

from pathlib import Path

from sae_toolkit.errors import SAEToolkitError

PREFIX = "hf:"
ROOT_FILES = ["cfg.json", "config.json", "sae_weights.safetensors", "sae.safetensors", "params.npz", "ae.pt",
              "activation_scaler.json"]
"""What a repository's root may hold of an SAE: without a SUBFOLDER only these are fetched, never a whole
repository of hundreds of SAEs."""


def is_hub_id(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> tuple[str, str]:
    """`hf:ORG/REPO/a/b` → ("ORG/REPO", "a/b")."""
    parts = [p for p in source[len(PREFIX):].strip("/").split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise SAEToolkitError(f"cannot read hub id {source!r}; write hf:ORG/REPO or hf:ORG/REPO/SUBFOLDER")
    return "/".join(parts[:2]), "/".join(parts[2:])


def fetch(source: str) -> Path:
    """The local folder holding `source`'s files (the SUBFOLDER inside the repository snapshot)."""
    repo_id, sub = parse(source)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SAEToolkitError(f"{source} needs huggingface_hub: pip install huggingface_hub") from None
    patterns = [f"{sub}/*", "config.json"] if sub else ROOT_FILES
    try:
        root = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as online_error:  # offline, unreachable, rate-limited, ...: the cache may still have it
        try:
            root = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        except Exception:
            reason = str(online_error).splitlines()[0] if str(online_error) else type(online_error).__name__
            raise SAEToolkitError(
                f"cannot download {source} ({reason[:200]}) and it is not in the local Hugging Face cache; connect"
                " to the internet once, or check the id (hf:ORG/REPO[/SUBFOLDER])"
            ) from None
    path = Path(root) / sub
    if not path.is_dir():
        raise SAEToolkitError(f"{source}: the repository has no folder {sub!r}; check the SUBFOLDER")
    return path
