"""SAE architectures: invariants, losses against their formulas, decoder-norm upkeep, save/load, folding, errors."""

import json
import math

import pytest
import torch
from _sae_helpers import D_IN, D_SAE, K, batch_topk_dense, cfg_for, grads_of, mse, pre_acts_ref, randomized

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import ARCHS, SAE, SAEConfig, SAEOutput, TrainOutput, gated, load_sae, make_sae
from sae_toolkit.sae.base import geometric_median

ALL = [*ARCHS, "relu-april"]


def _make(arch: str, seed: int = 0) -> SAE:
    if arch == "relu-april":
        return randomized("relu", seed, decoder_norm_penalty=True)
    return randomized(arch, seed)


def _trained_a_little(arch: str) -> SAE:
    """Randomised SAE after a few Adam steps in train mode (BatchTopK then has its threshold)."""
    sae = _make(arch)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        out = sae.training_loss(torch.randn(32, D_IN, dtype=torch.float64))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return sae.eval()


@pytest.mark.parametrize("arch", ALL)
def test_forward_equals_decode_encode(arch):
    sae = _trained_a_little(arch)
    x = torch.randn(2, 3, D_IN, dtype=torch.float64)  # leading dims [batch, seq]
    out = sae(x)
    assert isinstance(out, SAEOutput)
    assert out.x_hat.shape == (2, 3, D_IN) and out.feature_acts.shape == (2, 3, D_SAE)
    f = sae.encode(x)
    assert torch.equal(out.feature_acts, f)
    assert torch.equal(out.x_hat, sae.decode(f))
    assert (f >= 0).all()


@pytest.mark.parametrize("arch", ALL)
def test_training_loss_contract(arch):
    sae = _make(arch)
    x = torch.randn(16, D_IN, dtype=torch.float64)
    out = sae.training_loss(x, dead_mask=torch.ones(D_SAE, dtype=torch.bool))
    assert isinstance(out, TrainOutput)
    assert out.loss.ndim == 0 and out.x_hat.shape == x.shape
    assert out.fired.dtype == torch.bool and out.fired.shape == (D_SAE,)
    torch.testing.assert_close(out.loss, sum(out.parts.values()))
    assert float(out.parts["mse"].detach()) == pytest.approx(float(mse(x, out.x_hat).detach()))
    if arch not in ("batchtopk", "matryoshka"):  # batch-level selection in training, not the per-token encode
        with torch.no_grad():
            f = sae.encode(x)
        torch.testing.assert_close(out.x_hat.detach(), sae.decode(f).detach())
        assert out.l0 == pytest.approx(float((f > 0).sum(-1).double().mean()))
        assert torch.equal(out.fired, (f > 0).any(0))
    out.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())


def test_relu_loss_formulas():
    for arch in ("relu", "relu-april"):
        sae = _make(arch)
        x = torch.randn(16, D_IN, dtype=torch.float64)
        f = (pre_acts_ref(sae, x)).relu()
        weights = sae.W_dec.norm(dim=-1) if arch == "relu-april" else torch.ones(D_SAE, dtype=torch.float64)
        out = sae.training_loss(x, sparsity_scale=0.5)
        want = 0.5 * sae.cfg.l1_coefficient * (f * weights).sum(-1).mean()
        torch.testing.assert_close(out.parts["l1"], want)
        assert sae.unit_norm_decoder == (arch == "relu")


def test_jumprelu_straight_through_gradients():
    sae = randomized("jumprelu", seed=1, jumprelu_bandwidth=0.5, jumprelu_loss="step")
    x = torch.randn(64, D_IN, dtype=torch.float64)
    out = sae.training_loss(x)
    pre = pre_acts_ref(sae, x).detach()
    theta, eps = sae.threshold.detach(), sae.cfg.jumprelu_bandwidth
    f = pre * (pre > theta)
    torch.testing.assert_close(out.parts["l0"], sae.cfg.l1_coefficient * (pre > theta).sum(-1).double().mean())
    # ∂loss/∂θ by the paper's pseudo-derivatives: JumpReLU −(θ/ε)K, Heaviside −(1/ε)K, K the rectangle
    K = ((pre - theta) / eps).abs().lt(0.5).double()
    g_f = -2 * (x - (f @ sae.W_dec + sae.b_dec)) @ sae.W_dec.T.detach() / x.shape[0]  # ∂mse/∂f
    want_theta = (g_f * -(theta / eps) * K).sum(0) + sae.cfg.l1_coefficient * (-(1 / eps) * K).sum(0) / x.shape[0]
    got = grads_of(sae, out.loss)
    torch.testing.assert_close(got["log_threshold"], want_theta * theta)  # chain rule through θ = exp(log θ)
    assert got["log_threshold"].abs().gt(0).any()
    # the L0 term sends nothing to the encoder: its gradient comes from the MSE alone
    torch.testing.assert_close(grads_of(sae, out.parts["l0"])["W_enc"], torch.zeros_like(sae.W_enc))


