"""The fraud demo end to end, offline: synthetic transactions → detector → calibrated threshold → ROC → comparison."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from sae_toolkit.baselines.anomaly import AnomalyDetector, Calibration, DetectionReport
from sae_toolkit.baselines.comparison import run_comparison
from sae_toolkit.baselines.data import credit_card_features, make_transactions
from sae_toolkit.baselines.semisupervised import SemiSupervisedResult, compare_latent_vs_raw
from sae_toolkit.errors import SAEToolkitError


class FraudDemoResult(NamedTuple):
    """Everything the demo measured."""

    at_fit: DetectionReport
    """Test-period metrics with the threshold from fit (99th percentile of held-out normal scores)."""
    calibration: Calibration
    """The best-F1 operating point found on the labelled training-period rows."""
    calibrated: DetectionReport
    """Test-period metrics at the calibrated threshold."""
    semi_supervised: list[SemiSupervisedResult]
    """Classifiers on encoder features (without, then with the anomaly score) vs raw features, few labels."""
    comparison: pd.DataFrame
    """``run_comparison`` rows for the synthetic fraud data."""
    roc_path: Path
    """The score-distribution + ROC figure (PNG)."""


def fraud_demo(out_dir: str | Path = "fraud_demo_out", n_transactions: int = 40_000, max_train_rows: int = 5000,
               n_labeled_normals: int = 1000, seeds: tuple[int, ...] = (0,), n_epochs: int = 100,
               verbose: bool = True) -> FraudDemoResult:
    """Run the seed's fraud story on synthetic transactions (no download).

    The first day of transactions is the training period: the detector fits on (at most
    ``max_train_rows``) normal rows of it, the threshold is calibrated for best F1 on its labelled frauds plus
    ``n_labeled_normals`` labelled normals, and the second day is the test period.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = make_transactions(n_transactions, seed=seeds[0])
    X, y, _ = credit_card_features(df)
    # day one is the past, day two the future (a cut inside a day would put every night-time fraud on one side)
    cut = int((df["Time"] < 86_400).sum())  # rows are in time order
    X_past, y_past, X_test, y_test = X[:cut], y[:cut], X[cut:], y[cut:]
    if y_past.sum() < 2 or y_test.sum() < 2:
        raise SAEToolkitError(
            f"{n_transactions} transactions hold {int(y_past.sum())} past and {int(y_test.sum())} future frauds; "
            "the demo needs at least 2 in each — ask for more transactions (e.g. 20000)"
        )
    rng = np.random.default_rng(seeds[0])
    normal_past = np.flatnonzero(y_past == 0)
    fit_rows = rng.choice(normal_past, min(max_train_rows, len(normal_past)), replace=False)

    det = AnomalyDetector(X.shape[1], seed=seeds[0]).fit(X_past[fit_rows], n_epochs=n_epochs, verbose=verbose)
    roc_path = out / "fraud_roc.png"
    at_fit = det.evaluate(X_test, y_test)
    # the few labels: every known fraud of the past period and a sample of its normals not used for fitting
    spare = np.setdiff1d(normal_past, fit_rows)
    lab = np.r_[np.flatnonzero(y_past == 1), rng.choice(spare, min(n_labeled_normals, len(spare)), replace=False)]
    calibration = det.calibrate_threshold(X_past[lab], y_past[lab], method="f1")
    calibrated = det.evaluate(X_test, y_test, plot_path=roc_path)
    semi = [compare_latent_vs_raw(det, X_past[lab], y_past[lab], X_test, y_test, c, seed=seeds[0], add_score=a)
            for c in ("logistic", "gradient_boosting") for a in (False, True)]
    comparison = run_comparison(("synthetic_fraud",), seeds, n_transactions=n_transactions // 2, n_epochs=n_epochs,
                                progress=verbose)
    return FraudDemoResult(at_fit, calibration, calibrated, semi, comparison, roc_path)
