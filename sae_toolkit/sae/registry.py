"""The SAE registry: cfg.arch → class. Each architecture module registers its classes here on import."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.config import SAEConfig

# The registry knows classes only as nn.Module subclasses: importing sae.base here would make base ↔ registry a
# circle (base's SAE.load builds through make_sae).

_CLASSES: dict[str, type] = {}
C = TypeVar("C", bound=type)

Loader = Callable[[Path, dict[str, Any], Any], nn.Module | None]
"""(SAE directory, its cfg.json dict, device) → the loaded SAE, or None when the directory is not its format."""
_LOADERS: list[Loader] = []


def register_loader(fn: Loader) -> Loader:
    """Decorator: let `SAE.load` try `fn` on every directory before reading it as sae-toolkit's own format."""
    if fn not in _LOADERS:
        _LOADERS.append(fn)
    return fn


def foreign_loaders() -> list[Loader]:
    """The loaders registered with `register_loader`, in registration order."""
    return list(_LOADERS)


def register(cls: C) -> C:
    """Class decorator: make `cls` the implementation of every arch in `cls.archs`."""
    for arch in cls.archs:
        if arch in _CLASSES and _CLASSES[arch] is not cls:
            raise SAEToolkitError(f"arch {arch!r} is registered twice ({_CLASSES[arch].__name__}, {cls.__name__})")
        _CLASSES[arch] = cls
    return cls


def sae_class(arch: str) -> type[nn.Module]:
    """The class registered for `arch` (the package `sae_toolkit.sae` imports every architecture module)."""
    if arch not in _CLASSES:
        raise SAEToolkitError(f"no SAE class is registered for arch {arch!r}; known: {', '.join(sorted(_CLASSES))}")
    return _CLASSES[arch]


def make_sae(cfg: SAEConfig, device: str | torch.device | None = None) -> nn.Module:
    """Build a freshly initialised SAE (a `sae_toolkit.sae.SAE`) of cfg.arch on `device`."""
    return sae_class(cfg.arch)(cfg, device=device)
