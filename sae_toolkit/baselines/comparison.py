"""The detector against sklearn's classic novelty detectors on identical splits, several seeds (AUC-ROC, AUC-PR)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from sae_toolkit.baselines.data import (
    NoveltySplit,
    breast_cancer_data,
    credit_card_features,
    make_transactions,
    novelty_split,
)
from sae_toolkit.errors import SAEToolkitError

DETECTORS = ("autoencoder", "seed_autoencoder", "isolation_forest", "local_outlier_factor", "one_class_svm")
"""Names accepted by ``compare_detectors``: ours, the seed's recipe as written, and three sklearn baselines."""


def _ours(split: NoveltySplit, seed: int, n_epochs: int) -> np.ndarray:
    from sae_toolkit.baselines.anomaly import AnomalyDetector

    det = AnomalyDetector(split.X_train.shape[1], seed=seed, device="cpu")
    return det.fit(split.X_train, n_epochs=n_epochs, verbose=False).score(split.X_test)


def _seed_recipe(split: NoveltySplit, seed: int, n_epochs: int) -> np.ndarray:
    """The seed's AnomalyDetector as written: StandardScaler, Autoencoder(d, 8, [256, 128]), 50 epochs of batch
    256 at lr 1e-3, score = mean squared reconstruction error."""
    import torch
    from sklearn.preprocessing import StandardScaler

    from sae_toolkit.baselines.anomaly import reconstruction_error
    from sae_toolkit.baselines.autoencoders import Autoencoder
    from sae_toolkit.baselines.training import train_autoencoder

    scaler = StandardScaler().fit(split.X_train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Autoencoder(split.X_train.shape[1], 8, [256, 128])
        train_autoencoder(model, scaler.transform(split.X_train), n_epochs=50, batch_size=256, lr=1e-3,
                          early_stopping=None, seed=seed, verbose=False)
    return reconstruction_error(model, scaler.transform(split.X_test))


def _sklearn(kind: str) -> Callable[[NoveltySplit, int, int], np.ndarray]:
    def run(split: NoveltySplit, seed: int, n_epochs: int) -> np.ndarray:
        from sklearn.ensemble import IsolationForest
        from sklearn.neighbors import LocalOutlierFactor
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import OneClassSVM

        if kind == "isolation_forest":  # tree splits are scale-free: raw features
            return -IsolationForest(random_state=seed).fit(split.X_train).score_samples(split.X_test)
        scaler = StandardScaler().fit(split.X_train)
        Xtr, Xte = scaler.transform(split.X_train), scaler.transform(split.X_test)
        model = LocalOutlierFactor(novelty=True) if kind == "local_outlier_factor" else OneClassSVM(gamma="scale")
        return -model.fit(Xtr).score_samples(Xte)

    return run


_RUNNERS: dict[str, Callable[[NoveltySplit, int, int], np.ndarray]] = {
    "autoencoder": _ours,
    "seed_autoencoder": _seed_recipe,
    **{k: _sklearn(k) for k in ("isolation_forest", "local_outlier_factor", "one_class_svm")},
}


def compare_detectors(split: NoveltySplit, seed: int = 0, detectors: Sequence[str] = DETECTORS,
                      n_epochs: int = 100) -> list[dict]:
    """Fit every detector on ``split.X_train`` (normal rows only) and score ``split.X_test``.

    sklearn detectors use their defaults (LOF with ``novelty=True``; LOF and OC-SVM on standardized features).
    Returns one dict per detector: detector, seed, auc_roc, auc_pr, seconds.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    unknown = [d for d in detectors if d not in _RUNNERS]
    if unknown:
        raise SAEToolkitError(f"unknown detector(s) {unknown}; choose from {list(DETECTORS)}")
    rows = []
    for name in detectors:
        t0 = time.perf_counter()
        scores = _RUNNERS[name](split, seed, n_epochs)
        rows.append({
            "detector": name, "seed": seed, "auc_roc": float(roc_auc_score(split.y_test, scores)),
            "auc_pr": float(average_precision_score(split.y_test, scores)), "seconds": time.perf_counter() - t0,
        })
    return rows


def dataset_split(name: str, seed: int, n_transactions: int = 20_000) -> NoveltySplit:
    """The benchmark's splits. ``breast_cancer``: 250 random benign rows train, the other 107 benign + 212
    malignant test. ``synthetic_fraud``: ``make_transactions(n_transactions, seed=seed)``,
    4000 normal rows train (half the normals if there are fewer than 8000), the rest (≈0.17 % fraud) test."""
    if name == "breast_cancer":
        X, y = breast_cancer_data()
        return novelty_split(X, y, 250, seed)
    if name == "synthetic_fraud":
        X, y, _ = credit_card_features(make_transactions(n_transactions, seed=seed))
        return novelty_split(X, y, min(4000, int((y == 0).sum()) // 2), seed)
    raise SAEToolkitError(f"unknown dataset {name!r}; use 'breast_cancer' or 'synthetic_fraud'")


def run_comparison(datasets: Sequence[str] = ("breast_cancer", "synthetic_fraud"), seeds: Sequence[int] = (0, 1, 2),
                   detectors: Sequence[str] = DETECTORS, n_transactions: int = 20_000, n_epochs: int = 100,
                   progress: bool = True) -> pd.DataFrame:
    """``compare_detectors`` on every dataset × seed; one row per (dataset, seed, detector)."""
    from tqdm.auto import tqdm

    rows = []
    jobs = [(d, s) for d in datasets for s in seeds]
    for d, s in tqdm(jobs, desc="comparison", unit="split", disable=not progress):
        split = dataset_split(d, s, n_transactions)
        rows += [{"dataset": d, **r} for r in compare_detectors(split, s, detectors, n_epochs)]
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of AUC-ROC, AUC-PR and fit+score seconds per (dataset, detector)."""
    g = results.groupby(["dataset", "detector"], sort=False)
    out = g.agg(auc_roc=("auc_roc", "mean"), auc_roc_std=("auc_roc", "std"), auc_pr=("auc_pr", "mean"),
                auc_pr_std=("auc_pr", "std"), seconds=("seconds", "mean"), n_seeds=("seed", "nunique"))
    return out.reset_index()


def format_table(results: pd.DataFrame) -> str:
    """A plain-text table (mean ± std over seeds) for terminals and logs."""
    s = summarize(results)
    lines = [f"{'dataset':<16} {'detector':<22} {'AUC-ROC':>16} {'AUC-PR':>16} {'seconds':>8} seeds"]
    for r in s.itertuples():
        lines.append(
            f"{r.dataset:<16} {r.detector:<22} {r.auc_roc:>8.4f} ± {np.nan_to_num(r.auc_roc_std):.4f} "
            f"{r.auc_pr:>8.4f} ± {np.nan_to_num(r.auc_pr_std):.4f} {r.seconds:>8.2f} {r.n_seeds}"
        )
    return "\n".join(lines)
