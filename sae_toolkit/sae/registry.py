"""The SAE registry: cfg.arch → class. Each architecture module registers its classes here on import."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.config import SAEConfig

# The registry knows classes only as nn.Module subclasses: importing sae.base here would make base ↔ registry a
# circle (base's SAE.load builds through make_sae).

_CLASSES: dict[str, type] = {}
C = TypeVar("C", bound=type)

# Loaders of other toolkits' SAE formats (sae/formats registers one): SAE.load asks them first. They import
# sae.base, so base reaches them through here rather than by importing them.
_FOREIGN_LOADERS: list[Callable[..., nn.Module | None]] = []


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


def register_foreign_loader(fn: Callable[..., nn.Module | None]) -> None:
    """Make `fn(path, device)` a loader SAE.load tries first; it returns the SAE, or None for paths it leaves to
    SAE.load (our own directories)."""
    if fn not in _FOREIGN_LOADERS:
        _FOREIGN_LOADERS.append(fn)


def load_foreign(path: object, device: str | torch.device = "cpu") -> nn.Module | None:
    """The SAE at `path` when a registered foreign-format loader takes it, else None."""
    for fn in _FOREIGN_LOADERS:
        sae = fn(path, device)
        if sae is not None:
            return sae
    return None
