"""Offline data of the baselines: digits, MNIST files, the credit-card CSV schema, synthetic transactions."""

import gzip

import numpy as np
import pandas as pd
import pytest

from sae_toolkit.baselines import (
    credit_card_features,
    load_credit_card_csv,
    load_digits_images,
    load_mnist,
    make_transactions,
    novelty_split,
)
from sae_toolkit.baselines.data import CREDIT_CARD_COLUMNS
from sae_toolkit.errors import SAEToolkitError


def test_digits_are_8x8_images_in_the_unit_interval():
    d = load_digits_images()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == np.float32
    assert d.images.min() == 0.0 and d.images.max() == 1.0
    assert set(np.unique(d.labels)) == set(range(10))


def _idx(data: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    return header + data.astype(np.uint8).tobytes()


def test_mnist_idx_files_gzipped_or_not_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(y))
    d = load_mnist(tmp_path)
    assert d.images.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(d.images[:, 0] * 255, x, atol=1e-3)
    np.testing.assert_array_equal(d.labels, y)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    assert load_mnist(tmp_path / "mnist.npz", split="test").images.shape == (2, 1, 28, 28)
    with pytest.raises(SAEToolkitError, match="no t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, split="test")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(SAEToolkitError, match="bad magic number"):
        load_mnist(tmp_path / "bad")


def test_synthetic_transactions_have_the_schema_and_a_realistic_imbalance():
    df = make_transactions(12_000, seed=3)
    assert list(df.columns) == CREDIT_CARD_COLUMNS
    assert df["Class"].sum() == round(12_000 * 0.0017)
    assert df["Time"].is_monotonic_increasing and df["Time"].between(0, 2 * 86400).all()
    assert (df["Amount"] >= 0).all() and 5 < df.loc[df.Class == 0, "Amount"].median() < 60
    v = df[[f"V{i}" for i in range(1, 29)]]
    assert v.std().iloc[0] > 2 * v.std().iloc[-1]  # decreasing spread, like PCA components
    pd.testing.assert_frame_equal(df, make_transactions(12_000, seed=3))
    assert not make_transactions(12_000, seed=4).equals(df)
    with pytest.raises(SAEToolkitError, match="fraud_rate=0.7"):
        make_transactions(100, fraud_rate=0.7)


def test_credit_card_csv_loader_checks_the_schema(tmp_path):
    df = make_transactions(500, fraud_rate=0.02, seed=0)
    path = tmp_path / "creditcard.csv"
    df.to_csv(path, index=False)
    back = load_credit_card_csv(path)
    assert list(back.columns) == CREDIT_CARD_COLUMNS and back["Class"].sum() == 10
    X, y, names = credit_card_features(back)
    assert X.shape == (500, 31) and names[-3:] == ["log_amount", "hour_sin", "hour_cos"]
    assert np.isfinite(X).all() and y.sum() == 10
    df.drop(columns=["V7", "Amount"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(SAEToolkitError, match=r"lacks column\(s\) \['V7', 'Amount'\]"):
        load_credit_card_csv(tmp_path / "short.csv")
    df.assign(Class=2).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(SAEToolkitError, match="Class must be 0"):
        load_credit_card_csv(tmp_path / "labels.csv")
    with pytest.raises(SAEToolkitError, match="no such file"):
        load_credit_card_csv(tmp_path / "missing.csv")


def test_novelty_split_trains_on_normals_only():
    X = np.arange(40, dtype=float).reshape(20, 2)
    y = np.r_[np.zeros(15, int), np.ones(5, int)]
    s = novelty_split(X, y, 10, seed=0)
    assert len(s.X_train) == 10 and set(s.X_train[:, 0] // 2) <= set(range(15))
    assert len(s.X_test) == 10 and s.y_test.sum() == 5
    assert not set(s.X_train[:, 0]) & set(s.X_test[:, 0])
    with pytest.raises(SAEToolkitError, match="must leave test normals"):
        novelty_split(X, y, 15)
