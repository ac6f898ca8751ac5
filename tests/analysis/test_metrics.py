"""Every metric of DESIGN §6 against a direct computation; merging equals one pass; EV edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from sae_toolkit.analysis.metrics import ModelMetrics, ReconstructionMetrics, density_histogram, kl_div, next_token_ce
from sae_toolkit.errors import SAEToolkitError


def _data(n=300, d=12, d_sae=40, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    x_hat = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    f = torch.relu(torch.randn(n, d_sae, generator=g, dtype=torch.float64) - 1.0)
    f[:, :5] = 0.0  # five dead latents
    return x, x_hat, f


def _accumulate(x, x_hat, f, splits=(0, 7, 100, 101, 300)):
    acc = ReconstructionMetrics(x.shape[1], f.shape[1])
    for a, b in zip(splits[:-1], splits[1:]):
        acc.update(x[a:b], x_hat[a:b], f[a:b])
    return acc


def test_each_metric_matches_a_direct_computation():
    x, x_hat, f = _data()
    m = _accumulate(x, x_hat, f).compute()
    err = (x - x_hat).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum()
    fires = f > 0
    assert m["tokens"] == 300 and m["dead_fraction_tokens"] == 300
    assert m["fvu"] == pytest.approx((err / var).item(), rel=1e-12)
    assert m["explained_variance"] == pytest.approx(1 - (err / var).item(), rel=1e-12)
    assert m["mse"] == pytest.approx(F.mse_loss(x_hat, x).item(), rel=1e-12)
    assert m["cosine_sim"] == pytest.approx(F.cosine_similarity(x, x_hat, dim=-1).mean().item(), rel=1e-12)
    assert m["l2_ratio"] == pytest.approx((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(), rel=1e-12)
    assert m["l2_norm_in"] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-12)
    assert m["l2_norm_out"] == pytest.approx(x_hat.norm(dim=-1).mean().item(), rel=1e-12)
    assert m["relative_reconstruction_bias"] == pytest.approx(
        (x_hat.pow(2).sum() / (x * x_hat).sum()).item(), rel=1e-12)
    assert m["l0"] == pytest.approx(fires.sum(-1).double().mean().item(), rel=1e-12)
    assert m["l1"] == pytest.approx(f.sum(-1).mean().item(), rel=1e-6)  # latents reduce in float32 per token
    assert m["dead_fraction"] == pytest.approx(5 / 40) and m["n_dead"] == 5


def test_per_latent_statistics_match_a_direct_computation():
    x, x_hat, f = _data()
    acc = _accumulate(x, x_hat, f)
    fires = f > 0
    torch.testing.assert_close(acc.density, fires.double().mean(0))
    torch.testing.assert_close(acc.act_max, f.amax(0).float())
    mean_when_firing = torch.where(fires.any(0), f.sum(0) / fires.sum(0).clamp_min(1), 0.0)
    torch.testing.assert_close(acc.mean_activation, mean_when_firing)
    torch.testing.assert_close(acc.l0_counts, torch.bincount(fires.sum(-1), minlength=41))


def test_merge_equals_one_pass():
    x, x_hat, f = _data(offset=50.0)
    whole = _accumulate(x, x_hat, f, splits=(0, 300)).compute()
    a = _accumulate(x[:123], x_hat[:123], f[:123], splits=(0, 123))
    b = _accumulate(x[123:], x_hat[123:], f[123:], splits=(0, 177))
    merged = a.merge(b)
    assert a.n == 123 and b.n == 177  # merge() leaves its inputs alone
    for key, v in merged.compute().items():
        assert v == pytest.approx(whole[key], rel=1e-10), key


def test_mean_predictor_gives_zero_explained_variance_even_far_from_the_origin():
    # A large offset is where the variance-about-zero formula of SAELens/SAEBench goes wrong (EV ≈ 1 here).
    x, _, f = _data(offset=1000.0)
    x_hat = x.mean(0).expand_as(x)
    m = _accumulate(x, x_hat, f).compute()
    assert abs(m["explained_variance"]) < 1e-9
    wrong = 1 - (x - x_hat).pow(2).sum() / x.pow(2).sum()
    assert wrong > 0.99  # the buggy formula would have reported a near-perfect SAE


def test_perfect_reconstruction_gives_one():
    x, _, f = _data()
    m = _accumulate(x, x, f).compute()
    assert m["explained_variance"] == 1.0 and m["fvu"] == 0.0 and m["mse"] == 0.0
    assert m["cosine_sim"] == pytest.approx(1.0) and m["l2_ratio"] == pytest.approx(1.0)


def test_float32_input_accumulates_in_float64():
    x, x_hat, f = _data(n=300, offset=300.0)
    m32 = _accumulate(x.float(), x_hat.float(), f.float()).compute()
    m64 = _accumulate(x.float().double(), x_hat.float().double(), f.float().double()).compute()
    assert m32["fvu"] == pytest.approx(m64["fvu"], rel=1e-9)


def test_empty_accumulator_and_bad_shapes():
    acc = ReconstructionMetrics(4, 8)
    acc.update(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 8))
    assert acc.n == 0 and math.isnan(acc.compute()["fvu"])
    with pytest.raises(SAEToolkitError, match="shapes disagree"):
        acc.update(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, 8))
    with pytest.raises(SAEToolkitError, match="cannot merge"):
        acc.merge_(ReconstructionMetrics(4, 9))


def test_density_histogram_counts_every_latent_and_puts_dead_ones_at_minus_ten():
    density = torch.tensor([0.0, 0.0, 1e-3, 1e-2, 0.5, 1.0])
    counts, edges = density_histogram(density, bins=10)
    assert sum(counts) == 6 and len(edges) == 11
    assert edges[0] == -10.0 and edges[-1] == 0.0
    assert counts[0] == 2 and counts[-1] == 2


def test_next_token_ce_and_kl_match_torch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    ce = next_token_ce(logits, ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none").view(2, 5)
    torch.testing.assert_close(ce, ref)
    other = torch.randn(2, 6, 11, generator=g)
    ref_kl = F.kl_div(torch.log_softmax(other, -1), torch.log_softmax(logits, -1), log_target=True,
                      reduction="none").sum(-1)
    torch.testing.assert_close(kl_div(logits, other), ref_kl)
    assert kl_div(logits, logits).abs().max() < 1e-6


def test_model_metrics_scores():
    g = torch.Generator().manual_seed(2)
    clean, zero = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    ids = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 0] = False
    same = ModelMetrics()
    same.update(ids, clean, clean, zero, mask)
    m = same.compute()
    assert m["model_tokens"] == 11 and m["model_seqs"] == 3
    assert m["ce_loss_recovered"] == pytest.approx(1.0) and m["delta_ce"] == pytest.approx(0.0)
    assert m["kl_sae"] == pytest.approx(0.0, abs=1e-6) and m["kl_div_score"] == pytest.approx(1.0)
    ce = next_token_ce(clean, ids)[mask].double().mean().item()
    assert m["ce_clean"] == pytest.approx(ce, rel=1e-6)
    useless = ModelMetrics()
    useless.update(ids, clean, zero, zero, mask)
    assert useless.compute()["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    half_a, half_b = ModelMetrics(), ModelMetrics()
    half_a.update(ids[:1], clean[:1], zero[:1], zero[:1], mask[:1])
    half_b.update(ids[1:], clean[1:], zero[1:], zero[1:], mask[1:])
    merged = half_a.merge_(half_b).compute()
    for key, v in useless.compute().items():
        assert merged[key] == pytest.approx(v, rel=1e-9, abs=1e-9), key
