"""Test helpers for the store and trainer: activation files written with plain h5py, and toy superposition data."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

BOS = 0


def write_acts(
    path: Path,
    acts: dict[str, np.ndarray],
    *,
    context_size: int,
    tokens: np.ndarray | None = None,
    bos_token_id: int | None = BOS,
    dtype: str = "float32",
    chunk_rows: int = 64,
    extra_rows: int = 0,
    seed: int = 0,
) -> Path:
    """Write an activation file following DESIGN.md §3 with plain h5py.

    acts: hookpoint -> `[n_seqs*context_size, d]` float array. tokens: `[n_seqs, context_size]` (default: random
    ids >= 1 with BOS at position 0). extra_rows: garbage rows past the data, as a killed writer leaves them.
    dtype: float16, float32 or bfloat16 (stored as uint16 with attr dtype="bfloat16").
    """
    n_rows = next(iter(acts.values())).shape[0]
    n_seqs = n_rows // context_size
    assert n_seqs * context_size == n_rows
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(1, 1000, size=(n_seqs, context_size), dtype=np.int32)
        if bos_token_id is not None:
            tokens[:, 0] = bos_token_id
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "sae_toolkit.activations", "format_version": 1, "model": "toy",
                        "dataset": "toy", "context_size": context_size, "n_seqs": n_seqs, "tokenizer": "toy",
                        "created": "2026-01-01T00:00:00Z", "toolkit_version": "test", "config": json.dumps({})})
        if bos_token_id is not None:
            f.attrs["bos_token_id"] = bos_token_id
        f.create_dataset("tokens", data=tokens.astype(np.int32))
        for hp, a in acts.items():
            a = np.asarray(a, dtype=np.float32)
            if extra_rows:
                a = np.concatenate([a, np.full((extra_rows, a.shape[1]), np.nan, dtype=np.float32)])
            if dtype == "bfloat16":
                # Round to nearest even, as torch does, then keep the top 16 bits.
                bits = a.view(np.uint32)
                stored = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            else:
                stored = a.astype(dtype)
            ds = f.create_dataset(f"acts/{hp}", data=stored, chunks=(min(chunk_rows, len(stored)), a.shape[1]))
            ds.attrs.update({"hookpoint": hp, "module": hp, "io": "output", "d": a.shape[1], "dtype": dtype})
    return path


def toy_superposition(n_rows: int, d: int = 32, n_true: int = 128, p_active: float = 4 / 128,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows `[n_rows, d]` = sparse non-negative sums of `n_true` random unit directions `[n_true, d]`.

    Each direction is active independently with probability `p_active`, with magnitude uniform in [0.5, 1.5].
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    active = rng.random((n_rows, n_true)) < p_active
    mags = rng.uniform(0.5, 1.5, size=(n_rows, n_true)) * active
    return (mags @ dirs).astype(np.float32), dirs.astype(np.float32)


def mean_max_cosine(W_dec: np.ndarray, dirs: np.ndarray) -> float:
    """For each true direction `[n_true, d]`, the best cosine with any decoder row `[d_sae, d]`; averaged."""
    W = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True).clip(1e-12)
    return float((dirs @ W.T).max(axis=1).mean())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP spin-waiting made each step of
    these tests ~100x slower (126 ms vs 1.3 ms measured); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_file(path: Path, n_rows: int = 64 * 256, context_size: int = 64, seed: int = 0,
             **kw) -> tuple[Path, np.ndarray]:
    """A superposition toy activation file (hookpoint "hp", no BOS) and its true directions."""
    acts, dirs = toy_superposition(n_rows, seed=seed, **kw)
    return write_acts(path, {"hp": acts}, context_size=context_size, bos_token_id=None), dirs
