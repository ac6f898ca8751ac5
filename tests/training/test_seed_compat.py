"""The seed tutorial's LLMSparseAutoencoder / train_llm_sae usage keeps working on top of the package."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from _trainer_helpers import one_torch_thread, toy_superposition  # noqa: F401
from torch import optim
from torch.utils.data import DataLoader, TensorDataset

import sae_toolkit.training.seed_compat
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.training.seed_compat import LLMSparseAutoencoder, train_llm_sae

SEED_KEYS = ["dead_feature_frac", "l0_per_token", "l1_loss", "loss", "recon_loss"]


def test_module_docstring_example():
    assert doctest.testmod(sae_toolkit.training.seed_compat).failed == 0


def test_seed_usage_snippet_runs(capsys):
    # The tutorial's own code, unchanged apart from sizes.
    activations, _ = toy_superposition(2048, d=32, n_true=64)
    sae = LLMSparseAutoencoder(d_model=32, n_features=128, l1_coeff=1e-3)
    history = train_llm_sae(sae, activations, n_epochs=4, batch_size=256, lr=5e-3)
    assert len(history) == 4 and sorted(history[0]) == SEED_KEYS
    assert history[-1]["recon_loss"] < history[0]["recon_loss"]
    assert "Epoch 4/4 Loss=" in capsys.readouterr().out
    x = torch.from_numpy(activations[:512])
    x_hat, z = sae(x)
    metrics = sae.loss(x, x_hat, z)
    metrics["loss"].backward()
    assert sorted(metrics) == SEED_KEYS and z.shape == (512, 128) and (z >= 0).all()
    top_idx, top_vals = sae.get_top_activating_examples(z.detach(), feature_idx=3, top_k=10)
    assert top_idx.shape == (10,) and (top_vals[:-1] >= top_vals[1:]).all()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_seed_training_loop_runs_against_the_wrapper():
    # The tutorial's loop body (its own Adam + _normalize_decoder) works on the wrapper's parameters.
    activations, _ = toy_superposition(1024, d=16, n_true=32)
    sae = LLMSparseAutoencoder(d_model=16, n_features=64)
    optimizer = optim.Adam(sae.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(torch.FloatTensor(activations)), batch_size=128, shuffle=True)
    losses = []
    for _ in range(3):
        for (batch,) in loader:
            optimizer.zero_grad()
            x_hat, z = sae(batch)
            metrics = sae.loss(batch, x_hat, z)
            metrics["loss"].backward()
            optimizer.step()
            with torch.no_grad():
                sae._normalize_decoder()
            losses.append(metrics["loss"].item())
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert sae.b_pre is sae.b_dec


def test_loss_is_the_seed_formula_and_matches_the_package_loss():
    torch.manual_seed(0)
    sae = LLMSparseAutoencoder(d_model=8, n_features=32, l1_coeff=0.3)
    x = torch.randn(64, 8)
    x_hat, z = sae(x)
    m = sae.loss(x, x_hat, z)
    assert m["recon_loss"].item() == pytest.approx(((x - x_hat) ** 2).mean().item())
    assert m["l1_loss"].item() == pytest.approx(0.3 * z.abs().mean().item())
    # The trainer's loss is the seed's objective times d_model (same minimiser).
    out = sae.sae.training_loss(x)
    assert out.loss.item() / 8 == pytest.approx(m["loss"].item(), rel=1e-5)


def test_bad_activations_are_clear_errors():
    sae = LLMSparseAutoencoder(d_model=8, n_features=16)
    with pytest.raises(SAEToolkitError, match=r"shape \(10, 9\); expected \[n_tokens, 8\]"):
        train_llm_sae(sae, np.zeros((10, 9), dtype=np.float32), verbose=False)
    bad = np.zeros((10, 8), dtype=np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(SAEToolkitError, match="NaN"):
        train_llm_sae(sae, bad, verbose=False)