def test_jumprelu_tanh_loss_anthropic_2025():
    sae = randomized("jumprelu", seed=1, jumprelu_bandwidth=0.5)
    assert sae.cfg.jumprelu_loss == "tanh"
    x = torch.randn(64, D_IN, dtype=torch.float64)
    out = sae.training_loss(x, sparsity_scale=0.5)
    pre = pre_acts_ref(sae, x).detach()
    theta, c, lam = sae.threshold.detach(), sae.cfg.jumprelu_tanh_scale, sae.cfg.l1_coefficient
    f = pre * (pre > theta)
    norms = sae.W_dec.norm(dim=-1).detach()
    torch.testing.assert_close(out.parts["l0"].detach(), 0.5 * lam * torch.tanh(c * f * norms).sum(-1).mean())
    want_pre = sae.cfg.jumprelu_pre_act_coefficient * ((theta - pre).relu() * norms).sum(-1).mean()
    torch.testing.assert_close(out.parts["pre_act"].detach(), want_pre)
    # unlike the step loss, the penalty reaches the encoder (through f) and the thresholds (through the estimator)
    g = grads_of(sae, out.parts["l0"])
    assert g["W_enc"].abs().sum() > 0 and g["log_threshold"].abs().sum() > 0
    # raising λ pushes thresholds up: the penalty's gradient on log θ is never positive
    assert (g["log_threshold"] <= 0).all()
    # the pre-activation term pulls the thresholds of latents below them down, λ_P·θ·‖W_dec,i‖·#{π < θ}/batch on
    # log θ, and nothing else of the encoder: π is detached in it
    g = grads_of(sae, out.parts["pre_act"])
    below = (pre < theta).double().sum(0)
    torch.testing.assert_close(g["log_threshold"],
                               sae.cfg.jumprelu_pre_act_coefficient * theta * norms * below / x.shape[0])
    assert g["log_threshold"].abs().sum() > 0
    for name in ("W_enc", "b_enc"):
        torch.testing.assert_close(g[name], torch.zeros_like(g[name]), msg=name)


