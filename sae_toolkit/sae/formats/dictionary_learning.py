"""dictionary_learning's (saprmarks) SAE folders: `ae.pt` (a state dict, read with torch.load(weights_only=True))
+ `config.json` ({"trainer": {dict_class, activation_dim, dict_size, k, layer, lm_name, submodule_name, ...},
"buffer": {...}}).

Their classes (dictionary_learning/dictionary.py, trainers/*.py), nn.Linear weights transposed to paper names:
- AutoEncoder: `encoder.weight` [d_sae, d_in], `encoder.bias`, `decoder.weight` [d_in, d_sae], `bias` [d_in];
  f = ReLU(encoder(x − bias)), x̂ = decoder(f) + bias. `from_pretrained` rescales the decoder columns to unit
  norm (and the encoder rows and bias by the same norms) by default; so do we.
- AutoEncoderNew: `encoder.*`, `decoder.weight`, `decoder.bias`; f = ReLU(encoder(x)), x̂ = decoder(f).
- GatedAutoEncoder: `encoder.weight` (no bias), `gate_bias`, `mag_bias`, `r_mag`, `decoder.weight`,
  `decoder_bias`; x̃ = x − decoder_bias, f = 1[encoder(x̃) + gate_bias > 0]·ReLU(exp(r_mag)·encoder(x̃) + mag_bias).
- JumpReluAutoEncoder: `W_enc` [d_in, d_sae], `b_enc`, `W_dec` [d_sae, d_in], `b_dec`, `threshold`;
  π = x W_enc + b_enc (no centring), f = ReLU(π·1[π > threshold]).
- AutoEncoderTopK: `encoder.*`, `decoder.weight`, `b_dec`, buffers `k`, `threshold`; f = TopK_k(ReLU(encoder(x −
  b_dec))) (their default encode; the threshold is only used on request).
- BatchTopKSAE / MatryoshkaBatchTopKSAE (the latter with `W_enc`/`W_dec` names): inference f = ReLU(π)·1[ReLU(π) >
  threshold], π = (x − b_dec) W_enc + b_enc — ReLU(π) alone while the threshold is still −1.
Training with normalize_activations saves ae.pt with biases already rescaled to raw units; the mid-training backup
({"ae": state, "norm_factor": s, ...}) has them in training units, so they are rescaled here as their
`scale_biases(s)` does.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae.base import SAE
from sae_toolkit.sae.formats.common import build_sae, dtype_name, need, read_json
from sae_toolkit.sae.formats.hookpoints import from_dictionary_learning

WEIGHTS = "ae.pt"
CFG = "config.json"
CLASSES = ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
           "BatchTopKSAE", "MatryoshkaBatchTopKSAE")


def is_dictionary_learning(path: Path) -> bool:
    return (path / WEIGHTS).is_file()


def _trainer_cfg(path: Path) -> dict[str, Any]:
    if not (path / CFG).is_file():
        return {}
    cfg = read_json(path / CFG)
    trainer = cfg.get("trainer", cfg)
    return trainer if isinstance(trainer, dict) else {}


def hookpoint_of(path: Path) -> str:
    return from_dictionary_learning(_trainer_cfg(path))


def _guess_class(sd: dict[str, Tensor]) -> str:
    """The dictionary class a state dict belongs to, from its tensor names (config.json may not say)."""
    if "gate_bias" in sd:
        return "GatedAutoEncoder"
    if "group_sizes" in sd:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in sd:
        return "JumpReluAutoEncoder"
    if "k" in sd:
        return "AutoEncoderTopK"
    if "decoder.bias" in sd:
        return "AutoEncoderNew"
    return "AutoEncoder"


def _read(path: Path) -> tuple[dict[str, Tensor], float | None]:
    """(state dict, norm_factor still to fold) from ae.pt: a plain state dict or a training backup."""
    try:
        obj = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise SAEToolkitError(
            f"cannot read {path / WEIGHTS} with torch.load(weights_only=True) ({str(e).splitlines()[0]}); it holds"
            " more than tensors or is damaged, and sae-toolkit never unpickles arbitrary objects"
        ) from None
    norm_factor = None
    if isinstance(obj, dict) and isinstance(obj.get("ae"), dict):  # the trainer's resumable backup
        norm_factor = obj.get("norm_factor")
        obj = obj["ae"]
    if not isinstance(obj, dict) or not all(isinstance(t, Tensor) for t in obj.values()):
        raise SAEToolkitError(f"{path / WEIGHTS} holds no state dict of tensors; is it dictionary_learning's ae.pt?")
    return obj, None if norm_factor is None else float(norm_factor)


def load(path: Path, device: str | torch.device = "cpu") -> SAE:
    """The dictionary_learning SAE in folder `path` as our SAE (see the module docstring for each class)."""
    trainer = _trainer_cfg(path)
    sd, norm_factor = _read(path)
    dtype = dtype_name(next((t for t in sd.values() if t.is_floating_point()), None))
    sd = {n: t.to(torch.float64) if t.is_floating_point() else t for n, t in sd.items()}
    cls = str(trainer.get("dict_class") or _guess_class(sd))
    if cls not in CLASSES:
        raise SAEToolkitError(f"{path / CFG} names dict_class {cls!r}; sae-toolkit loads {', '.join(CLASSES)}")
    where = path / WEIGHTS
    k = None
    apply_b_dec = True
    if cls == "AutoEncoder":
        need(sd, ["encoder.weight", "encoder.bias", "decoder.weight", "bias"], where)
        W_enc, b_enc, W_dec = sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T
        n = W_dec.norm(dim=-1)  # [d_sae]; their from_pretrained(normalize_decoder=True)
        t = {"W_enc": W_enc * n, "b_enc": b_enc * n, "W_dec": W_dec / n[:, None], "b_dec": sd["bias"]}
        arch = "relu"
    elif cls == "AutoEncoderNew":
        need(sd, ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"], where)
        t = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "W_dec": sd["decoder.weight"].T,
             "b_dec": sd["decoder.bias"]}
        arch, apply_b_dec = "relu", False
        if norm_factor is not None:
            raise SAEToolkitError(f"{where}: AutoEncoderNew has no scale_biases, so its backup cannot be rescaled")
    elif cls == "GatedAutoEncoder":
        need(sd, ["encoder.weight", "gate_bias", "mag_bias", "r_mag", "decoder.weight", "decoder_bias"], where)
        t = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["gate_bias"], "W_dec": sd["decoder.weight"].T,
             "b_dec": sd["decoder_bias"], "r_mag": sd["r_mag"], "b_mag": sd["mag_bias"]}
        arch = "gated"
    elif cls == "JumpReluAutoEncoder":
        need(sd, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], where)
        t = {n: sd[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        arch, apply_b_dec = "jumprelu", False
    else:  # the TopK family
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] if cls == "MatryoshkaBatchTopKSAE" else \
            ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"]
        need(sd, [*names, "threshold"] + ([] if "k" in trainer else ["k"]), where)
        if cls == "MatryoshkaBatchTopKSAE":
            t = {n: sd[n] for n in names}
        else:
            t = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "W_dec": sd["decoder.weight"].T,
                 "b_dec": sd["b_dec"]}
        k = int(sd["k"]) if "k" in sd else int(trainer["k"])
        threshold = sd["threshold"].reshape(())
        if cls == "AutoEncoderTopK":
            arch = "topk"
        elif threshold >= 0:
            arch, t["threshold"] = "batchtopk", threshold
        else:
            arch, k = "relu", None  # their encode with threshold −1 keeps every positive pre-activation
    if norm_factor is not None:
        # their scale_biases(norm_factor): biases and thresholds back to raw-activation units
        for name in ("b_enc", "b_dec", "b_mag", "threshold"):
            if name in t and (name != "threshold" or arch != "batchtopk" or t[name] >= 0):
                t[name] = t[name] * norm_factor
    return build_sae(
        arch, t, device=device, dtype=dtype, k=k,
        hookpoint=from_dictionary_learning(trainer), model=str(trainer.get("lm_name") or ""),
        apply_b_dec_to_input=apply_b_dec,
        source={"source_format": "dictionary_learning", "source": str(path), "dictionary_learning_class": cls,
                "dictionary_learning_norm_factor": norm_factor},
    )
