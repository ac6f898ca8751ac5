"""Fixtures for the SAE-format tests: folders written the way SAELens, sparsify, Gemma Scope and
dictionary_learning write them (their file names, tensor names, shapes and cfg keys, from their save code), with
random weights; the reference forwards live in the test files, written from each toolkit's own formulas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def random_weights(d_in: int, d_sae: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Paper-named weights with non-unit decoder rows (so norm folds are exercised) and positive thresholds."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "W_enc": (r(d_in, d_sae) / d_in**0.5).to(dtype),
        "b_enc": (0.2 * r(d_sae) - 0.1).to(dtype),
        "W_dec": (r(d_sae, d_in) * (0.2 + torch.rand(d_sae, 1, generator=g))).to(dtype),
        "b_dec": (0.2 * r(d_in)).to(dtype),
        "threshold": (0.05 + 0.3 * torch.rand(d_sae, generator=g)).to(dtype),
        "r_mag": (0.3 * r(d_sae)).to(dtype),
        "b_mag": (0.2 * r(d_sae)).to(dtype),
    }


# ---- SAELens -------------------------------------------------------------------------------------------------

SAELENS_PARAMS = {
    "standard": ["W_enc", "b_enc", "W_dec", "b_dec"],
    "topk": ["W_enc", "b_enc", "W_dec", "b_dec"],
    "jumprelu": ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
    "gated": ["W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"],
    "batchtopk": ["W_enc", "b_enc", "W_dec", "b_dec", "topk_threshold"],
}


def write_saelens(path: Path, arch: str, w: dict[str, torch.Tensor], *, layout: str = "v6",
                  hook_name: str = "blocks.1.hook_mlp_out", model_name: str = "tiny-llama",
                  apply_b_dec_to_input: bool = True, k: int | float | None = None,
                  normalize_activations: str | bool = "none", extra_cfg: dict | None = None) -> Path:
    """A folder as SAELens' `save_model` writes it: cfg.json + sae_weights.safetensors.

    layout "v6": SAELens ≥ 6 (SAEConfig.to_dict: architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
    normalize_activations, reshape_activations, arch fields, metadata {...}). layout "flat": SAELens < 6 (one flat
    dict, hook_point/hook_name, activation_fn_str + activation_fn_kwargs for TopK, no architecture for standard)."""
    d_in, d_sae = w["W_enc"].shape
    tensors = {"b_gate": w["b_enc"], "topk_threshold": torch.tensor(0.1, dtype=torch.float64), **w}
    tensors = {n: tensors[n].contiguous() for n in SAELENS_PARAMS[arch]}
    dtype = str(w["W_enc"].dtype).removeprefix("torch.")
    if layout == "v6":
        cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu",
               "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize_activations,
               "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1",
                            "model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
                            "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted", "context_size": 128,
                            "model_class_name": "HookedTransformer"}}
        if arch in ("topk", "batchtopk"):
            cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    else:
        cfg = {"model_name": model_name, "hook_point": hook_name, "hook_point_layer": 1,
               "hook_point_head_index": None, "d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu",
               "activation_fn_str": "topk" if arch == "topk" else "relu",
               "activation_fn_kwargs": {"k": k} if arch == "topk" else {},
               "apply_b_dec_to_input": apply_b_dec_to_input, "finetuning_scaling_factor": False,
               "context_size": 128, "dataset_path": "Skylion007/openwebtext", "prepend_bos": True,
               "normalize_activations": normalize_activations, "sae_lens_training_version": "3.13.0"}
        if arch not in ("standard", "topk"):
            cfg["architecture"] = arch
    cfg.update(extra_cfg or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


# ---- sparsify ------------------------------------------------------------------------------------------------


def write_sparsify(path: Path, w: dict[str, torch.Tensor], k: int, **cfg_extra) -> Path:
    """A folder as sparsify's `SparseCoder.save_to_disk` writes it: safetensors' save_model of the module
    (encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec) + cfg.json (SparseCoderConfig + d_in)."""
    d_in, d_sae = w["W_enc"].shape
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}
    save_file(tensors, str(path / "sae.safetensors"), metadata={"format": "pt"})
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": d_sae, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in, **cfg_extra}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


# ---- Gemma Scope ---------------------------------------------------------------------------------------------


def write_gemma_scope(path: Path, w: dict[str, torch.Tensor]) -> Path:
    """A folder as the google/gemma-scope-* repositories hold it: params.npz with W_enc [d_in, d_sae], W_dec
    [d_sae, d_in], b_enc, b_dec, threshold (float32 arrays)."""
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "params.npz", **{n: w[n].float().numpy() for n in ("W_enc", "W_dec", "b_enc", "b_dec",
                                                                          "threshold")})
    return path


# ---- dictionary_learning -------------------------------------------------------------------------------------


def dictionary_learning_state(cls: str, w: dict[str, torch.Tensor], k: int = 4,
                              threshold: float = 0.1) -> dict[str, torch.Tensor]:
    """The state_dict of their class `cls` holding `w` (nn.Linear weights are [out, in])."""
    if cls == "AutoEncoder":
        return {"bias": w["b_dec"], "encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
                "decoder.weight": w["W_dec"].T}
    if cls == "AutoEncoderNew":
        return {"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T,
                "decoder.bias": w["b_dec"]}
    if cls == "GatedAutoEncoder":
        return {"decoder_bias": w["b_dec"], "r_mag": w["r_mag"], "gate_bias": w["b_enc"], "mag_bias": w["b_mag"],
                "encoder.weight": w["W_enc"].T, "decoder.weight": w["W_dec"].T}
    if cls == "JumpReluAutoEncoder":
        return {n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    buffers = {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold)}
    if cls == "MatryoshkaBatchTopKSAE":
        d_sae = w["W_enc"].shape[1]
        return {**buffers, "group_sizes": torch.tensor([d_sae // 2, d_sae - d_sae // 2]),
                **{n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}}
    return {**buffers, "decoder.weight": w["W_dec"].T, "encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
            "b_dec": w["b_dec"]}


def write_dictionary_learning(path: Path, cls: str, w: dict[str, torch.Tensor], *, k: int = 4,
                              threshold: float = 0.1, layer: int = 1, submodule_name: str | None = "mlp_out_layer_1",
                              lm_name: str = "tiny-llama", backup_norm_factor: float | None = None) -> Path:
    """A folder as their `trainSAE` writes it: ae.pt (torch.save of the state dict, or the resumable backup
    {"step", "ae", "optimizer", "config", "norm_factor"}) + config.json {"trainer": {...}, "buffer": {...}}."""
    d_in, d_sae = w["W_enc"].shape
    path.mkdir(parents=True, exist_ok=True)
    state = {n: t.contiguous() for n, t in dictionary_learning_state(cls, w, k, threshold).items()}
    if backup_norm_factor is not None:
        state = {"step": 100, "ae": state, "optimizer": {"state": {}, "param_groups": []}, "config": {},
                 "norm_factor": backup_norm_factor}
    torch.save(state, path / "ae.pt")
    trainer = {"trainer_class": "Trainer", "dict_class": cls, "lr": 1e-4, "steps": 100, "seed": 0,
               "activation_dim": d_in, "dict_size": d_sae, "device": "cpu", "layer": layer, "lm_name": lm_name,
               "wandb_name": "x", "submodule_name": submodule_name}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        trainer["k"] = k
    cfg = {"trainer": trainer, "buffer": {"d_submodule": d_in, "io": "out", "n_ctxs": 100, "ctx_len": 128}}
    (path / "config.json").write_text(json.dumps(cfg, indent=4))
    return path
