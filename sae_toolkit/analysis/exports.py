"""Report data in other tools' layouts: SAEBench core-eval results JSON and Neuronpedia dashboard batches.

Both are written from the report's own numbers (DESIGN §6 definitions; in particular `explained_variance` is
1 − FVU about the mean, not the variance-about-zero formula some SAEBench versions shipped).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from pathlib import Path

from sae_toolkit import __version__

NEURONPEDIA_BATCH = 256
"""Features per Neuronpedia batch file (SAEDashboard's neuronpedia runner writes batch-N.json the same way)."""


def _num(v):
    return v if isinstance(v, int | float) and math.isfinite(v) else None


def saebench_core(sae, metrics: dict, table) -> dict:
    """SAEBench `core` eval output: eval_type_id, eval_config, eval_result_metrics grouped as SAEBench groups them,
    per-latent arrays in eval_result_unstructured, and the SAE config in sae_cfg_dict."""
    m = {k: _num(v) if isinstance(v, float) else v for k, v in metrics.items()}
    has_model = "ce_clean" in metrics
    groups = {
        "reconstruction_quality": {"explained_variance": m["explained_variance"], "mse": m["mse"],
                                   "cossim": m["cosine_sim"]},
        "shrinkage": {"l2_norm_in": m["l2_norm_in"], "l2_norm_out": m["l2_norm_out"], "l2_ratio": m["l2_ratio"],
                      "relative_reconstruction_bias": m["relative_reconstruction_bias"]},
        "sparsity": {"l0": m["l0"], "l1": m["l1"]},
        "token_stats": {"total_tokens_eval_reconstruction": m.get("model_tokens", 0),
                        "total_tokens_eval_sparsity_variance": m["tokens_evaluated"]},
    }
    if has_model:
        groups = {
            "model_behavior_preservation": {"kl_div_score": m["kl_div_score"],
                                            "kl_div_with_ablation": m["kl_zero_ablation"],
                                            "kl_div_with_sae": m["kl_sae"]},
            "model_performance_preservation": {"ce_loss_score": m["ce_loss_recovered"],
                                               "ce_loss_with_ablation": m["ce_zero_ablation"],
                                               "ce_loss_with_sae": m["ce_sae"],
                                               "ce_loss_without_sae": m["ce_clean"]},
            **groups,
        }
    cfg = sae.cfg
    return {
        "eval_type_id": "core",
        "eval_config": {
            "model_name": metrics["model"], "llm_dtype": "float32", "dataset": metrics["dataset"],
            "context_size": metrics["context_size"], "compute_kl": has_model, "compute_ce_loss": has_model,
            "compute_l2_norms": True, "compute_sparsity_metrics": True, "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": True, "n_eval_reconstruction_windows": m.get("model_seqs"),
            "n_eval_sparsity_variance_windows": metrics["seqs_evaluated"],
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": groups,
        "eval_result_details": [],
        "eval_result_unstructured": {
            "feature_density": [float(v) for v in table["density"]],
            "mean_activation": [float(v) for v in table["mean_activation"]],
            # None where undefined (transcoders: encoder and decoder live in different spaces)
            "encoder_decoder_cosine_sim": [float(v) if v == v else None for v in table["enc_dec_cos"]],
        },
        "sae_bench_commit_hash": None,
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_toolkit_version": __version__,
        "sae_cfg_dict": {"architecture": cfg.arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
                         "hook_name": metrics["hookpoint"], "model_name": metrics["model"], "dtype": cfg.dtype,
                         "context_size": metrics["context_size"]},
    }


def write_saebench(path: Path, sae, metrics: dict, table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saebench_core(sae, metrics, table), indent=2, allow_nan=False) + "\n")
    return path


def neuronpedia_feature(rec: dict) -> dict:
    """One latent in Neuronpedia's dashboard-batch layout (fields as SAEDashboard's neuronpedia runner names them).

    Top examples carry bin_min = bin_max = -1 (Neuronpedia's marker for the top bin); interval samples carry
    their activation interval.
    """
    acts = []
    for e in rec["examples"]:
        acts.append({"tokens": e["tokens"], "values": e["values"], "bin_min": -1, "bin_max": -1,
                     "bin_contains": -1, "qualifying_token_index": e["peak"], "max_value": e["activation"]})
    for e in rec["interval_examples"]:
        lo, hi = e["interval"]
        acts.append({"tokens": e["tokens"], "values": e["values"], "bin_min": lo, "bin_max": hi,
                     "bin_contains": -1, "qualifying_token_index": e["peak"], "max_value": e["activation"]})
    pos, neg = rec.get("logit_pos", []), rec.get("logit_neg", [])
    return {
        "feature_index": rec["feature"],
        "frac_nonzero": rec["density"],
        "max_activation": rec["max_activation"],
        "pos_str": [p["token"] for p in pos], "pos_values": [p["value"] for p in pos],
        "neg_str": [p["token"] for p in neg], "neg_values": [p["value"] for p in neg],
        "activations": acts,
    }


def write_neuronpedia(folder: Path, sae, metrics: dict, records: list[dict]) -> list[Path]:
    """exports/neuronpedia/batch-N.json, NEURONPEDIA_BATCH features each: {model_id, layer, sae_set, features}."""
    folder.mkdir(parents=True, exist_ok=True)
    hp = metrics["hookpoint"]
    digits = re.findall(r"\d+", hp)
    layer = int(digits[0]) if digits else 0
    paths = []
    for b, i in enumerate(range(0, len(records), NEURONPEDIA_BATCH)):
        batch = {"model_id": metrics["model"], "layer": layer, "hookpoint": hp,
                 "sae_set": f"sae-toolkit-{sae.cfg.arch}-{sae.cfg.d_sae}",
                 "features": [neuronpedia_feature(r) for r in records[i:i + NEURONPEDIA_BATCH]]}
        p = folder / f"batch-{b}.json"
        p.write_text(json.dumps(batch, ensure_ascii=False, allow_nan=False))
        paths.append(p)
    return paths
