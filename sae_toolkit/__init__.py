"""sae-toolkit: cache language-model activations, train sparse autoencoders, report what their features mean."""

__version__ = "0.1.0"

from sae_toolkit.errors import SAEToolkitError  # noqa: E402

__all__ = ["__version__", "SAEToolkitError"]
