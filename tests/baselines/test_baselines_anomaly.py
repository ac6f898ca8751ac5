"""The anomaly detector: honest threshold, calibration, evaluation, save/load, errors; comparison and few labels."""

import json

import numpy as np
import pytest
import torch
from _baselines_helpers import low_rank_rows

from sae_toolkit.baselines import (
    AnomalyDetector,
    Autoencoder,
    compare_detectors,
    compare_latent_vs_raw,
    format_table,
    latent_features,
    reconstruction_error,
    sample_labels,
    train_autoencoder,
)
from sae_toolkit.baselines.anomaly import _best_f1_threshold
from sae_toolkit.baselines.data import breast_cancer_data, novelty_split
from sae_toolkit.errors import SAEToolkitError

D = 12


@pytest.fixture(scope="module")
def fitted():
    """A detector fitted on low-rank normal rows; anomalies leave the subspace."""
    normal = low_rank_rows(600, D, seed=0)
    det = AnomalyDetector(D, 3, [16], threshold_percentile=95.0, n_models=3, seed=0, device="cpu")
    det.fit(normal, n_epochs=25, verbose=False)
    rng = np.random.default_rng(1)
    anomalies = (low_rank_rows(60, D, seed=2) + rng.normal(scale=1.5, size=(60, D))).astype(np.float32)
    return det, low_rank_rows(400, D, seed=3), anomalies


def test_threshold_is_the_percentile_of_held_out_normal_scores(fitted):
    det, fresh_normal, _ = fitted
    assert len(det.holdout_scores_) == 120  # val_fraction 0.2 of 600, never trained on
    assert det.threshold_ == pytest.approx(np.percentile(det.holdout_scores_, 95.0))
    assert (det.holdout_scores_ > det.threshold_).mean() == pytest.approx(0.05, abs=0.01)
    # on new normal rows the false-alarm rate is near 100 − percentile (training-error thresholds overshoot it)
    assert 0.0 < det.predict(fresh_normal).mean() < 0.15


def test_scores_separate_anomalies_and_predict_uses_the_threshold(fitted):
    det, normal, anomalies = fitted
    X = np.r_[normal, anomalies]
    s = det.score(X)
    assert s.shape == (len(X),)
    np.testing.assert_array_equal(det.predict(X), s > det.threshold_)
    rep = det.evaluate(X, np.r_[np.zeros(len(normal)), np.ones(len(anomalies))])
    assert rep.auc_roc > 0.95 and rep.auc_pr > 0.8
    assert rep.detection_rate > 0.8 and rep.false_alarm_rate < 0.15
    assert det.latent(X[:4]).shape == (4, 3 * 3)


def test_calibration_best_f1_and_target_fpr(fitted):
    det, normal, anomalies = fitted
    X = np.r_[normal[:200], anomalies[:10]]
    y = np.r_[np.zeros(200), np.ones(10)]
    cal = det.calibrate_threshold(X, y, method="f1")
    s = det.score(X)
    # brute force over every cut between sorted scores: nobody beats the chosen F1
    cuts = np.r_[np.sort(s) - 1e-9, s.max() + 1]
    best = max(2 * ((s > t) & (y == 1)).sum() / ((s > t).sum() + y.sum()) for t in cuts)
    assert cal.f1 == pytest.approx(best)
    assert det.threshold_ == cal.threshold
    cal = det.calibrate_threshold(X, y, method="fpr", target_fpr=0.02)
    pooled = np.r_[s[y == 0], det.holdout_scores_]
    assert (pooled > cal.threshold).mean() <= 0.02
    assert (pooled >= cal.threshold).mean() > 0.02 - 1 / len(pooled)  # the lowest such threshold
    with pytest.raises(SAEToolkitError, match="at least one labelled anomaly"):
        det.calibrate_threshold(normal[:20], np.zeros(20), method="f1")


def test_best_f1_threshold_on_a_hand_example():
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 1])
    assert _best_f1_threshold(s, y) == pytest.approx(0.55)
    ties = np.array([0.5, 0.5, 0.5, 0.1])
    t = _best_f1_threshold(ties, np.array([1, 0, 1, 0]))
    assert 0.1 < t < 0.5  # the tied scores cannot be split


def test_save_load_round_trip_without_pickle(fitted, tmp_path):
    det, normal, anomalies = fitted
    X = np.r_[normal[:50], anomalies[:10]]
    det.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["detector.json", "detector.safetensors"]
    meta = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert meta["config"]["n_models"] == 3 and meta["threshold"] == det.threshold_
    again = AnomalyDetector.load(tmp_path / "det", device="cpu")
    np.testing.assert_allclose(again.score(X), det.score(X), rtol=1e-6)
    np.testing.assert_array_equal(again.predict(X), det.predict(X))
    with pytest.raises(SAEToolkitError, match="holds no saved detector"):
        AnomalyDetector.load(tmp_path)


