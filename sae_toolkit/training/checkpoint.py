"""Training checkpoints: one directory per step with tensors in safetensors and the rest in JSON, written atomically.

    RUN_DIR/checkpoints/step_00001000/
        tensors.safetensors   model, optimizer state, dead-latent counters, resampling RNG
        state.json            step, store position, optimizer hyper-parameters, configs

Nothing is pickled: optimizer state is flattened into named tensors plus JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sae_toolkit.errors import SAEToolkitError

TENSORS_NAME = "tensors.safetensors"
STATE_NAME = "state.json"
_PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint `step` under RUN_DIR/checkpoints and delete all but the newest `keep`.

    Written into a temporary directory first and renamed into place, so a kill leaves either the old set of
    checkpoints or the new one, never a half-written directory that `--resume` would pick up.
    """
    from safetensors.torch import save_file

    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS_NAME))
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """`(tensors, state)` of a checkpoint directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(Path(path) / TENSORS_NAME), device=str(device))
        state = json.loads((Path(path) / STATE_NAME).read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise SAEToolkitError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an older one") from None
    return tensors, state


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Split `opt.state_dict()` into named tensors (`optim.<param>.<key>`) and a JSON-ready rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                        prefix: str = "optim.") -> None:
    """Inverse of `optimizer_to_flat`: load the state into `opt`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            idx, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
