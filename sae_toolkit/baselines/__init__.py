"""Classic autoencoders and the autoencoder anomaly/fraud detector of the seed tutorial, as tested baselines.

Independent of the SAE spine (``sae_toolkit.sae``); needs the ``baselines`` extra (scikit-learn, matplotlib).

>>> import numpy as np
>>> from sae_toolkit.baselines import Autoencoder, train_autoencoder
>>> X = np.random.default_rng(0).normal(size=(64, 10)).astype("float32")
>>> model = Autoencoder(10, 3, hidden_dims=[16])
>>> history = train_autoencoder(model, X, n_epochs=2, batch_size=32, verbose=False)
>>> x_hat, z = model(torch.from_numpy(X))
>>> tuple(x_hat.shape), tuple(z.shape)
((64, 10), (64, 3))
"""

import torch  # noqa: F401  (the doctest above uses it)

from sae_toolkit.baselines.anomaly import (
    AnomalyDetector,
    Calibration,
    DetectionReport,
    DetectorConfig,
    reconstruction_error,
)
from sae_toolkit.baselines.autoencoders import AEOutput, Autoencoder, ContractiveAutoencoder, DenoisingAutoencoder
from sae_toolkit.baselines.comparison import compare_detectors, format_table, run_comparison, summarize
from sae_toolkit.baselines.conv import ConvAutoencoder, build_mnist_autoencoder
from sae_toolkit.baselines.data import (
    breast_cancer_data,
    credit_card_features,
    load_credit_card_csv,
    load_digits_images,
    load_mnist,
    make_transactions,
    novelty_split,
)
from sae_toolkit.baselines.ensemble import StackedAutoencoder
from sae_toolkit.baselines.losses import kl_standard_normal, reconstruction_loss
from sae_toolkit.baselines.plots import plot_reconstructions, plot_scores_roc
from sae_toolkit.baselines.semisupervised import compare_latent_vs_raw, latent_features, sample_labels
from sae_toolkit.baselines.sparse import SparseAutoencoder
from sae_toolkit.baselines.training import train_autoencoder, train_denoising_ae, train_mnist_ae, train_sparse_ae
from sae_toolkit.baselines.variational import VAEOutput, VariationalAutoencoder

__all__ = [
    "AEOutput", "AnomalyDetector", "Autoencoder", "Calibration", "ContractiveAutoencoder", "ConvAutoencoder",
    "DenoisingAutoencoder", "DetectionReport", "DetectorConfig", "SparseAutoencoder", "StackedAutoencoder",
    "VAEOutput", "VariationalAutoencoder", "breast_cancer_data", "build_mnist_autoencoder", "compare_detectors",
    "compare_latent_vs_raw", "credit_card_features", "format_table", "kl_standard_normal", "latent_features",
    "load_credit_card_csv", "load_digits_images", "load_mnist", "make_transactions", "novelty_split",
    "plot_reconstructions", "plot_scores_roc", "reconstruction_error", "reconstruction_loss", "run_comparison",
    "sample_labels", "summarize", "train_autoencoder", "train_denoising_ae", "train_mnist_ae", "train_sparse_ae",
]
