"""Shared pytest set-up: CPU only, quiet progress bars, a persistent model cache for the real-model tests."""

import os

# tqdm bars in captured test output are noise; the code paths that draw them still run.
os.environ.setdefault("TQDM_DISABLE", "1")
# Keep converted GGUF weights between test sessions (the first conversion takes ~25 s on 2 cores).
os.environ.setdefault("SAE_TOOLKIT_CACHE", os.path.expanduser("~/.cache/sae_toolkit"))
