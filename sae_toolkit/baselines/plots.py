"""Matplotlib figures of the baselines (score distributions, ROC, reconstructions); returned, never shown."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import sys

    import matplotlib

    # library code renders off-screen (no display on servers or CI; plt.show() would block scripts), except in a
    # Jupyter kernel, whose inline backend is how a notebook shows the returned figure
    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores_roc(normal_scores: np.ndarray, anomaly_scores: np.ndarray, threshold: float | None = None,
                    score_name: str = "anomaly score", path: str | Path | None = None):
    """Two panels: score histograms of normal vs anomalous rows (with the threshold) and the ROC curve.

    normal_scores [n_normal], anomaly_scores [n_anomaly]. Saves a PNG when ``path`` is given; returns the Figure.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    y = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomaly_scores))]
    s = np.r_[normal_scores, anomaly_scores]
    auc = roc_auc_score(y, s)
    fpr, tpr, _ = roc_curve(y, s)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = np.histogram_bin_edges(s, bins=60)
    axes[0].hist(normal_scores, bins=bins, alpha=0.6, color="#3b82f6", density=True,
                 label=f"normal (n={len(normal_scores)})")
    axes[0].hist(anomaly_scores, bins=bins, alpha=0.6, color="#ef4444", density=True,
                 label=f"anomaly (n={len(anomaly_scores)})")
    if threshold is not None:
        axes[0].axvline(threshold, color="#1e293b", linestyle="--", linewidth=2, label=f"threshold={threshold:.4g}")
    axes[0].set(xlabel=score_name, ylabel="density", title=f"Score distribution — AUC-ROC={auc:.4f}")
    axes[0].legend()
    axes[1].plot(fpr, tpr, color="#7c3aed", linewidth=2, label=f"AUC={auc:.4f}")
    axes[1].plot([0, 1], [0, 1], "k--", linewidth=1, alpha=0.5)
    axes[1].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_reconstructions(model, images: np.ndarray, n: int = 10, path: str | Path | None = None):
    """Original, reconstruction and |residual| of the first n images (the seed's MNIST figure).

    model: a ConvAutoencoder; images float [N, 1, S, S] in [0, 1]. Saves a PNG when ``path`` is given.
    """
    import torch

    plt = _pyplot()
    model.eval()
    x = torch.as_tensor(np.asarray(images[:n], dtype=np.float32), device=next(model.parameters()).device)
    with torch.no_grad():
        x_hat = model(x).x_hat
    x, x_hat = x.cpu().numpy(), x_hat.cpu().numpy()
    fig, axes = plt.subplots(3, len(x), figsize=(2 * len(x), 6), squeeze=False)
    for i in range(len(x)):
        for row, (img, cmap, vmax) in enumerate(
            [(x[i, 0], "gray", 1), (x_hat[i, 0], "gray", 1), (np.abs(x[i, 0] - x_hat[i, 0]), "hot", 0.5)]
        ):
            axes[row, i].imshow(img, cmap=cmap, vmin=0, vmax=vmax)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
    for row, label in enumerate(["original", "reconstructed", "residual"]):
        axes[row, 0].set_ylabel(label)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
