"""The CPU step's fast paths against their plain versions: bf16 sums (AuxK's dead block, JumpReLU's band), the
latent-major entry search of JumpReLU's fused step, the parallel flat nonzero, numpy counts and row dot products."""

import pytest
import torch
from _sae_helpers import D_SAE, grads_of, randomized

from sae_toolkit.sae import codes, jumprelu, kernels


def _float32(sae):
    return sae.to(torch.float32)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.fixture
def native_bf16(monkeypatch):
    """Run the bf16 branches whatever this CPU has (without native bf16 they are slower, never wrong)."""
    monkeypatch.setattr(kernels, "_cpu_bf16_native", lambda: True)


def _both_precisions(sae, loss_of, monkeypatch):
    out = {}
    for low in (True, False):
        monkeypatch.setattr(kernels, "LOW_PRECISION_SUMS", low)
        res = loss_of()
        out[low] = res, grads_of(sae, res.loss)
    return out


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_block_in_bf16_stays_within_its_rounding(arch, native_bf16, monkeypatch):
    """float32 AuxK: the dead block's four GEMMs in bf16 move the AuxK loss and the dead latents' gradients by
    bf16 rounding (< 1 %), the main path's not at all; float64 never takes the bf16 branch."""
    sae = _float32(randomized(arch, seed=3))
    x = torch.randn(64, sae.cfg.d_in)
    dead = torch.arange(D_SAE) % 3 == 0
    calls = []
    real_mm = kernels._block_mm
    monkeypatch.setattr(kernels, "_block_mm", lambda a, b: calls.append(kernels.bf16_ok(a)) or real_mm(a, b))
    res = _both_precisions(sae, lambda: sae.training_loss(x, dead_mask=dead), monkeypatch)
    assert calls and all(calls[: len(calls) // 2]) and not any(calls[len(calls) // 2:])  # bf16, then float32
    (lo, g_lo), (hi, g_hi) = res[True], res[False]
    assert float(hi.parts["auxk"].detach()) > 0
    assert _rel_err(lo.parts["auxk"], hi.parts["auxk"]) < 1e-2
    torch.testing.assert_close(lo.parts["mse"], hi.parts["mse"])
    for name in ("W_enc", "W_dec", "b_enc"):
        live_lo = g_lo[name][:, ~dead] if name == "W_enc" else g_lo[name][~dead]
        live_hi = g_hi[name][:, ~dead] if name == "W_enc" else g_hi[name][~dead]
        torch.testing.assert_close(live_lo, live_hi, msg=name)  # the main entries: float32 throughout
        assert _rel_err(g_lo[name], g_hi[name]) < 1e-2, name
    assert not kernels.bf16_ok(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("wide", [False, True], ids=["band_bag_sums", "band_gemm"])
def test_jumprelu_band_in_bf16_moves_only_the_threshold_gradient(wide, native_bf16, monkeypatch):
    """float32 fused JumpReLU step: the band's bag sums (or, when wide, its GEMM) in bf16 change θ's gradient by
    bf16 rounding only; every other gradient and the loss are the float32 path's."""
    sae = _float32(randomized("jumprelu", seed=9, jumprelu_bandwidth=0.6))
    with torch.no_grad():
        sae.log_threshold.add_(1.6)
    x = 2 * torch.randn(200, sae.cfg.d_in)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        at = float((pre >= sae.threshold).double().mean())
        upper = float((pre > sae.threshold - 0.3).double().mean())
    monkeypatch.setattr(jumprelu, "FUSED_MAX_DENSITY", (at + upper) / 2 if wide else 1.0)
    monkeypatch.setattr(jumprelu, "BAND_BAG_MAX_DENSITY", 0.0 if wide else 1.0)
    calls = []
    real_apply = jumprelu._TanhStep.apply
    monkeypatch.setattr(jumprelu._TanhStep, "apply", lambda *a: calls.append(a) or real_apply(*a))
    res = _both_precisions(sae, lambda: sae.training_loss(x), monkeypatch)
    assert len(calls) == 2 and calls[0][10] is wide  # the fused step, on the branch under test
    (lo, g_lo), (hi, g_hi) = res[True], res[False]
    assert torch.equal(lo.loss, hi.loss)
    for name in g_hi:
        if name == "log_threshold":
            assert g_hi[name].abs().sum() > 0 and _rel_err(g_lo[name], g_hi[name]) < 1e-2
        else:
            assert torch.equal(g_lo[name], g_hi[name]), name


@pytest.mark.parametrize("wide", [False, True], ids=["band_indices", "band_mask"])
def test_latent_major_entries_take_the_composed_graphs_band_exactly(wide, monkeypatch):
    """S = {π ≥ θ} and the closed band θ − ε/2 < π < θ come out latent-major (indices, or a mask when the band is
    wide), exactly as the composed graph's rectangle kernel 1[|π − θ| < ε/2] on π < θ, entries on both edges
    included; π on S and π − θ there."""
    torch.manual_seed(0)
    d_sae, n, eps = 9, 40, 0.5
    theta = torch.rand(d_sae, dtype=torch.float64) + 0.2
    pre_t = theta[:, None] + torch.randn(d_sae, n, dtype=torch.float64)
    pre_t[:, 0] = theta  # at θ: in S, f = 0
    pre_t[:, 1] = theta - eps / 2  # on the band's lower edge (excluded by |π − θ| < ε/2 whenever it rounds to it)
    pre_t[:, 2] = torch.nextafter(theta - eps / 2, theta)  # just inside
    want_s = (pre_t >= theta[:, None]).reshape(-1).nonzero().squeeze(1)
    want_closed = ((pre_t - theta[:, None]).abs() < eps / 2) & (pre_t < theta[:, None])
    assert want_closed[:, 2].all()
    # wide: more than FUSED_MAX_DENSITY above θ − ε/2 (the bag branch's limit), fewer at or above θ
    at_share = float((pre_t >= theta[:, None]).double().mean())
    monkeypatch.setattr(jumprelu, "FUSED_MAX_DENSITY", (at_share + float(want_closed.double().mean()) / 2) if wide
                        else 1.0)
    monkeypatch.setattr(jumprelu, "BAND_BAG_MAX_DENSITY", 0.0 if wide else 1.0)
    e = jumprelu.latent_major_entries(pre_t.clone(), theta, eps)
    assert e is not None and e.wide is wide
    assert torch.equal(e.s_flat, want_s)
    if wide:
        assert e.closed_flat is None and torch.equal(e.closed, want_closed)
    else:
        assert e.closed is None and torch.equal(e.closed_flat, want_closed.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(e.z, pre_t.reshape(-1)[want_s])
    assert torch.equal(e.dz, (pre_t - theta[:, None]).reshape(-1)[want_s])


def test_latent_major_entries_pick_the_band_branch_by_density(monkeypatch):
    """Bag sums while the band is narrow, the band's GEMM once it is wide, None once many gates open (the rule of
    `fused_entries`, on the latent-major layout)."""
    pre_t = torch.linspace(-1, 1, 1000).repeat(4, 1)  # the share above t is (1 − t) / 2
    for theta, eps, want in ((0.9, 0.1, False), (0.9, 0.6, False), (0.9, 1.0, True), (0.5, 1.0, None)):
        got = jumprelu.latent_major_entries(pre_t.clone(), torch.full((4,), theta), eps)
        assert (got is None) if want is None else (got.wide is want)
    monkeypatch.setattr(jumprelu, "FUSED_MAX_DENSITY", -1.0)  # how the tests force the composed graph
    assert jumprelu.latent_major_entries(pre_t.clone(), torch.full((4,), 0.9), 0.1) is None


@pytest.mark.parametrize("shape,p", [((37, 53), 0.1), ((3, 1), 0.5), ((0, 5), 0.5), ((64, 64), 1.0), ((5, 7), 0.0)])
def test_parallel_flat_nonzero_matches_torch(shape, p, monkeypatch):
    """flat_nonzero's pieces in threads give torch's indices (any size, empty and full masks)."""
    monkeypatch.setattr(codes, "PARALLEL_NONZERO_MIN", 0)
    threads = torch.get_num_threads()
    try:
        for n_threads in (2, 3):
            torch.set_num_threads(n_threads)
            mask = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) < p
            got = codes.flat_nonzero(mask)
            assert got.dtype == torch.int64
            assert torch.equal(got, mask.reshape(-1).nonzero().squeeze(1))
    finally:
        torch.set_num_threads(threads)


def test_numpy_counts_match_torch():
    mask = torch.rand(31, 17, generator=torch.Generator().manual_seed(2)) < 0.3
    for m in (mask, mask.t()):  # contiguous (numpy) and not (torch)
        assert codes.count_true(m) == int(m.sum())
        assert codes.max_true_per_row(m) == int(m.sum(-1).max())
    assert codes.max_true_per_row(torch.zeros(0, 4, dtype=torch.bool)) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_dots_match_vecdot(dtype):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(23, 9, generator=g, dtype=dtype), torch.randn(23, 9, generator=g, dtype=dtype)
    torch.testing.assert_close(kernels.row_dots(a, b), torch.linalg.vecdot(a, b))
    torch.testing.assert_close(kernels.row_dots(a.t().contiguous().t(), b), torch.linalg.vecdot(a, b))
    a.requires_grad_()
    torch.testing.assert_close(kernels.row_dots(a, b), torch.linalg.vecdot(a, b))  # autograd: vecdot


@pytest.mark.parametrize("n_rows", [64, 48], ids=["power_of_two_batch", "other_batch"])
@pytest.mark.parametrize("wide", [False, True], ids=["band_indices", "band_mask"])
def test_fused_jumprelu_step_matches_composed_graph_at_any_batch(n_rows, wide, monkeypatch):
    """float64: the fused step (latent-major entries; shifts and masks for the row and latent of a flat index when
    the batch is a power of two) gives the composed graph's loss, L0 and gradients."""
    sae = randomized("jumprelu", seed=9, jumprelu_bandwidth=0.6)
    with torch.no_grad():
        sae.log_threshold.add_(1.6)
    x = 2 * torch.randn(n_rows, sae.cfg.d_in, dtype=torch.float64)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        at = float((pre >= sae.threshold).double().mean())
        upper = float((pre > sae.threshold - 0.3).double().mean())
    assert 0 < at < upper
    monkeypatch.setattr(jumprelu, "BAND_BAG_MAX_DENSITY", (at + upper) / 2 if wide else 1.0)
    calls, results = [], {}
    real_apply = jumprelu._TanhStep.apply
    monkeypatch.setattr(jumprelu._TanhStep, "apply", lambda *a: calls.append(a) or real_apply(*a))
    for fused in (True, False):
        monkeypatch.setattr(jumprelu, "FUSED_MAX_DENSITY", (at + upper) / 2 if fused else -1.0)
        out = sae.training_loss(x, sparsity_scale=0.7)
        results[fused] = out, grads_of(sae, out.loss)
    assert len(calls) == 1 and calls[0][10] is wide
    (out_f, g_f), (out_c, g_c) = results[True], results[False]
    torch.testing.assert_close(out_f.loss, out_c.loss)
    torch.testing.assert_close(out_f.l0, out_c.l0)
    assert torch.equal(out_f.fired, out_c.fired)
    for name in g_c:
        assert g_c[name].abs().sum() > 0, name
        torch.testing.assert_close(g_f[name], g_c[name], msg=name)
