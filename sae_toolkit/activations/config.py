"""The cache configuration: what `sae-toolkit cache` reads, which model, which corpus, where to write."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.units import parse_size

DTYPES = ("float16", "bfloat16", "float32")
FLOAT16_MAX = 65504.0
# Settings that decide the file's content: a resume must use the same ones.
GPU_TOKENS_PER_FORWARD = 32768
"""Tokens per forward pass on an accelerator when batch_size is None."""

IDENTITY_FIELDS = ("model", "dataset", "split", "text_column", "context_size", "hookpoints", "dtype")


@dataclass
class CacheConfig:
    """Everything `sae-toolkit cache` needs; stored as JSON in the file's `config` attr."""

    model: str
    """Model spec: hub id, local dir, .gguf file or builtin (see sae_toolkit.model.loading)."""
    hookpoints: list[str]
    """Hookpoint names (module paths, `:input`, aliases such as `mlp_out.6`); all cached in one pass."""
    dataset: str
    """Corpus spec: HF dataset id, local .txt/.jsonl/.parquet/.csv or save_to_disk folder, `builtin:pydoc`."""
    tokens: int
    """Tokens to cache, rounded up to whole windows; fewer when the corpus runs out first."""
    out: str
    """Output .h5 file; never overwritten unless `resume` continues it."""
    split: str = "train"
    """Dataset split (HF ids and save_to_disk folders)."""
    text_column: str | None = None
    """Column holding the text; None guesses (`text`, `content`, ...)."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    batch_size: int | None = None
    """Windows per forward pass. None: enough for 32k tokens per forward on a GPU (a small batch leaves it
    launch-bound), 32 windows on CPU."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the activations (bfloat16 is stored as uint16 bits with attr dtype='bfloat16')."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:N`."""
    resume: bool = False
    """Continue an interrupted `out` file instead of refusing to touch it."""
    first_window: int = 0
    """Skip this many corpus windows first (one rank's shard under torchrun; see activations/shards.py)."""

    def __post_init__(self) -> None:
        if isinstance(self.hookpoints, str):
            self.hookpoints = [self.hookpoints]
        if not self.hookpoints or not all(isinstance(h, str) and h for h in self.hookpoints):
            raise SAEToolkitError(f"hookpoints={self.hookpoints!r}: give at least one name such as mlp_out.3")
        if not self.model:
            raise SAEToolkitError("model is empty; give a model spec such as smollm2-135m")
        if not self.dataset:
            raise SAEToolkitError("dataset is empty; give a corpus spec such as builtin:pydoc")
        if not self.out:
            raise SAEToolkitError("out is empty; give the output .h5 path")
        self.tokens = parse_size(self.tokens)
        if not isinstance(self.context_size, int) or self.context_size < 2:
            raise SAEToolkitError(f"context_size={self.context_size!r} must be an integer >= 2")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise SAEToolkitError(f"batch_size={self.batch_size!r} must be a positive integer")
        if not isinstance(self.first_window, int) or self.first_window < 0:
            raise SAEToolkitError(f"first_window={self.first_window!r} must be a non-negative integer")
        if self.dtype not in DTYPES:
            raise SAEToolkitError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")

    def windows_per_forward(self, device: str) -> int:
        """`batch_size`, or its default for `device` (cpu, cuda, cuda:N, mps)."""
        if self.batch_size is not None:
            return self.batch_size
        return 32 if device == "cpu" else max(1, math.ceil(GPU_TOKENS_PER_FORWARD / self.context_size))

    @property
    def n_seqs_target(self) -> int:
        """Windows needed for `tokens` tokens."""
        return math.ceil(self.tokens / self.context_size)
