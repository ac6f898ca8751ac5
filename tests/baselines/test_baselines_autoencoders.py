"""Classic autoencoders: each trains, the seed's semantics hold, the math matches references, misuse is refused."""

import numpy as np
import pytest
import torch
from _baselines_helpers import low_rank_rows, unit_rows

from sae_toolkit.baselines import (
    AEOutput,
    Autoencoder,
    ContractiveAutoencoder,
    ConvAutoencoder,
    DenoisingAutoencoder,
    SparseAutoencoder,
    VariationalAutoencoder,
    build_mnist_autoencoder,
    kl_standard_normal,
    load_digits_images,
    train_autoencoder,
    train_denoising_ae,
    train_sparse_ae,
)
from sae_toolkit.errors import SAEToolkitError

D = 12


def _variants():
    return {
        "plain": Autoencoder(D, 3, [16], dropout=0.1),
        "denoising-gaussian": DenoisingAutoencoder(D, 3, [16], noise_type="gaussian", noise_level=0.1),
        "denoising-masking": DenoisingAutoencoder(D, 3, [16], noise_type="masking", noise_level=0.2),
        "sparse-untied": SparseAutoencoder(D, 24, sparsity_weight=1e-3),
        "sparse-tied": SparseAutoencoder(D, 24, sparsity_weight=1e-3, tied_weights=True),
        "contractive-1layer": ContractiveAutoencoder(D, 4, contractive_weight=1e-3),
        "contractive-deep": ContractiveAutoencoder(D, 4, [16], contractive_weight=1e-3),
        "vae": VariationalAutoencoder(D, 3, [16], beta=0.5),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_every_variant_trains_and_its_loss_falls(name):
    torch.manual_seed(0)
    model = _variants()[name]
    X = low_rank_rows(256, D)
    h = train_autoencoder(model, X[:200], X[200:], n_epochs=15, batch_size=32, lr=3e-3, seed=0, verbose=False)
    assert h["train"][-1] < 0.8 * h["train"][0], (name, h["train"][0], h["train"][-1])
    assert min(h["val"]) < h["val"][0]
    out = model(torch.from_numpy(X[:5]))
    x_hat, z = out[0], out[1]  # every forward unpacks at least as (x_hat, z, ...)
    assert x_hat.shape == (5, D) and z.shape[0] == 5


def test_forward_is_a_namedtuple_that_unpacks_like_the_seed():
    model = Autoencoder(D, 3, [8]).eval()
    out = model(torch.zeros(4, D))
    assert isinstance(out, AEOutput)
    x_hat, z = out
    assert torch.equal(x_hat, out.x_hat) and z.shape == (4, 3)
    assert torch.allclose(out.x_hat, model.decode(model.encode(torch.zeros(4, D))))


def test_denoiser_corrupts_only_in_training_and_scores_against_the_clean_input():
    x = torch.rand(64, D)
    for kind in ("gaussian", "masking", "salt_pepper"):
        m = DenoisingAutoencoder(D, 3, [8], noise_type=kind, noise_level=0.3)
        m.train()
        assert not torch.equal(m.corrupt(x), x), kind
        m.eval()
        assert torch.equal(m.corrupt(x), x), kind
        assert torch.equal(m.encode(x), m.encoder(x))
    m = DenoisingAutoencoder(D, 3, [8], noise_type="masking", noise_level=0.5).train()
    assert ((m.corrupt(torch.ones(1000, D)) == 0).float().mean() - 0.5).abs() < 0.05
    # the loss target is the clean x: with a model that returns its (corrupted) input, loss = E[noise²] > 0
    x_hat = m.corrupt(x)
    assert m.loss(x, x_hat, x_hat)["recon"] > 0


def test_vae_kl_matches_the_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(7, 5), torch.randn(7, 5)
    ours = kl_standard_normal(mu, logvar)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(ours, torch.distributions.kl_divergence(q, p).sum(-1), atol=1e-5)
    # by hand for one scalar: KL = 0.5 (σ² + μ² − 1 − log σ²)
    assert torch.isclose(kl_standard_normal(torch.tensor([[1.0]]), torch.tensor([[0.0]])), torch.tensor([0.5]))
    vae = VariationalAutoencoder(D, 5, [8], beta=2.0)
    x = torch.randn(7, D)
    out = vae.eval()(x)
    assert torch.equal(out.z, out.mu)  # eval mode decodes the mean
    terms = vae.loss(x, *out)
    assert torch.isclose(terms["kl"], kl_standard_normal(out.mu, out.logvar).mean())
    assert torch.isclose(terms["total"], terms["recon"] + 2.0 * terms["kl"])
    assert vae.sample(3).shape == (3, D)


def test_vae_reparameterization_is_differentiable_and_random_in_training():
    vae = VariationalAutoencoder(D, 3, [8]).train()
    x = torch.randn(16, D)
    a, b = vae(x), vae(x)
    assert not torch.equal(a.z, b.z)
    vae.loss(x, *a)["total"].backward()
    assert vae.fc_logvar.weight.grad is not None and vae.fc_logvar.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("hidden", [None, [6], [6, 5]])
def test_contractive_penalty_equals_the_autograd_jacobian_norm(hidden):
    torch.manual_seed(0)
    cae = ContractiveAutoencoder(D, 4, hidden).double()
    x = torch.randn(5, D, dtype=torch.float64)
    ours = cae.jacobian_penalty(x)
    for i in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda v: cae.encode(v[None])[0], x[i])  # [latent, D]
        assert torch.isclose(ours[i], J.pow(2).sum(), rtol=1e-9), (i, ours[i], J.pow(2).sum())


