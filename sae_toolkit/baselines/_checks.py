"""Input checks shared by the baselines: arrays that are finite, 2-D and of the right width, with one-line errors."""

from __future__ import annotations

import numpy as np

from sae_toolkit.errors import SAEToolkitError


def as_matrix(X, name: str = "X", n_features: int | None = None) -> np.ndarray:
    """Return `X` as a float32 `[n, d]` array, or raise a one-line SAEToolkitError saying what is wrong.

    A pandas DataFrame is accepted (its values are used). NaN/inf rows are refused, naming the first few rows,
    because one NaN turns every loss and every score into NaN without any other sign.
    """
    if hasattr(X, "to_numpy"):
        X = X.to_numpy()
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError):
        raise SAEToolkitError(f"{name} must be numeric; got values of type {np.asarray(X).dtype}") from None
    if arr.ndim == 1 and n_features is not None and arr.shape[0] == n_features:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise SAEToolkitError(f"{name} must be 2-D [n_samples, n_features]; got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise SAEToolkitError(f"{name} has no rows; pass at least one sample")
    if n_features is not None and arr.shape[1] != n_features:
        raise SAEToolkitError(
            f"{name} has {arr.shape[1]} features but the model expects {n_features}; "
            "pass the same columns, in the same order, as at fit time"
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise SAEToolkitError(
            f"{name} has {len(rows)} row(s) with NaN or inf (rows {shown}); drop or impute them first"
        )
    return arr


def check_unit_interval(x: np.ndarray, name: str = "X") -> None:
    """BCE treats targets as probabilities: refuse data outside [0, 1] (e.g. StandardScaler output)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    if lo < 0.0 or hi > 1.0:
        raise SAEToolkitError(
            f"loss='bce' needs {name} in [0, 1] but its range is [{lo:.4g}, {hi:.4g}]; "
            "scale it to [0, 1] (e.g. MinMaxScaler) or use loss='mse'"
        )