def test_gated_tanh_loss_is_the_jumprelu_recipe_on_the_gate():
    """gated_loss="tanh" (default): f as in encode, λ Σ tanh(c·f) + λ_P Σ ReLU(−π_gate), and the gate's step
    sends ∂L/∂b_gate = (1/ε)·Σ_batch K(π_gate/ε)·ReLU(π_mag)·∂L/∂f (JumpReLU's estimator, the jump at the gate)."""
    sae = randomized("gated", seed=3, jumprelu_bandwidth=0.5)
    assert sae.cfg.gated_loss == "tanh" and sae.cfg.l1_coefficient == pytest.approx(0.5)
    assert set(sae.steering_lr_scales) == {"b_enc"}
    x = torch.randn(64, D_IN, dtype=torch.float64)
    out = sae.training_loss(x, sparsity_scale=0.5)
    gate = pre_acts_ref(sae, x)
    mag = (gate - sae.b_enc) * sae.r_mag.exp() + sae.b_mag
    f = (gate > 0) * mag.relu()
    torch.testing.assert_close(out.x_hat, f @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.x_hat, sae(x).x_hat)  # training forward = inference forward
    c, lam, eps = sae.cfg.jumprelu_tanh_scale, sae.cfg.l1_coefficient, sae.cfg.jumprelu_bandwidth
    torch.testing.assert_close(out.parts["l0"], 0.5 * lam * torch.tanh(c * f).sum(-1).mean())
    torch.testing.assert_close(out.parts["pre_act"],
                               sae.cfg.jumprelu_pre_act_coefficient * (-gate).relu().sum(-1).mean())
    assert "aux" not in out.parts
    # the reconstruction's gradient on b_gate: the autograd part through the open gates plus the estimator
    g = grads_of(sae, out.parts["mse"])["b_enc"]
    f_leaf = f.detach().requires_grad_(True)
    dl_df = torch.autograd.grad(mse(x, f_leaf @ sae.W_dec.detach() + sae.b_dec.detach()), f_leaf)[0]
    # π_mag = exp(r_mag)·W_encᵀx̃ + b_mag does not depend on b_gate: all of it comes through the estimator
    band = (gate.detach().abs() < eps / 2).double()
    torch.testing.assert_close(g, (band * mag.detach().relu() * dl_df).sum(0) / eps)
    assert g.abs().sum() > 0
    # the penalty pushes gates shut (never opens one) by its whole jump tanh(c·ReLU(π_mag)) over the band, not by
    # its slope at 0 times the jump (c·ReLU(π_mag): c = 4× too much for a small magnitude at the gate, more for a
    # large one); the pre-activation term pulls them open
    g = grads_of(sae, out.parts["l0"])["b_enc"]
    torch.testing.assert_close(g, 0.5 * lam * (band * torch.tanh(c * mag.detach().relu())).sum(0) / eps / x.shape[0])
    assert (g >= 0).all() and (g > 0).any()
    g = grads_of(sae, out.parts["pre_act"])  # −λ_P·#{π_gate < 0}/batch on b_gate, nothing else (h detached)
    torch.testing.assert_close(g["b_enc"], -sae.cfg.jumprelu_pre_act_coefficient
                               * (gate.detach() < 0).double().sum(0) / x.shape[0])
    for name in ("W_enc", "b_dec", "r_mag", "b_mag"):
        torch.testing.assert_close(g[name], torch.zeros_like(g[name]), msg=name)
    # a fresh tanh Gated SAE starts every gate at JumpReLU's initial threshold
    fresh = make_sae(SAEConfig(arch="gated", d_in=D_IN, d_sae=D_SAE))
    assert torch.all(fresh.b_enc == -fresh.cfg.jumprelu_init_threshold)
    assert fresh.cfg.jumprelu_init_threshold == 1.0 and fresh.cfg.jumprelu_bandwidth == 2.0
    with pytest.raises(SAEToolkitError, match="gated_loss='hinge'"):
        SAEConfig(arch="gated", d_in=D_IN, d_sae=D_SAE, gated_loss="hinge")


@pytest.mark.parametrize("gated_loss", ["tanh", "l1"])
def test_gated_projection_opens_the_magnitude_wherever_the_gate_opens(gated_loss):
    """project_ (after every optimizer step), tanh recipe: where the magnitude's threshold lies above the gate's
    (τ = b_gate − b_mag·e^{−r} > 0) both move to one point ¾ of the way from the gate's, so τ = 0 and the latent
    fires exactly where its gate opens; latents with τ ≤ 0 and the "l1" loss are left as they are."""
    sae = randomized("gated", seed=5, gated_loss=gated_loss)
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # gates open where the magnitude is still ≤ 0, as unconstrained training drifts
    x = torch.randn(512, D_IN, dtype=torch.float64)

    def state():
        with torch.no_grad():
            gate, mag = sae._paths(x)
            return sae.b_enc - sae.b_mag * (-sae.r_mag).exp(), ((gate > 0) & (mag <= 0)).any(0)

    tau, shut = state()
    assert (tau > 0).any() and (tau < 0).any() and shut.any()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    sae.project_()
    moved = {n for n, p in sae.named_parameters() if not torch.equal(p, before[n])}
    if gated_loss == "l1":
        assert not moved
        return
    assert moved == {"b_enc", "b_mag"}
    for name in ("b_enc", "b_mag"):  # untouched where τ ≤ 0
        torch.testing.assert_close(getattr(sae, name)[tau <= 0], before[name][tau <= 0], rtol=0, atol=0)
    # on the W_encᵀx̃ scale the gate's threshold −b_gate rose by ¾τ, the magnitude's fell by ¼τ
    share = gated.PROJECT_GATE_SHARE
    assert share == 0.75
    torch.testing.assert_close(-sae.b_enc[tau > 0], -before["b_enc"][tau > 0] + share * tau[tau > 0])
    tau_after, shut_after = state()
    assert (tau_after[tau > 0].abs() < 1e-12).all() and not shut_after.any()


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_thresholds_start_at_a_firing_rate(arch):
    """init_thresholds_(x, rate): each latent's threshold at the (1 − rate) quantile of its pre-activations on x
    (it fires on ~rate of the rows), capped at the median of those quantiles (the capped ones fire more)."""
    sae = randomized(arch, seed=4)
    x = torch.randn(2000, D_IN, dtype=torch.float64) * (1 + 3 * torch.rand(2000, 1, dtype=torch.float64))
    rate = 0.05
    sae.init_thresholds_(x, rate)
    with torch.no_grad():
        fire = (sae.encode(x) > 0).double().mean(0) if arch == "jumprelu" else (sae._paths(x)[0] > 0).double().mean(0)
        h = sae._sae_in(x) @ sae.W_enc + (sae.b_enc if arch == "jumprelu" else 0)
        own = h.kthvalue(int(0.95 * 2000), dim=0).values
    capped = own > own.median()
    assert 0 < int(capped.sum()) < D_SAE
    assert torch.all((fire[~capped] - rate).abs() <= 2 / 2000)  # ties and the quantile's rounding
    assert torch.all(fire[capped] >= rate - 1 / 2000) and float(fire[capped].mean()) > rate
    with pytest.raises(SAEToolkitError, match="firing rate 1.5"):
        sae.init_thresholds_(x, 1.5)


