"""Tiny data sets shared by the baselines tests."""

import numpy as np


def low_rank_rows(n: int = 256, d: int = 12, rank: int = 3, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """Rows near a rank-`rank` subspace: an autoencoder can learn them quickly, float32 [n, d]."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(rank, d))
    return (rng.normal(size=(n, rank)) @ basis + noise * rng.normal(size=(n, d))).astype(np.float32)


def unit_rows(n: int = 256, d: int = 16, seed: int = 0) -> np.ndarray:
    """Data in [0, 1] for BCE tests, float32 [n, d]."""
    x = low_rank_rows(n, d, seed=seed)
    return ((np.tanh(x) + 1) / 2).astype(np.float32)
