"""Other toolkits' SAE formats, read into our SAE: SAELens, EleutherAI sparsify, Gemma Scope, dictionary_learning
and hf:ORG/REPO[/SUBFOLDER] hub ids (one module per format, detect.py picks the module, loading.py is the entry).

Layout without an import circle: these modules import sae.base, so base cannot import them. Instead this package
registers `load_foreign` in sae.registry on import (sae/__init__ imports it), and `SAE.load` asks the registry
first: a foreign folder comes back loaded, our own directories fall through to base's reader.
"""

from sae_toolkit.sae.formats.detect import FORMATS, detect
from sae_toolkit.sae.formats.hookpoints import from_sparsify, from_transformerlens
from sae_toolkit.sae.formats.loading import import_sae, load_foreign, load_sae
from sae_toolkit.sae.registry import register_foreign_loader

register_foreign_loader(load_foreign)

__all__ = ["FORMATS", "detect", "from_sparsify", "from_transformerlens", "import_sae", "load_foreign", "load_sae"]