def test_gated_aux_loss_trains_only_the_gate_path():
    sae = randomized("gated", seed=2, gated_loss="l1")
    assert sae.cfg.l1_coefficient == pytest.approx(4.0) and sae.steering_lr_scales == {}
    x = torch.randn(16, D_IN, dtype=torch.float64)
    out = sae.training_loss(x)
    g = grads_of(sae, out.parts["aux"])
    assert torch.all(g["W_dec"] == 0) and torch.all(g["r_mag"] == 0) and torch.all(g["b_mag"] == 0)
    assert g["W_enc"].abs().sum() > 0 and g["b_enc"].abs().sum() > 0
    # the frozen reconstruction uses ReLU(π_gate)
    pre_gate = pre_acts_ref(sae, x)
    want = mse(x, pre_gate.relu() @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.parts["aux"], want)
    # gate decides which latents are on, magnitude path their size
    f = sae.encode(x)
    mag = (x - sae.b_dec) @ sae.W_enc * sae.r_mag.exp() + sae.b_mag
    torch.testing.assert_close(f, (pre_gate > 0) * mag.relu())


def test_batchtopk_threshold_is_learned_and_used_in_eval():
    sae = randomized("batchtopk", seed=4)
    x = torch.randn(64, D_IN, dtype=torch.float64)
    assert sae.threshold < 0  # not estimated yet
    sae.train()
    out = sae.training_loss(x)
    pre = pre_acts_ref(sae, x).detach()
    kept = batch_topk_dense(pre, K)
    first = kept[kept > 0].min()
    # same value by two code paths: equal up to rounding (one ulp apart on some CPUs), not bit for bit
    torch.testing.assert_close(sae.threshold, first)
    out = sae.training_loss(x + 0.1)
    assert out.l0 == pytest.approx(K)  # k·batch entries over the batch
    second = batch_topk_dense(pre_acts_ref(sae, x + 0.1).detach(), K)
    m2 = second[second > 0].min()
    assert float(sae.threshold) == pytest.approx(0.99 * float(first) + 0.01 * float(m2))
    # eval: the threshold, not a top-k, decides; a token can have more or fewer than k latents
    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(0.2)
        f = sae.encode(x)
    pre = pre_acts_ref(sae, x).detach()
    torch.testing.assert_close(f, pre.relu() * (pre > 0.2))
    counts = (f > 0).sum(-1)
    assert counts.min() != counts.max()
    # eval encode does not move the threshold
    sae.training_loss(x)
    assert float(sae.threshold) == 0.2