def test_sparse_autoencoder_keeps_the_seed_loss_dict_and_tied_weights():
    tied = SparseAutoencoder(D, 24, tied_weights=True)
    assert not hasattr(tied, "decoder_weight")
    x = torch.randn(8, D)
    x_hat, z = tied(x)
    expected = z @ tied.encoder_weight + tied.decoder_bias
    assert torch.allclose(x_hat, expected)
    terms = tied.loss(x, x_hat, z)
    assert set(terms) == {"total", "recon", "sparsity", "l0_active", "l1_mean"}
    assert torch.isclose(terms["sparsity"], tied.sparsity_weight * z.abs().mean())
    assert (z >= 0).all()
    # the pre-encoder bias is subtracted before encoding
    with torch.no_grad():
        tied.pre_bias.fill_(1.0)
    assert torch.allclose(tied.encode(x + 1.0), tied.encode(x) * 0 + torch.relu((x) @ tied.encoder_weight.T
                                                                                + tied.encoder_bias))


def test_sparsity_weight_makes_codes_sparser():
    X = low_rank_rows(256, D)
    l0 = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        hist = train_sparse_ae(SparseAutoencoder(D, 24, sparsity_weight=w), X, n_epochs=15, batch_size=32, lr=3e-3)
        assert set(hist[-1]) == {"total", "recon", "sparsity", "l0"}
        l0[w] = hist[-1]["l0"]
    assert l0[0.5] < l0[0.0]


def test_seed_denoising_loop_returns_per_epoch_losses():
    X = low_rank_rows(128, D)
    losses = train_denoising_ae(DenoisingAutoencoder(D, 3, [16]), X, n_epochs=5, batch_size=32)
    assert len(losses) == 5 and losses[-1] < losses[0]


@pytest.mark.parametrize("size", [8, 28])
def test_conv_autoencoder_shapes_and_bce_training(size):
    model = build_mnist_autoencoder(latent_dim=6, image_size=size)
    x = torch.rand(4, 1, size, size)
    x_hat, z = model(x)
    assert x_hat.shape == x.shape and z.shape == (4, 6)
    assert (x_hat > 0).all() and (x_hat < 1).all()
    with pytest.raises(SAEToolkitError, match="expects images of shape"):
        model(torch.rand(4, size * size))


