"""Sparse autoencoders: one file per architecture family, a shared base (config, save/load) and SAELens export."""

from sae_toolkit.sae.base import SAE, SAEOutput, TrainOutput, make_sae
from sae_toolkit.sae.config import ARCHS, SAEConfig
from sae_toolkit.sae.export import export_saelens
from sae_toolkit.sae.gated import GatedSAE
from sae_toolkit.sae.jumprelu import JumpReLUSAE
from sae_toolkit.sae.relu import ReLUSAE
from sae_toolkit.sae.topk import BatchTopKSAE, TopKSAE

load_sae = SAE.load
"""Friendly alias: load_sae(path, device="cpu") → the SAE in an SAE directory (or RUN_DIR/sae)."""

__all__ = [
    "ARCHS",
    "SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "TopKSAE",
    "TrainOutput",
    "export_saelens",
    "load_sae",
    "make_sae",
]