def test_clear_errors_for_bad_input(fitted):
    det, normal, _ = fitted
    with pytest.raises(SAEToolkitError, match="X has 11 features but the model expects 12"):
        det.score(normal[:, :11])
    bad = normal[:10].copy()
    bad[4, 2] = np.nan
    with pytest.raises(SAEToolkitError, match=r"1 row\(s\) with NaN or inf \(rows 4\)"):
        det.predict(bad)
    with pytest.raises(SAEToolkitError, match="not fitted"):
        AnomalyDetector(D).score(normal)
    with pytest.raises(SAEToolkitError, match="threshold_percentile=150"):
        AnomalyDetector(D, threshold_percentile=150)
    with pytest.raises(SAEToolkitError, match="X_normal has 8 rows"):
        AnomalyDetector(D).fit(normal[:8], verbose=False)
    with pytest.raises(SAEToolkitError, match="X_normal has 12 features but the model expects 30"):
        AnomalyDetector(30).fit(normal, verbose=False)


def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    X = low_rank_rows(200, D)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = AnomalyDetector(D, 3, [8], n_models=2, seed=5, device="cpu").fit(X, n_epochs=3, verbose=False)
    assert torch.equal(torch.rand(1), expected_next)
    b = AnomalyDetector(D, 3, [8], n_models=2, seed=5, device="cpu").fit(X, n_epochs=3, verbose=False)
    np.testing.assert_allclose(a.score(X[:20]), b.score(X[:20]), rtol=1e-6)


def test_the_seed_example_runs_against_the_package(capsys):
    """The seed's usage, names and arguments unchanged (tiny sizes)."""
    rng = np.random.default_rng(0)
    X_normal = low_rank_rows(300, D)
    X_anomaly = (low_rank_rows(30, D, seed=4) + rng.normal(scale=2.0, size=(30, D))).astype(np.float32)
    model = Autoencoder(input_dim=D, latent_dim=3, hidden_dims=[16], dropout=0.1)
    history = train_autoencoder(model, X_normal[:240], X_normal[240:], n_epochs=3, batch_size=64, lr=1e-3)
    assert len(history["train"]) == len(history["val"]) == 3
    errors = reconstruction_error(model, X_normal[:10])
    assert errors.shape == (10,) and (errors > 0).all()
    detector = AnomalyDetector(D, 3, [16], 99.0)
    detector.fit(X_normal, n_epochs=5, batch_size=64, lr=1e-3)
    assert "threshold (99.0th percentile" in capsys.readouterr().out
    auc = detector.evaluate_roc(X_normal[:50], X_anomaly)
    out = capsys.readouterr().out
    assert f"AUC-ROC: {auc:.4f}" in out and "Detection rate:" in out and "False alarm rate:" in out
    assert detector.predict(X_anomaly).dtype == bool


def test_evaluate_writes_the_roc_figure(fitted, tmp_path):
    det, normal, anomalies = fitted
    png = tmp_path / "roc.png"
    det.evaluate(np.r_[normal[:50], anomalies], np.r_[np.zeros(50), np.ones(len(anomalies))], plot_path=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_uses_identical_splits_and_formats_a_table():
    X, y = breast_cancer_data()
    split = novelty_split(X, y, 250, seed=0)
    assert (split.y_test == 0).sum() == 357 - 250 and (split.y_test == 1).sum() == 212
    rows = compare_detectors(split, 0, ["isolation_forest", "local_outlier_factor", "one_class_svm"])
    assert [r["detector"] for r in rows] == ["isolation_forest", "local_outlier_factor", "one_class_svm"]
    assert all(0.9 < r["auc_roc"] <= 1.0 and 0.9 < r["auc_pr"] <= 1.0 for r in rows)
    import pandas as pd

    table = format_table(pd.DataFrame([{"dataset": "breast_cancer", **r} for r in rows]))
    assert "isolation_forest" in table and "AUC-PR" in table
    with pytest.raises(SAEToolkitError, match="unknown detector"):
        compare_detectors(split, 0, ["kmeans"])


def test_detector_beats_chance_on_breast_cancer_quickly():
    X, y = breast_cancer_data()
    split = novelty_split(X, y, 250, seed=1)
    rows = compare_detectors(split, 1, ["autoencoder"], n_epochs=30)
    assert rows[0]["auc_roc"] > 0.9


def test_semi_supervised_latent_vs_raw(fitted):
    det, normal, anomalies = fitted
    X = np.r_[normal, anomalies]
    y = np.r_[np.zeros(len(normal)), np.ones(len(anomalies))]
    idx = sample_labels(y, 10, 100, seed=0)
    assert y[idx].sum() == 10 and len(idx) == 110
    rest = np.setdiff1d(np.arange(len(y)), idx)
    for clf in ("logistic", "gradient_boosting"):
        r = compare_latent_vs_raw(det, X[idx], y[idx], X[rest], y[rest], clf, add_score=True)
        assert r.n_labeled == 110 and r.n_labeled_positive == 10
        assert 0.5 < r.auc_roc_latent <= 1 and 0.5 < r.auc_roc_raw <= 1
    model = Autoencoder(D, 3, [8])
    assert latent_features(model, X[:5]).shape == (5, 3)
    with pytest.raises(SAEToolkitError, match="asked for 100 positive"):
        sample_labels(y, 100, 10)