def test_conv_autoencoder_learns_digits():
    torch.manual_seed(0)
    images = load_digits_images().images[:300]
    model = ConvAutoencoder(latent_dim=8, image_size=8)
    h = train_autoencoder(model, images, n_epochs=6, batch_size=64, lr=3e-3, verbose=False)
    assert h["train"][-1] < h["train"][0]
    # flat pixels are accepted and reshaped
    h2 = train_autoencoder(model, images.reshape(300, 64), n_epochs=1, batch_size=64, verbose=False)
    assert len(h2["train"]) == 1
    with pytest.raises(SAEToolkitError, match=r"in \[0, 1\]"):
        train_autoencoder(model, images * 2 - 1, n_epochs=1, verbose=False)  # BCE by default on [-1, 1] data


def test_bce_needs_a_sigmoid_output_and_unit_interval_data():
    X01 = unit_rows(64, D)
    with pytest.raises(SAEToolkitError, match="sigmoid output"):
        train_autoencoder(Autoencoder(D, 3, [8]), X01, n_epochs=1, loss="bce", verbose=False)
    with pytest.raises(SAEToolkitError, match=r"X_train in \[0, 1\] but its range"):
        train_autoencoder(Autoencoder(D, 3, [8], output_activation="sigmoid"), X01 * 3 - 1, n_epochs=1,
                          loss="bce", verbose=False)
    h = train_autoencoder(Autoencoder(D, 3, [8], output_activation="sigmoid"), X01, n_epochs=3, loss="bce",
                          batch_size=32, verbose=False)
    assert np.isfinite(h["train"]).all()
    vae = VariationalAutoencoder(D, 3, [8])
    with pytest.raises(SAEToolkitError, match="sigmoid output"):
        vae.loss(torch.from_numpy(X01), *vae(torch.from_numpy(X01)), recon="bce")


def test_training_refuses_wrong_feature_count_and_nan_rows():
    X = low_rank_rows(64, D)
    with pytest.raises(SAEToolkitError, match="has 11 features but the model expects 12"):
        train_autoencoder(Autoencoder(D, 3, [8]), X[:, :11], n_epochs=1, verbose=False)
    X[[3, 7]] = np.nan
    with pytest.raises(SAEToolkitError, match=r"2 row\(s\) with NaN or inf \(rows 3, 7\)"):
        train_autoencoder(Autoencoder(D, 3, [8]), X, n_epochs=1, verbose=False)
    with pytest.raises(SAEToolkitError, match="noise_type"):
        DenoisingAutoencoder(D, 3, noise_type="pink")


def test_early_stopping_restores_the_best_weights_and_lr_drops_on_plateau():
    torch.manual_seed(0)
    X = low_rank_rows(96, D)
    model = Autoencoder(D, 3, [32])
    h = train_autoencoder(model, X[:32], X[32:], n_epochs=300, batch_size=16, lr=1e-2, early_stopping=5,
                          lr_patience=2, verbose=False)
    assert h["stopped_early"] and len(h["train"]) < 300
    best = h["best_epoch"]
    assert h["val"][best] == min(h["val"])
    from sae_toolkit.baselines.training import evaluate_loss

    assert np.isclose(evaluate_loss(model, torch.from_numpy(X[32:]))["total"], h["val"][best], rtol=1e-4)
    assert min(h["lr"]) < h["lr"][0]


def test_training_leaves_the_thread_count_as_found():
    before = torch.get_num_threads()
    train_autoencoder(Autoencoder(D, 3, [8]), low_rank_rows(64, D), n_epochs=1, verbose=False)
    assert torch.get_num_threads() == before


def test_seed_mnist_example_runs_offline_on_digits(tmp_path):
    from sae_toolkit.baselines import plot_reconstructions, train_mnist_ae

    torch.manual_seed(0)
    model, losses = train_mnist_ae(n_epochs=2, batch_size=256, device="cpu", verbose=False)
    assert isinstance(model, ConvAutoencoder) and model.image_size == 8
    assert len(losses) == 2 and losses[1] < losses[0]
    fig = plot_reconstructions(model, load_digits_images().images, n=4, path=tmp_path / "recon.png")
    assert len(fig.axes) == 12 and (tmp_path / "recon.png").stat().st_size > 1000
