"""Semi-supervised use of an autoencoder: its latent code as features for a classifier trained on a few labels."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from sae_toolkit.baselines._checks import as_matrix
from sae_toolkit.errors import SAEToolkitError

Classifier = Literal["logistic", "gradient_boosting"]


class SemiSupervisedResult(NamedTuple):
    """The same classifier on latent features vs on raw features, scored on the same test rows."""

    classifier: str
    """``logistic`` or ``gradient_boosting``."""
    n_labeled: int
    """Labelled training rows the classifiers saw."""
    n_labeled_positive: int
    """Of which anomalies (y = 1)."""
    auc_roc_latent: float
    """Test AUC-ROC of the classifier on encoder features (plus the anomaly score with ``add_score``)."""
    auc_roc_raw: float
    """Test AUC-ROC of the classifier on the raw features."""
    auc_pr_latent: float
    """Test average precision on encoder features."""
    auc_pr_raw: float
    """Test average precision on the raw features."""


def latent_features(encoder, X) -> np.ndarray:
    """Encoder features [n, k]: ``AnomalyDetector.latent`` (which applies its scaler) or ``model.encode`` of any
    baseline autoencoder (X as the model takes it; a stacked model's members are concatenated)."""
    if hasattr(encoder, "latent") and hasattr(encoder, "threshold_"):
        return encoder.latent(X)
    if not hasattr(encoder, "encode"):
        raise SAEToolkitError(f"{type(encoder).__name__} has no encode(); pass an AnomalyDetector or an autoencoder")
    import torch

    from sae_toolkit.baselines.training import as_model_input

    encoder.eval()
    x = as_model_input(encoder, X).to(next(encoder.parameters()).device)
    with torch.no_grad():
        z = encoder.encode(x)
    if z.dim() == 3:  # [n_models, n, latent] → [n, n_models · latent]
        z = z.transpose(0, 1).flatten(1)
    return z.cpu().numpy()


def sample_labels(y, n_positive: int, n_negative: int, seed: int = 0) -> np.ndarray:
    """Indices of a small labelled set: n_positive random rows with y = 1 and n_negative with y = 0."""
    y = np.asarray(y).ravel()
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if n_positive > len(pos) or n_negative > len(neg) or n_positive < 1 or n_negative < 1:
        raise SAEToolkitError(
            f"asked for {n_positive} positive and {n_negative} negative labels; have {len(pos)} and {len(neg)}"
        )
    rng = np.random.default_rng(seed)
    return np.r_[rng.choice(pos, n_positive, replace=False), rng.choice(neg, n_negative, replace=False)]


def _classifier(kind: Classifier, seed: int):
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        # balanced weights: with a handful of positives an unweighted fit barely moves off the majority class
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    if kind == "gradient_boosting":
        return GradientBoostingClassifier(n_estimators=100, max_depth=2, random_state=seed)
    raise SAEToolkitError(f"classifier={kind!r}; use 'logistic' or 'gradient_boosting'")


def compare_latent_vs_raw(encoder, X_labeled, y_labeled, X_test, y_test, classifier: Classifier = "logistic",
                          seed: int = 0, add_score: bool = False) -> SemiSupervisedResult:
    """Train ``classifier`` on (encoder features of X_labeled, y_labeled) and on (X_labeled, y_labeled); report
    both on the test rows. The encoder should have been fitted on unlabelled (normal) rows only.

    ``add_score`` (AnomalyDetector only) appends the anomaly score as one more feature: a bottleneck trained on
    normal rows maps off-manifold anomalies back onto the manifold, so the code alone can miss exactly what the
    reconstruction error sees (measured in the README).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    Xl, Xt = as_matrix(X_labeled, "X_labeled"), as_matrix(X_test, "X_test")
    yl, yt = np.asarray(y_labeled).astype(int).ravel(), np.asarray(y_test).astype(int).ravel()
    if len(np.unique(yl)) != 2 or len(np.unique(yt)) != 2:
        raise SAEToolkitError("y_labeled and y_test must each contain both classes (0 = normal, 1 = anomaly)")
    if len(yl) != len(Xl) or len(yt) != len(Xt):
        raise SAEToolkitError(f"labels/rows mismatch: {len(yl)} labels for {len(Xl)} rows, {len(yt)} for {len(Xt)}")
    Al, At = latent_features(encoder, Xl), latent_features(encoder, Xt)
    if add_score:
        if not hasattr(encoder, "score"):
            raise SAEToolkitError("add_score=True needs an AnomalyDetector as the encoder")
        Al, At = np.c_[Al, encoder.score(Xl)], np.c_[At, encoder.score(Xt)]
    result = {}
    for name, (A, B) in {"latent": (Al, At), "raw": (Xl, Xt)}.items():
        p = _classifier(classifier, seed).fit(A, yl).predict_proba(B)[:, 1]
        result[name] = (float(roc_auc_score(yt, p)), float(average_precision_score(yt, p)))
    return SemiSupervisedResult(classifier, len(yl), int(yl.sum()), result["latent"][0], result["raw"][0],
                                result["latent"][1], result["raw"][1])
