"""sae-toolkit: cache language-model activations, train sparse autoencoders, report what their features mean."""

from __future__ import annotations

import importlib

from sae_toolkit.errors import SAEToolkitError

__version__ = "0.1.0"

# Public names re-exported lazily, so `import sae_toolkit` (and `sae-toolkit --help`) does not import torch.
_EXPORTS = {
    "SAE": "sae_toolkit.sae",
    "SAEConfig": "sae_toolkit.sae",
    "load_sae": "sae_toolkit.sae",
    "export_saelens": "sae_toolkit.sae",
    "load_model": "sae_toolkit.models",
    "load_tokenizer": "sae_toolkit.models",
    "CacheConfig": "sae_toolkit.cache",
    "cache_activations": "sae_toolkit.cache",
    "ActivationStore": "sae_toolkit.store",
    "TrainConfig": "sae_toolkit.train",
    "train_sae": "sae_toolkit.train",
    "evaluate": "sae_toolkit.analysis",
    "build_report": "sae_toolkit.report",
    "load_report": "sae_toolkit.report",
    "run_demo": "sae_toolkit.demo",
}

__all__ = ["__version__", "SAEToolkitError", *_EXPORTS]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae_toolkit' has no attribute {name!r}")