def test_batchtopk_threshold_ignores_batches_without_positive_activations():
    sae = randomized("batchtopk", seed=4).train()
    x = torch.randn(16, D_IN, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative: nothing fires
    out = sae.training_loss(x)
    assert out.l0 == 0 and not out.fired.any()
    assert sae.threshold == -1  # still "not estimated", not +inf
    with torch.no_grad():
        sae.b_enc.zero_()
    sae.training_loss(x)
    assert 0 < sae.threshold < float("inf")


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_calibrated_threshold_keeps_k_per_token_on_the_calibration_rows(arch):
    sae = randomized(arch, seed=5).eval()
    x = torch.randn(300, D_IN, dtype=torch.float64)
    # chunks smaller than the batch: the running top-(k·n + 1) must equal one selection over all rows
    theta = sae.calibrate_threshold_(x, chunk_rows=64)
    pre = pre_acts_ref(sae, x).detach()
    assert theta == pytest.approx(float(pre.reshape(-1).sort(descending=True).values[K * 300]))
    assert float(sae.threshold) == pytest.approx(theta)
    with torch.no_grad():
        l0 = (sae.encode(x) > 0).sum(-1).double()
    assert float(l0.mean()) == pytest.approx(K, abs=1 / 300)  # exactly k·n entries, ties aside
    assert l0.min() != l0.max()  # a threshold, not a per-token top-k
    # fewer than k·n positive pre-activations: θ = 0 keeps every positive one
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)
    assert sae.calibrate_threshold_(x) == 0.0
    with pytest.raises(SAEToolkitError, match=r"\[n, d_in\]"):
        sae.calibrate_threshold_(x[:0])


def test_remove_parallel_grad_and_normalize_keep_unit_norms():
    sae = _make("relu")
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        sae.training_loss(torch.randn(32, D_IN, dtype=torch.float64)).loss.backward()
        sae.remove_parallel_grad_()
        assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-12  # tangent to every row
        opt.step()
        assert (sae.W_dec.norm(dim=-1) - 1).abs().max() > 1e-6  # Adam left the sphere...
        sae.normalize_decoder_()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE, dtype=torch.float64))  # ...and back


def test_fresh_saes_start_with_unit_decoder_and_tied_encoder():
    for arch in ARCHS:
        sae = make_sae(cfg_for(arch))
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE, dtype=torch.float64))
        assert torch.equal(sae.W_enc, sae.W_dec.T)
        # a copy, not a view: tied storage would apply every optimizer update to both
        assert sae.W_enc.untyped_storage().data_ptr() != sae.W_dec.untyped_storage().data_ptr()
    assert make_sae(cfg_for("relu", decoder_norm_penalty=True)).W_dec.norm(dim=-1).max() < 0.11


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "gated", "transcoder"])
def test_w_enc_gradient_arrives_in_its_layout(arch):
    """A training step's ∂W_enc [d_in, d_sae] has W_enc's strides (the sparse kernels sum it per latent, [d_sae, d_in],
    and write it transposed themselves), so autograd's accumulation takes it without another copy."""
    kw = {"skip": True, "d_out": D_IN + 3, "target": "mlp_out.1"} if arch == "transcoder" else {}
    sae = make_sae(cfg_for("topk" if arch == "transcoder" else arch, **kw))
    assert sae.W_enc.t().is_contiguous()  # latent-major, as nn.Linear's weight
    x = torch.randn(16, D_IN, dtype=torch.float64)
    y = torch.randn(16, D_IN + 3, dtype=torch.float64) if kw else None
    sae.training_loss(x, **({"target": y} if kw else {})).loss.backward()
    assert sae.W_enc.grad.stride() == sae.W_enc.stride()


@pytest.mark.parametrize("arch", ALL)
def test_fold_scale_gives_raw_units(arch):
    sae = _trained_a_little(arch)
    x = torch.randn(16, D_IN, dtype=torch.float64)
    scale = 3.7
    with torch.no_grad():
        x_hat_scaled, f_scaled = sae(x * scale)
        sae.fold_scale_(scale)
        x_hat, f = sae(x)
    torch.testing.assert_close(x_hat, x_hat_scaled / scale)
    torch.testing.assert_close(f, f_scaled / scale)
    assert sae.cfg.act_scale == pytest.approx(scale)
    with pytest.raises(SAEToolkitError, match="positive finite"):
        sae.fold_scale_(0.0)
    with pytest.raises(SAEToolkitError, match="positive finite"):
        sae.fold_scale_("big")  # type: ignore[arg-type]  # testing the error


