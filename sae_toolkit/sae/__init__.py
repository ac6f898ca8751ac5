"""Stage 3, the SAE: an SAEConfig → an SAE module (one file per architecture family, registered in registry.py),
its sparse kernels, and its directory format (save/load, SAELens export).
"""

from sae_toolkit.sae.base import SAE, SAEOutput, TrainOutput
from sae_toolkit.sae.config import ARCHS, SAEConfig
from sae_toolkit.sae.export import export_saelens
from sae_toolkit.sae.gated import GatedSAE
from sae_toolkit.sae.jumprelu import JumpReLUSAE
from sae_toolkit.sae.registry import make_sae, register
from sae_toolkit.sae.relu import ReLUSAE
from sae_toolkit.sae.topk import BatchTopKSAE, TopKSAE
from sae_toolkit.sae.transcoder import fold_scales_, load_saelens_transcoder

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
    "fold_scales_",
    "load_saelens_transcoder",
    "load_sae",
    "make_sae",
    "register",
]
