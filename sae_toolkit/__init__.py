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
    "load_model": "sae_toolkit.model.loading",
    "load_tokenizer": "sae_toolkit.model.loading",
    "CacheConfig": "sae_toolkit.activations.cacher",
    "cache_activations": "sae_toolkit.activations.cacher",
    "ActivationStore": "sae_toolkit.activations.store",
    "TrainConfig": "sae_toolkit.training.trainer",
    "train_sae": "sae_toolkit.training.trainer",
    "evaluate": "sae_toolkit.analysis.evaluation",
    "build_report": "sae_toolkit.analysis.report",
    "load_report": "sae_toolkit.analysis.report",
    "steer": "sae_toolkit.analysis.steering",
    "run_demo": "sae_toolkit.demo",
}

__all__ = ["__version__", "SAEToolkitError", *_EXPORTS]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae_toolkit' has no attribute {name!r}")