@pytest.mark.parametrize("arch", ALL)
def test_save_load_round_trip_is_exact(arch, tmp_path):
    sae = _trained_a_little(arch)
    sae.cfg.hookpoint, sae.cfg.model = "mlp_out.1", "tiny"
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["arch"] == arch.split("-")[0] and cfg["d_in"] == D_IN and cfg["hookpoint"] == "mlp_out.1"
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert not loaded.training  # loaded for inference (BatchTopK then applies its threshold)
    x = torch.randn(10, D_IN, dtype=torch.float64)
    with torch.no_grad():
        a, b = sae(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.feature_acts, b.feature_acts)
    for (n1, t1), (n2, t2) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    # a run directory holding sae/ loads too
    assert torch.equal(SAE.load(tmp_path).W_dec, sae.W_dec)


def test_safetensors_names_follow_the_papers(tmp_path):
    from safetensors import safe_open

    want = {
        "relu": {"W_enc", "b_enc", "W_dec", "b_dec"},
        "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
        "batchtopk": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
        "matryoshka": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
        "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold"},
        "gated": {"W_enc", "b_enc", "W_dec", "b_dec", "r_mag", "b_mag"},
    }
    for arch in ARCHS:
        sae = make_sae(cfg_for(arch))
        sae.save(tmp_path / arch)
        with safe_open(str(tmp_path / arch / "sae.safetensors"), "pt") as f:
            assert set(f.keys()) == want[arch]
            assert tuple(f.get_tensor("W_enc").shape) == (D_IN, D_SAE)
            assert tuple(f.get_tensor("W_dec").shape) == (D_SAE, D_IN)


def test_float32_save_keeps_dtype(tmp_path):
    sae = make_sae(SAEConfig(arch="topk", d_in=4, d_sae=16, k=2))
    sae.to(torch.bfloat16).save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert loaded.cfg.dtype == "bfloat16" and loaded.W_enc.dtype == torch.bfloat16
    assert torch.equal(loaded.W_enc, sae.W_enc)


def test_init_b_dec_geometric_median_and_mean():
    torch.manual_seed(0)
    center = torch.arange(D_IN, dtype=torch.float64)
    sample = torch.cat([center + 0.01 * torch.randn(90, D_IN), center + 100 * torch.ones(10, D_IN)])
    sae = make_sae(cfg_for("relu"))
    sae.init_b_dec_(sample)
    assert (sae.b_dec - center).norm() < 0.5  # robust to the 10% outliers
    sae.init_b_dec_(sample, method="mean")
    torch.testing.assert_close(sae.b_dec, sample.mean(0))
    # Weiszfeld's fixed point: the mean of unit vectors towards the points vanishes
    pts = torch.randn(50, 3, dtype=torch.float64)
    med = geometric_median(pts)
    u = (pts - med) / (pts - med).norm(dim=-1, keepdim=True)
    assert u.sum(0).norm() < 1e-3
    with pytest.raises(SAEToolkitError, match="method"):
        sae.init_b_dec_(sample, method="median")  # type: ignore[arg-type]  # testing the error


