"""Offline data for the baselines: sklearn digits, MNIST files, the credit-card-fraud CSV, synthetic transactions."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from sae_toolkit.errors import SAEToolkitError

CREDIT_CARD_COLUMNS = ["Time", *[f"V{i}" for i in range(1, 29)], "Amount", "Class"]
"""The schema of the common credit-card-fraud CSV (ULB / Kaggle "creditcard.csv")."""


class ImageData(NamedTuple):
    """Grey images as the ConvAutoencoder takes them."""

    images: np.ndarray
    """float32 [n, 1, S, S], pixels in [0, 1]."""
    labels: np.ndarray
    """int64 [n], the digit."""


class NoveltySplit(NamedTuple):
    """A novelty-detection split: fit on normal rows only, test on held-out normals plus every anomaly."""

    X_train: np.ndarray
    """float [n_train, d], normal rows only."""
    X_test: np.ndarray
    """float [n_test, d]."""
    y_test: np.ndarray
    """int [n_test], 1 = anomaly."""


def load_digits_images() -> ImageData:
    """sklearn's bundled 8×8 digits (1797 images, no download), scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]  # [n, 1, 8, 8]
    return ImageData(images, d.target.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """The IDX format of the original MNIST files (optionally gzipped): magic, dims, then uint8 data."""
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SAEToolkitError(f"{path} is not an IDX uint8 file (bad magic number); pass the original MNIST files")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SAEToolkitError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def load_mnist(path: str | Path, split: str = "train") -> ImageData:
    """MNIST from files you already have (no download): a folder with the IDX files
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` or an ``mnist.npz`` with x_train/y_train/x_test/y_test."""
    if split not in ("train", "test"):
        raise SAEToolkitError(f"split={split!r}; use 'train' or 'test'")
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            key = "train" if split == "train" else "test"
            if f"x_{key}" not in z:
                raise SAEToolkitError(f"{p} has no x_{key}/y_{key} arrays (found {sorted(z.files)})")
            x, y = z[f"x_{key}"], z[f"y_{key}"]
    elif p.is_dir():
        prefix = "train" if split == "train" else "t10k"
        found = {}
        for kind, stem in [("x", f"{prefix}-images-idx3-ubyte"), ("y", f"{prefix}-labels-idx1-ubyte")]:
            cands = [p / stem, p / f"{stem}.gz", p / stem.replace("-idx", ".idx")]
            hit = next((c for c in cands if c.exists()), None)
            if hit is None:
                raise SAEToolkitError(f"no {stem}[.gz] in {p}; put the MNIST IDX files there or pass an mnist.npz")
            found[kind] = _read_idx(hit)
        x, y = found["x"], found["y"]
    else:
        raise SAEToolkitError(f"MNIST path {str(p)!r} is neither a folder of IDX files nor an .npz file")
    images = (x.astype(np.float32) / 255.0)[:, None]  # [n, 1, 28, 28]
    return ImageData(images, y.astype(np.int64))


def load_credit_card_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV with the credit-card-fraud schema (Time, V1…V28, Amount, Class) and check it."""
    p = Path(path)
    if not p.exists():
        raise SAEToolkitError(f"no such file {str(p)!r}; pass the path to creditcard.csv")
    df = pd.read_csv(p)
    missing = [c for c in CREDIT_CARD_COLUMNS if c not in df.columns]
    if missing:
        raise SAEToolkitError(
            f"{p.name} lacks column(s) {missing[:6]}{'...' if len(missing) > 6 else ''}; expected "
            "Time, V1…V28, Amount, Class"
        )
    bad = sorted(set(pd.unique(df["Class"])) - {0, 1})
    if bad:
        raise SAEToolkitError(f"Class must be 0 (normal) or 1 (fraud); {p.name} also has {bad[:5]}")
    return df[CREDIT_CARD_COLUMNS]


def credit_card_features(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Model inputs from the credit-card schema: V1…V28, log1p(Amount) and the hour of day as sin/cos.

    Returns (X float32 [n, 31], y int64 [n], feature names). Amount is heavy-tailed (log makes it usable by a
    scaler) and raw Time only counts seconds since the first transaction; the hour of day is what carries signal.
    """
    missing = [c for c in CREDIT_CARD_COLUMNS if c not in df.columns]
    if missing:
        raise SAEToolkitError(f"the frame lacks column(s) {missing[:6]}; expected Time, V1…V28, Amount, Class")
    hour = (df["Time"].to_numpy(dtype=np.float64) / 3600.0) % 24.0
    cols = {f"V{i}": df[f"V{i}"].to_numpy(dtype=np.float64) for i in range(1, 29)}
    cols["log_amount"] = np.log1p(np.clip(df["Amount"].to_numpy(dtype=np.float64), 0, None))
    cols["hour_sin"] = np.sin(2 * np.pi * hour / 24)
    cols["hour_cos"] = np.cos(2 * np.pi * hour / 24)
    X = np.stack(list(cols.values()), axis=1).astype(np.float32)
    return X, df["Class"].to_numpy(dtype=np.int64), list(cols)


def make_transactions(n: int = 20_000, fraud_rate: float = 0.0017, seed: int = 0) -> pd.DataFrame:
    """Synthetic card transactions in the credit-card schema, with the real data set's imbalance by default.

    Normal rows: V1…V28 are a smooth non-linear function of 4 hidden factors plus small noise, scaled with
    decreasing variance like PCA components; Amount is log-normal (median ≈ $20) and tied to one factor;
    Time spans two days with fewer transactions at night. Fraud rows (share ``fraud_rate``): three kinds —
    off-manifold (large shifts on V10, V12, V14, V17 as in the real data), card testing (tiny amounts at night,
    moderate shifts) and mimicry (subtle shifts, hard to catch). Deterministic for a given seed.
    """
    if n < 10:
        raise SAEToolkitError(f"n={n} is too small; ask for at least 10 transactions")
    if not 0.0 < fraud_rate < 0.5:
        raise SAEToolkitError(f"fraud_rate={fraud_rate} must be in (0, 0.5); the real data have 0.0017")
    rng = np.random.default_rng(seed)
    n_fraud = max(1, int(round(n * fraud_rate)))
    n_normal = n - n_fraud
    # a fixed manifold, independent of `seed`, so that train and test draws with different seeds agree
    mrng = np.random.default_rng(12345)
    A = mrng.normal(size=(4, 28)) / 2.0
    B = mrng.normal(size=(4, 28))
    scale = np.linspace(1.9, 0.35, 28)  # like the std of the real V1…V28

    def manifold(f: np.ndarray) -> np.ndarray:
        v = f @ A + 0.6 * np.sin(f @ B)  # [n, 28]
        return v / np.sqrt(1 + 0.6**2 / 2 * 4) * scale

    f = rng.normal(size=(n_normal, 4))
    V = manifold(f) + rng.normal(scale=0.15, size=(n_normal, 28)) * scale
    amount = np.exp(3.0 + 1.1 * rng.normal(size=n_normal) + 0.4 * f[:, 0])
    hour = rng.choice(24, size=n_normal, p=_hourly_profile(night=0.2))

    kinds = rng.choice(3, size=n_fraud, p=[0.5, 0.3, 0.2])
    fz = rng.normal(size=(n_fraud, 4))
    Vf = manifold(fz) + rng.normal(scale=0.15, size=(n_fraud, 28)) * scale
    shift = np.zeros((n_fraud, 28))
    key = [9, 11, 13, 16]  # V10, V12, V14, V17
    strength = np.select([kinds == 0, kinds == 1], [3.0, 1.5], default=0.7)
    shift[:, key] = -strength[:, None] * rng.uniform(0.6, 1.4, size=(n_fraud, 4)) * scale[key]
    Vf = Vf + shift + rng.normal(scale=0.4, size=(n_fraud, 28)) * scale * (kinds != 2)[:, None]
    amount_f = np.where(kinds == 1, rng.uniform(0.5, 3.0, n_fraud), np.exp(4.0 + 1.5 * rng.normal(size=n_fraud)))
    hour_f = rng.choice(24, size=n_fraud, p=_hourly_profile(night=1.5))

    V = np.concatenate([V, Vf])
    amount = np.round(np.concatenate([amount, amount_f]), 2)
    hour = np.concatenate([hour, hour_f])
    day = rng.integers(0, 2, size=n)
    time = (day * 24 + hour) * 3600 + rng.integers(0, 3600, size=n)
    cls = np.concatenate([np.zeros(n_normal, np.int64), np.ones(n_fraud, np.int64)])
    order = np.argsort(time, kind="stable")
    df = pd.DataFrame(V[order], columns=[f"V{i}" for i in range(1, 29)])
    df.insert(0, "Time", time[order].astype(np.float64))
    df["Amount"] = amount[order]
    df["Class"] = cls[order]
    return df


def _hourly_profile(night: float) -> np.ndarray:
    """Probability of each hour of day; ``night`` scales the 0–6 h weight relative to daytime."""
    w = np.ones(24)
    w[:6] = night
    return w / w.sum()


def breast_cancer_data() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's breast-cancer data as a novelty problem: (X [569, 30], y) with y = 1 for malignant (the anomaly)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return d.data.astype(np.float64), (d.target == 0).astype(np.int64)  # sklearn: 0 = malignant


def novelty_split(X: np.ndarray, y: np.ndarray, n_train: int | float, seed: int = 0) -> NoveltySplit:
    """Random normal rows (y == 0) for training, the remaining normals plus every anomaly for testing.

    n_train: a count of normal rows, or a fraction of them when < 1.
    """
    X, y = np.asarray(X), np.asarray(y)
    normal = np.flatnonzero(y == 0)
    k = int(round(n_train * len(normal))) if n_train < 1 else int(n_train)
    if not 1 <= k < len(normal):
        raise SAEToolkitError(f"n_train={n_train} must leave test normals: there are {len(normal)} normal rows")
    rng = np.random.default_rng(seed)
    train = rng.permutation(normal)[:k]
    test = np.setdiff1d(np.arange(len(y)), train)
    return NoveltySplit(X[train], X[test], y[test])
