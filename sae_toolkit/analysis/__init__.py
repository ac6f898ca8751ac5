"""Stage 5, analysis: an SAE + activations (+ the model for CE/KL) → metrics, per-latent records, top activations,
and a report directory (metrics.json, tables, self-contained report.html, Neuronpedia/SAEDashboard exports).
"""

import importlib

# `from sae_toolkit.analysis import evaluate, scan, ...` kept working from when analysis was one module; lazy, so
# importing the package does not import torch.
_EXPORTS = ("Scan", "scan", "evaluate", "top_activations", "weight_stats", "feature_table", "logit_lens",
            "model_metrics", "latent_record")


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module("sae_toolkit.analysis.evaluation"), name)
    raise AttributeError(f"module 'sae_toolkit.analysis' has no attribute {name!r}")