def test_topk_recovers_planted_sparse_directions():
    """Toy superposition: 24 unit directions in 12 dims, 2 active per sample; TopK(k=2) should find them."""
    torch.manual_seed(0)
    n_true, d = 24, 12
    true_dirs = torch.nn.functional.normalize(torch.randn(n_true, d), dim=-1)

    def batch(n):
        idx = torch.rand(n, n_true).topk(2, dim=-1).indices
        coef = torch.zeros(n, n_true).scatter(-1, idx, torch.rand(n, 2) + 0.5)
        return coef @ true_dirs

    sae = make_sae(SAEConfig(arch="topk", d_in=d, d_sae=48, k=2))
    sae.init_b_dec_(batch(512), method="mean")
    opt = torch.optim.Adam(sae.parameters(), lr=2e-2)
    # tiny tensors: on a busy 2-core box thread hand-offs cost more than the math (38 ms vs 5 ms a step)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(150):
            out = sae.training_loss(batch(128))
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.normalize_decoder_()
    finally:
        torch.set_num_threads(threads)
    x = batch(1024)
    fvu = mse(x, sae(x).x_hat) / mse(x, x.mean(0))
    best = (true_dirs @ sae.W_dec.detach().T).max(-1).values  # best cosine per planted direction
    assert fvu < 0.15  # 0.07-0.10 over seeds 0-3; an untrained SAE is near 1
    assert (best > 0.9).float().mean() >= 0.8


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"arch": "topk", "k": 48}, r"k=48 must be smaller than d_sae=48"),
        ({"arch": "topk", "k": 100}, r"k=100.*d_sae=48"),
        ({"arch": "topk"}, r"needs k"),
        ({"arch": "batchtopk", "k": 0}, r"k=0"),
        ({"arch": "mystery"}, r"unknown SAE arch 'mystery'"),
        ({"arch": "relu", "d_in": 0}, r"d_in=0"),
        ({"arch": "relu", "d_sae": -3}, r"d_sae=-3"),
        ({"arch": "topk", "k": 16, "multi_topk": True}, r"4\*k=64 <= d_sae=48"),
        ({"arch": "relu", "multi_topk": True}, r"multi_topk"),
        ({"arch": "topk", "k": 4, "decoder_norm_penalty": True}, r"decoder_norm_penalty"),
        ({"arch": "relu", "l1_coefficient": -1.0}, r"l1_coefficient=-1.0"),
        ({"arch": "relu", "l1_coefficient": math.nan}, r"l1_coefficient=nan"),
        ({"arch": "jumprelu", "jumprelu_bandwidth": 0.0}, r"jumprelu_bandwidth=0.0"),
        ({"arch": "relu", "dtype": "int8"}, r"dtype='int8'"),
        ({"arch": "batchtopk", "k": 4, "batchtopk_threshold_decay": 1.0}, r"batchtopk_threshold_decay=1.0"),
    ],
)
def test_bad_configs_fail_with_clear_message(kw, match):
    with pytest.raises(SAEToolkitError, match=match):
        SAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, **kw})


def test_wrong_input_width_is_a_clear_error():
    sae = make_sae(cfg_for("topk"))
    with pytest.raises(SAEToolkitError, match=r"width 5 .*d_in=8"):
        sae.encode(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(SAEToolkitError, match=r"dead_mask has shape \(3,\)"):
        sae.training_loss(torch.randn(3, D_IN), dead_mask=torch.ones(3, dtype=torch.bool))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(SAEToolkitError, match="does not exist"):
        SAE.load(tmp_path / "nope")
    with pytest.raises(SAEToolkitError, match="no cfg.json"):
        SAE.load(tmp_path)
    sae_dir = make_sae(cfg_for("jumprelu")).save(tmp_path / "s")
    cfg_path = sae_dir / "cfg.json"
    good = cfg_path.read_text()

    cfg_path.write_text("{not json")
    with pytest.raises(SAEToolkitError, match="not valid JSON"):
        SAE.load(sae_dir)
    cfg_path.write_text(json.dumps({**json.loads(good), "arch": "sparse_magic"}))
    with pytest.raises(SAEToolkitError, match="unknown SAE arch 'sparse_magic'"):
        SAE.load(sae_dir)
    cfg_path.write_text(json.dumps({**json.loads(good), "hook_name": "blocks.0"}))
    with pytest.raises(SAEToolkitError, match=r"unknown keys \['hook_name'\]"):
        SAE.load(sae_dir)
    cfg_path.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "d_sae"}))
    with pytest.raises(SAEToolkitError, match=r"lacks required keys \['d_sae'\]"):
        SAE.load(sae_dir)
    cfg_path.write_text(json.dumps({**json.loads(good), "d_sae": 64}))
    with pytest.raises(SAEToolkitError, match=r"'W_enc' has shape \(8, 48\), cfg.json implies \(8, 64\)"):
        SAE.load(sae_dir)
    cfg_path.write_text(json.dumps({**json.loads(good), "arch": "gated"}))
    with pytest.raises(SAEToolkitError, match="lack tensor 'r_mag'"):
        SAE.load(sae_dir)
    cfg_path.write_text(good)
    (sae_dir / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEToolkitError, match="cannot read"):
        SAE.load(sae_dir)
    (sae_dir / "sae.safetensors").unlink()
    with pytest.raises(SAEToolkitError, match="no sae.safetensors"):
        SAE.load(sae_dir)


def test_docstring_examples():
    import doctest

    from sae_toolkit.sae import base

    torch.manual_seed(0)
    result = doctest.testmod(base)
    assert result.attempted >= 1 and result.failed == 0
