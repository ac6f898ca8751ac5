"""Parsing of human-written sizes (`64k`, `1M`) and device names (`auto`)."""

from __future__ import annotations

import re

from sae_toolkit.errors import SAEToolkitError

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmbg]?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """`"64k"` → 64000, `"1.5M"` → 1500000, `"1B"` → 10**9 (suffixes case-insensitive); ints pass through.

    >>> parse_size("200K"), parse_size("10m"), parse_size(7)
    (200000, 10000000, 7)
    """
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if m is None:
            raise SAEToolkitError(
                f"cannot read size {text!r}: write a number with an optional suffix k, M or B (e.g. 64k, 1M)"
            )
        value = float(m.group(1)) * _SUFFIXES[m.group(2).lower()]
        if value != int(value):
            raise SAEToolkitError(f"size {text!r} is not a whole number of items")
        value = int(value)
    if value <= 0:
        raise SAEToolkitError(f"size {text!r} must be positive")
    return value


def resolve_device(device: str = "auto") -> str:
    """`auto` → `cuda` when a GPU is present, else `cpu`; anything else is checked and returned."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SAEToolkitError(f"--device {device!r} asked for CUDA but no GPU is visible; use --device cpu or auto")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise SAEToolkitError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    return device
