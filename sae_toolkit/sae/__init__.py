"""Stage 3, the SAE: an SAEConfig → an SAE module (one file per architecture family, registered in registry.py),
its sparse kernels, and its directory format (save/load, SAELens export); formats/ reads other toolkits' SAEs.
"""

from sae_toolkit.sae.base import SAE, SAEOutput, TrainOutput
from sae_toolkit.sae.config import ARCHS, SAEConfig
from sae_toolkit.sae.export import export_saelens
from sae_toolkit.sae.formats import import_sae, load_sae
from sae_toolkit.sae.gated import GatedSAE
from sae_toolkit.sae.jumprelu import JumpReLUSAE
from sae_toolkit.sae.matryoshka import MatryoshkaSAE
from sae_toolkit.sae.registry import make_sae, register
from sae_toolkit.sae.relu import ReLUSAE
from sae_toolkit.sae.topk import BatchTopKSAE, TopKSAE
from sae_toolkit.sae.transcoder import fold_scales_, load_saelens_transcoder

__all__ = [
    "ARCHS",
    "SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "TopKSAE",
    "TrainOutput",
    "export_saelens",
    "import_sae",
    "fold_scales_",
    "load_saelens_transcoder",
    "load_sae",
    "make_sae",
    "register",
]
