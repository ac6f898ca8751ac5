"""JumpReLU SAEs (Rajamanoharan et al. 2024, "Jumping Ahead"): per-latent thresholds trained with straight-through
estimators, with Anthropic's January-2025 tanh penalty (default) or the paper's L0 penalty."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd import Function

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import kernels
from sae_toolkit.sae.base import SAE, SAEConfig, TrainOutput
from sae_toolkit.sae.registry import register


def _band(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """The rectangle kernel's support K((z − θ)/ε) = 1[|z − θ| < ε/2], as a bool [batch, d_sae] mask."""
    return (z - theta).abs_() < eps / 2


class _JumpReLU(Function):
    """z·H(z − θ); ∂/∂z = H(z − θ), pseudo-derivative ∂/∂θ = −(θ/ε)·K((z − θ)/ε) (paper eq. 11)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        open_ = z > theta
        ctx.save_for_backward(z, theta, open_)
        ctx.eps = eps
        return z * open_

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta, open_ = ctx.saved_tensors
        grad_z = g * open_
        # θ/ε is a per-latent factor: applied after the sum over tokens, on [d_sae] instead of [batch, d_sae]
        band_sum = (g * _band(z, theta, ctx.eps)).reshape(-1, theta.shape[-1]).sum(0)
        return grad_z, -(theta / ctx.eps) * band_sum, None


class _Step(Function):
    """H(z − θ); no gradient to z, pseudo-derivative ∂/∂θ = −(1/ε)·K((z − θ)/ε) (paper eq. 12)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        band_sum = (g * _band(z, theta, ctx.eps)).reshape(-1, theta.shape[-1]).sum(0)
        return None, -band_sum / ctx.eps, None


FUSED_MAX_DENSITY = 0.15
"""The tanh step runs as `_TanhStep` on eager CPU when at most this share of the [batch, d_sae] pre-activations lie
at or above θ (where ∂L/∂f is needed per entry): a dot product and a few bag-sum terms per such entry (~40-50 ns
each on the project's CPU) against the composed graph's dense GEMMs (~7 ns per entry each)."""

BAND_BAG_MAX_DENSITY = 0.25
"""... and the threshold estimator's band below θ, (θ − ε/2, θ), enters as bag sums of g's rows while at most this
share lie above θ − ε/2; beyond, as one dense GEMM (`wide_band_sums`). Measured crossover on the project's CPU
(2 % of the gates open, one thread): bag sums 177 / 230 / 248 ms per step at 12 / 22 / 27 % in the band, the GEMM
235 / 244 / 205 ms. A trained SAE at the default ε = 2 holds ~10 % of SmolLM2's pre-activations there at L0 35,
~27 % at L0 112."""


def fused_entries(pre: Tensor, theta: Tensor | float, eps: float,
                  floor: Tensor | None = None) -> tuple[Tensor, bool] | None:
    """(flat indices, wide) when a fused tanh step applies (eager CPU, float32/64, no autocast, at most
    FUSED_MAX_DENSITY of the entries at or above θ), else None. Reads counts on the host.

    wide=False: the indices of the entries above θ − ε/2 (the open gates and the estimator's band), at most
    BAND_BAG_MAX_DENSITY of them. wide=True: more lie in the band; the indices of the entries at or above θ only,
    the band's sums left to a dense GEMM. floor [d_sae]: entries at or below it carry no gradient and are left out
    of both (Gated: its magnitude path ReLU(π_mag) is 0 there)."""
    if (not kernels.host_syncs_ok(pre) or torch.is_autocast_enabled("cpu")
            or pre.dtype not in (torch.float32, torch.float64)):
        return None
    n = pre.numel()
    # a hair below θ − ε/2 so that every entry of the estimator's band |π − θ| < ε/2 is in, whatever the rounding
    lower = theta - 0.5 * eps * (1 + 1e-4)
    upper = pre > (lower if floor is None else torch.maximum(floor, torch.as_tensor(lower, dtype=pre.dtype)))
    n_upper = kernels.count_true(upper)  # counted first: a nonzero over a band too wide to use would be wasted
    if n_upper <= FUSED_MAX_DENSITY * n:
        return kernels.flat_nonzero(upper), False
    at_or_above = pre >= theta
    if floor is not None:
        at_or_above &= pre > floor
    if kernels.count_true(at_or_above) > FUSED_MAX_DENSITY * n:
        return None
    if n_upper <= BAND_BAG_MAX_DENSITY * n:
        return kernels.flat_nonzero(upper), False
    return kernels.flat_nonzero(at_or_above), True


def wide_band_sums(weights: Tensor, g: Tensor, low_precision: bool = False) -> tuple[Tensor, Tensor]:
    """(weightsᵀ g [d_sae, d_out], Σ_b weights [d_sae]) for the estimator's band below the gate given densely as
    weights [batch, d_sae] (0 outside the band): one GEMM for a band too wide for per-entry bag sums.
    low_precision: the GEMM in bf16 with float32 accumulation (exact 0/1 weights, g rounded; 57 → 28 ms at
    [4608, 1024] × [1024, 576] on one thread), the sums of the weights in float32; callers check `kernels.bf16_ok`."""
    if low_precision:
        w16 = weights.to(torch.bfloat16)
        return (w16.t() @ g.to(torch.bfloat16)).to(g.dtype), w16.sum(0, dtype=g.dtype)
    weights = weights.to(g.dtype)
    return weights.t() @ g, weights.sum(0)


def fused_tanh_output(sae: SAE, x: Tensor, y: Tensor, step: tuple[Tensor, ...], sparsity_scale: float) -> TrainOutput:
    """TrainOutput of a fused tanh step (`_TanhStep`, `gated._GatedTanhStep`): step = (f W_dec [batch, d_out],
    Σ tanh penalty, Σ pre-activation term, fired [d_sae], number of open gates); loss parts {"mse", "l0", "pre_act"}
    as the composed graphs write them."""
    dec, pen_sum, pre_sum, fired, n_open = step
    cfg, n_rows = sae.cfg, x.shape[0]
    x_hat = dec + sae.b_dec
    if cfg.skip:
        x_hat = x_hat + sae.skip_out(x)
    parts = {"mse": sae._mse(y, x_hat),
             "l0": cfg.l1_coefficient * sparsity_scale * (pen_sum / n_rows),
             "pre_act": cfg.jumprelu_pre_act_coefficient * (pre_sum / n_rows)}
    return TrainOutput(sum(parts.values()), x_hat, fired, n_open.float() / n_rows, parts)


class LatentMajorEntries(NamedTuple):
    """Where a JumpReLU training batch's pre-activations lie relative to θ, found on the latent-major π [d_sae, batch]
    (`latent_major_entries`), for the fused tanh step. Latent-major flat indices come out grouped by latent with
    rows ascending: the order of every per-latent sum of the backward, so no index list is ever sorted by latent."""

    s_flat: Tensor
    """[n_s] latent-major flat indices of S = {π ≥ θ} (ReLU(θ − π) = 0 there; ⊇ the open gates, = unless π = θ)."""

    z: Tensor
    """[n_s] π on S."""

    dz: Tensor
    """[n_s] π − θ on S (≥ 0)."""

    closed_flat: Tensor | None
    """[n_c] latent-major flat indices of the estimator's band below θ, θ − ε/2 < π < θ (closed gates); None when
    the band is wide."""

    closed: Tensor | None
    """Wide band: [d_sae, batch] bool mask of that band, for one GEMM (`wide_band_sums`); None otherwise."""

    wide: bool
    """True: the band is too wide for bag sums (more than BAND_BAG_MAX_DENSITY above θ − ε/2)."""


def latent_major_entries(pre_t: Tensor, theta: Tensor, eps: float) -> LatentMajorEntries | None:
    """The entries of the latent-major pre-activations pre_t [d_sae, batch] the fused tanh step needs, or None when
    it does not apply: the same rule as `fused_entries` (eager CPU, float32/64, no autocast, at most
    FUSED_MAX_DENSITY at or above θ; the band as bag sums while at most BAND_BAG_MAX_DENSITY lie above θ − ε/2).
    Reads counts on the host. A wide band overwrites pre_t with π − θ (no second [d_sae, batch] buffer).

    The band is taken exactly as the composed graph's kernel 1[|π − θ| < ε/2] on π < θ: with d = π − θ rounded
    once, d < 0 ⇔ π < θ and |d| < ε/2 ⇔ d > −ε/2 there. One pass over [d_sae, batch] finds U = {π > θ − ε/2}
    (a hair lower, so that rounding loses no band entry); S and the band are then split off U's index list, which
    keeps its latent-major order."""
    if (not kernels.host_syncs_ok(pre_t) or torch.is_autocast_enabled("cpu")
            or pre_t.dtype not in (torch.float32, torch.float64)):
        return None
    n, n_rows = pre_t.numel(), pre_t.shape[1]
    upper = pre_t > (theta - 0.5 * eps * (1 + 1e-4))[:, None]
    n_upper = kernels.count_true(upper)
    if n_upper > FUSED_MAX_DENSITY * n:
        at = pre_t >= theta[:, None]  # ⇔ π − θ ≥ 0 exactly
        if kernels.count_true(at) > FUSED_MAX_DENSITY * n:
            return None
        if n_upper > BAND_BAG_MAX_DENSITY * n:  # wide: the band as a dense mask
            s_flat = kernels.flat_nonzero(at)
            z = pre_t.reshape(-1).index_select(0, s_flat)
            d = pre_t.sub_(theta[:, None])  # π − θ, in place: π itself is needed only on S
            closed = (d > -eps / 2).logical_xor_(at)  # θ − ε/2 < π < θ: at ⊂ {d > −ε/2}
            return LatentMajorEntries(s_flat, z, d.reshape(-1).index_select(0, s_flat), None, closed, True)
    u_flat = kernels.flat_nonzero(upper)
    z = pre_t.reshape(-1).index_select(0, u_flat)
    du = z - theta.index_select(0, _latent_of(u_flat, n_rows))  # π − θ on U
    in_s = du >= 0
    s = kernels.flat_nonzero(in_s)
    closed = kernels.flat_nonzero(torch.logical_and(du > -eps / 2, in_s.logical_not_()))
    return LatentMajorEntries(u_flat.index_select(0, s), z.index_select(0, s), du.index_select(0, s),
                              u_flat.index_select(0, closed), None, False)


def _latent_of(flat: Tensor, n_rows: int) -> Tensor:
    """Latent of latent-major flat indices: flat // n_rows, as a shift when n_rows is a power of two (int64
    division costs ~2 ns per entry on CPU, 1 ms for the ~500k entries of a trained SAE's band)."""
    return flat >> (n_rows.bit_length() - 1) if n_rows & (n_rows - 1) == 0 else flat // n_rows


def _row_of(flat: Tensor, n_rows: int) -> Tensor:
    """Row (token) of latent-major flat indices: flat % n_rows, as a mask when n_rows is a power of two."""
    return flat & (n_rows - 1) if n_rows & (n_rows - 1) == 0 else flat % n_rows


def _latent_offsets(flat: Tensor, n_rows: int, n_latents: int) -> Tensor:
    """[n_latents] start of each latent's entries in sorted latent-major flat indices (latent = flat // n_rows)."""
    return torch.searchsorted(flat, torch.arange(n_latents, device=flat.device, dtype=flat.dtype) * n_rows)


class _TanhStep(Function):
    """The tanh-recipe latent step from precomputed latent-major pre-activations, with its whole backward written
    out sparse.

    Forward (no autograd inside), from `latent_major_entries`: f = π·1[π > θ] on S = {π ≥ θ}; returns
    (f W_dec [batch, d_out], Σ tanh(c·f·n), Σ ReLU(θ − π)·n, fired [d_sae] bool, number of open gates),
    n = ‖W_dec,i‖. The same values and gradients as the composed autograd graph (`_JumpReLU` + `adaptive_decode` +
    the two penalty terms), but:
    - ∂L/∂f is a dot product g[row]·W_dec[col] per entry of S, and the band below θ (closed gates) enters θ's
      estimator only as per-latent sums W_dec,i · Σ_band g_b: bag sums of g's rows (in bf16 with float32
      accumulation where `kernels.bf16_ok`: the estimator's noise dwarfs bf16's 2⁻⁹), or one GEMM when the band
      is wide,
    - every index list comes latent-major from π's latent-major layout: the per-latent bag sums need no sort (only
      the forward's decode sorts S's few entries by row),
    - the pre-activation term has π detached (`JumpReLUSAE`): its gradient reaches θ (n·#{b: π < θ}) and the norms
      only, so ∂W_enc is a sum over the (few) open gates: no dense ∂W_enc GEMM,
    - Σ_b ReLU(θ − π) = B·θ − Σ_b π + Σ_{π ≥ θ}(π − θ), with Σ_b π = (Σ_b x_b) W_enc + B·b_enc a matvec.
    """

    @staticmethod
    def forward(ctx, pre_t, sae_in, W_enc, b_enc, b_dec, theta, W_dec, c, eps, entries, wide):
        d_sae, n_rows = pre_t.shape
        e = entries
        norms = torch.linalg.vector_norm(W_dec, dim=-1)  # [d_sae]; 1 while rows are kept at unit norm
        s_cols, s_rows = _latent_of(e.s_flat, n_rows), _row_of(e.s_flat, n_rows)
        s_offsets = _latent_offsets(e.s_flat, n_rows, d_sae)
        f = e.z * (e.dz > 0)  # JumpReLU output on S
        by_row = kernels.argsort_keys(s_rows, n_rows)  # stable: each row's latents ascending, as a row-major scan
        dec = kernels.bag_sum(W_dec, s_cols.index_select(0, by_row),
                              kernels.row_offsets(s_rows.index_select(0, by_row), n_rows), f.index_select(0, by_row))
        t = torch.tanh(c * norms.index_select(0, s_cols) * f)
        x_sum = sae_in.sum(0)
        pi_sum = x_sum.to(W_enc.dtype) @ W_enc + n_rows * b_enc  # [d_sae] Σ_b π
        excess = torch.zeros_like(theta).index_add_(0, s_cols, e.dz)
        relu_sum = (n_rows * theta - pi_sum + excess).clamp_min_(0)  # [d_sae] Σ_b ReLU(θ − π)
        s_counts = torch.diff(s_offsets, append=s_offsets.new_full((1,), e.s_flat.numel()))
        n_lt = n_rows - s_counts.to(theta.dtype)  # [d_sae] #{b: π < θ}
        opened = f > 0  # θ > 0, so open ⇔ f > 0
        fired = torch.zeros(d_sae, dtype=torch.bool, device=pre_t.device).index_fill_(0, s_cols[opened], True)
        if wide:
            closed_rows = closed_offsets = None
            closed, n_closed = e.closed, None
        else:  # the band's entries latent-major: each latent's bag of rows, no sort
            closed_rows = _row_of(e.closed_flat, n_rows)
            closed_offsets, closed = _latent_offsets(e.closed_flat, n_rows, d_sae), None
            n_closed = torch.diff(closed_offsets, append=closed_offsets.new_full((1,), e.closed_flat.numel()))
        ctx.save_for_backward(sae_in, W_enc, theta, W_dec, norms, s_rows, s_cols, s_offsets, e.dz, f, t, relu_sum,
                              n_lt, n_closed, closed_rows, closed_offsets, closed)
        ctx.c, ctx.eps, ctx.has_b_dec = c, eps, b_dec is not None
        ctx.mark_non_differentiable(fired)
        return dec, t.sum(), (norms * relu_sum).sum(), fired, opened.sum()

    @staticmethod
    def backward(ctx, g_dec, g_pen, g_pre, _fired, _n_open):
        (sae_in, W_enc, theta, W_dec, norms, s_rows, s_cols, s_offsets, dz, f, t, relu_sum, n_lt, n_closed,
         closed_rows, closed_offsets, closed) = ctx.saved_tensors
        c = ctx.c
        g_dec = g_dec.contiguous().to(W_dec.dtype)
        # ∂L/∂f on S, one dot product per entry (latent-major: W_dec's row stays in cache): the reconstruction's
        # g·W_dec,i plus the tanh term's g_pen·c·n·sech²
        n_s = norms.index_select(0, s_cols)
        dldf = (kernels.gather_dot_by_column(g_dec, W_dec, s_rows, s_cols).to(dz.dtype)
                + (g_pen * c) * n_s * (1 - t * t))
        # The band below θ (closed gates, f = 0, sech² = 1) only enters θ's estimator as a per-latent sum:
        # W_dec,i · Σ_{b in band} g_b, bag sums of g's rows (cheaper than a dot per entry), or one GEMM when wide
        if closed is not None:  # closed latent-major: its transpose is the GEMM's operand
            g_band, n_closed = wide_band_sums(closed.t(), g_dec, kernels.bf16_ok(g_dec))
        else:
            table = g_dec.to(torch.bfloat16) if kernels.bf16_ok(g_dec) else g_dec
            g_band = kernels.bag_sum(table, closed_rows, closed_offsets, None).to(W_dec.dtype)  # [d_sae, d_out]
        band_s = dz < ctx.eps / 2  # entries of S inside the band |π − θ| < ε/2
        band_sum = (kernels.row_dots(g_band, W_dec.detach()).to(theta.dtype)
                    + (g_pen * c) * norms * n_closed.to(theta.dtype)).index_add_(0, s_cols[band_s], dldf[band_s])
        grad_theta = -(theta / ctx.eps) * band_sum + g_pre * norms * n_lt
        dldf_open = dldf * (f > 0)  # ∂π from the reconstruction and tanh terms lives on the open gates
        # the pre-activation term sees π detached: it reaches θ and the norms only, not W_enc, b_enc, b_dec
        grad_b_enc = torch.zeros_like(theta).index_add_(0, s_cols, dldf_open)
        bag = kernels.bag_sum(sae_in.to(W_enc.dtype), s_rows, s_offsets, dldf_open)  # [d_sae, d_in]
        grad_W_enc = kernels.in_layout(bag, W_enc)
        grad_b_dec = -(grad_b_enc @ W_enc.t()) if ctx.has_b_dec and ctx.needs_input_grad[4] else None
        grad_W_dec = kernels.bag_sum(g_dec, s_rows, s_offsets, f)
        tanh_sum = torch.zeros_like(norms).index_add_(0, s_cols, (1 - t * t) * f)  # ∂/∂n of Σ tanh(c·f·n), / c
        grad_norms = (g_pen * c) * tanh_sum + g_pre * relu_sum
        # the norms' share, ∂n/∂W_dec,i = W_dec,i / n_i (0 for a zero row, as autograd's norm), added in one pass
        # instead of autograd's four over [d_sae, d_in] (div, masked fill, mul, then the sum of two gradients)
        scale = (grad_norms / norms).masked_fill_(norms == 0, 0)
        grad_W_dec.addcmul_(W_dec, scale.to(W_dec.dtype)[:, None])
        return (None, None, grad_W_enc, grad_b_enc, grad_b_dec, grad_theta, grad_W_dec, None, None, None, None)


START_OUTLIER_MULTIPLE = 4.0
"""`start_thresholds` takes its quantiles over the rows within this multiple of the median ‖x − mean‖: 1 % of the
SmolLM2 mlp_out.9 rows have 6–17× the median norm and would set the top quantile of any latent not orthogonal to
them (jumprelu L0 16: 1.9 % dead latents instead of 2.2 %, EV 0.866 either way; 0 disables)."""


def start_thresholds(sae_in: Tensor, W_enc: Tensor, b_enc: Tensor | None, rate: float, chunk: int = 512,
                     cap: bool = True) -> Tensor:
    """[d_sae] thresholds at which each latent of sae_in W_enc + b_enc fires on ~rate of the rows of sae_in [n, d_in]:
    per latent the (1 − rate) quantile over the rows, capped at the median of those quantiles (cap=False: not
    capped, for a few resampled latents whose median says nothing about the others).

    Why the cap: the latents with the highest quantiles owe them to a few high-norm rows, and at their own
    quantile they fired only there, learned nothing and stayed dead (SmolLM2 mlp_out.9, L0 16: 21-30 % of the
    latents dead on held-out rows; capped: < 1 %). Computed in chunks of latents (the whole [n, d_sae] block at
    once would take n·d_sae floats)."""
    if not 0.0 < rate < 1.0:
        raise SAEToolkitError(f"initial firing rate {rate!r} must lie strictly between 0 and 1; lower the target L0")
    sae_in = sae_in.to(W_enc.dtype)
    if START_OUTLIER_MULTIPLE:
        norms = (sae_in - sae_in.mean(0)).norm(dim=-1)
        typical = norms <= START_OUTLIER_MULTIPLE * norms.median()
        if typical.sum() >= 1:
            sae_in = sae_in[typical]
    k = min(sae_in.shape[0], max(1, math.ceil((1.0 - rate) * sae_in.shape[0])))
    out = []
    for i in range(0, W_enc.shape[1], chunk):
        h = sae_in @ W_enc[:, i:i + chunk]
        out.append((h if b_enc is None else h + b_enc[i:i + chunk]).kthvalue(k, dim=0).values)
    q = torch.cat(out)
    return q.clamp_max(q.median()) if cap else q


@register
class JumpReLUSAE(SAE):
    """f = JumpReLU_θ(W_encᵀx + b_enc) = π·1[π > θ] (θ > 0 per latent),  x̂ = W_decᵀ f + b_dec.

    Loss (cfg.jumprelu_loss="tanh", Anthropic "Circuits Updates – January 2025")
        ‖x − x̂‖² + λ Σᵢ tanh(c·fᵢ‖W_dec,i‖) + λ_P Σᵢ ReLU(θᵢ − πᵢ)‖W_dec,i‖,
    a smooth stand-in for L0 whose gradient reaches θ through the JumpReLU's own straight-through estimator, plus
    a pre-activation term that keeps latents from dying. Unlike Anthropic's, π is detached in that term: it pulls
    only θ down (∂/∂θᵢ = λ_P‖W_dec,i‖·#{b: π_bi < θᵢ}/batch) and never moves W_enc, b_enc or b_dec (attached,
    its push on every π, i.e. of W_enc towards the mean input, cost held-out EV on SmolLM2, see
    SAEConfig.jumprelu_pre_act_coefficient); the value is unchanged. Or (jumprelu_loss="step", the paper)
    ‖x − x̂‖² + λ‖f‖₀ with the L0's gradient through the step function's estimator. Both estimators use a
    rectangle kernel of bandwidth ε (cfg.jumprelu_bandwidth). θ is trained as log θ (kept positive) and saved both as
    `threshold` (what other tools read) and `log_threshold` (so a reload is bit-exact). x is not centred by b_dec
    unless cfg.apply_b_dec_to_input.
    """

    archs = ("jumprelu",)
    steering_lr_scales = {"log_threshold": 10.0}
    """lr factors under --target-l0 (training.trainer.param_groups): the L0 moves with λ only as fast as the
    thresholds do, and at the base rate they lagged the controller by ~100 steps on SmolLM2 activations (the run
    overshot and ended 21 % off its target; ×10: within 1 %). Without a target λ is fixed and ×10 cost MMCS on the
    issue-11 toy (0.89 → 0.82), so the base rate stays the default there."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        log_t = torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), device=device)
        self.log_threshold = nn.Parameter(log_t.to(self.W_enc.dtype))

    @property
    def threshold(self) -> Tensor:
        """[d_sae] per-latent thresholds θ = exp(log_threshold)."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae]: pre-activations where they exceed the latent's threshold, else 0."""
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one batch x [batch, d_in]; parts {"mse", "l0"} (λ·sparsity_scale·mean penalty) + "pre_act"
        with the tanh loss. dead_mask unused. MSE = mean over the batch of ‖y − x̂‖² summed over d_out, y the
        target of a transcoder, else x."""
        if x.ndim != 2:
            raise SAEToolkitError(f"training_loss takes a [batch, d_in] batch, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        y = self._target(x, target)
        cfg = self.cfg
        theta, eps = self.threshold, cfg.jumprelu_bandwidth
        if (cfg.jumprelu_loss == "tanh" and kernels.host_syncs_ok(x) and not torch.is_autocast_enabled("cpu")
                and self.W_enc.dtype in (torch.float32, torch.float64)):
            # the fused step's candidate: π latent-major [d_sae, batch] (one GEMM either way), see `_TanhStep`
            pre_t, sae_in = self._encoder_pass_latent_major(x)
            entries = latent_major_entries(pre_t, theta.detach(), eps)
            if entries is not None:
                return self._fused_tanh_loss(x, y, pre_t, sae_in, theta, eps, entries, sparsity_scale)
            computed = pre_t.t().contiguous(), sae_in
        else:
            computed = self._encoder_pass(x)  # [batch, d_sae], [batch, d_in]; no autograd yet
        pre = self._pre_acts_with_grad(x, computed)
        f = _JumpReLU.apply(pre, theta, eps)
        x_hat = kernels.adaptive_decode(f, self.W_dec) + self.b_dec
        if cfg.skip:
            x_hat = x_hat + self.skip_out(x)
        parts = {"mse": self._mse(y, x_hat)}
        if cfg.jumprelu_loss == "tanh":
            norms = self.W_dec.norm(dim=-1)  # [d_sae]; 1 while rows are kept at unit norm
            penalty = self._row_sum(torch.tanh(cfg.jumprelu_tanh_scale * f * norms)).mean()
            # π detached: the pre-activation term pulls only the thresholds (and ‖W_dec,i‖), see the class docstring
            pre_act = self._row_sum((theta - pre.detach()).relu() * norms).mean()
            parts["l0"] = cfg.l1_coefficient * sparsity_scale * penalty
            parts["pre_act"] = cfg.jumprelu_pre_act_coefficient * pre_act
        else:
            l0 = self._row_sum(_Step.apply(pre, theta, eps)).mean()
            parts["l0"] = cfg.l1_coefficient * sparsity_scale * l0
        active = f.detach() > 0
        return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)

    @torch.no_grad()
    def _encoder_pass_latent_major(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(π [d_sae, batch] contiguous, i.e. latent-major, sae_in [batch, d_in]) of a training batch, without
        autograd: `_encoder_pass` with its output transposed in memory (the same GEMM, b_enc added along rows)."""
        sae_in = self._sae_in(x)
        return torch.addmm(self.b_enc[:, None], self.W_enc.t(), sae_in.t()), sae_in

    def _fused_tanh_loss(self, x: Tensor, y: Tensor, pre_t: Tensor, sae_in: Tensor, theta: Tensor, eps: float,
                         entries: LatentMajorEntries, sparsity_scale: float) -> TrainOutput:
        cfg = self.cfg
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        step = _TanhStep.apply(pre_t, sae_in, self.W_enc, self.b_enc, b_dec, theta, self.W_dec,
                               cfg.jumprelu_tanh_scale, eps, entries, entries.wide)
        return fused_tanh_output(self, x, y, step, sparsity_scale)

    @torch.no_grad()
    def init_thresholds_(self, x: Tensor, rate: float, latents: Tensor | None = None) -> None:
        """Set θ from the sample x [n, d_in] so that every latent starts firing on ~rate of the rows
        (`start_thresholds`; the trainer passes target L0 / d_sae under --target-l0): the run starts at its target
        sparsity, as TopK does, instead of spending its first ~100 steps leaving a dense start. latents: [m] indices
        to set (each at its own quantile, uncapped: dead-latent resampling, training/resample.py); None: all."""
        if latents is None:
            theta = start_thresholds(self._sae_in(x), self.W_enc, self.b_enc, rate)
            self.log_threshold.copy_(theta.clamp_min(1e-6).log())  # θ > 0
            return
        theta = start_thresholds(self._sae_in(x), self.W_enc[:, latents], self.b_enc[latents], rate, cap=False)
        self.log_threshold[latents] = theta.clamp_min(1e-6).log()

    def _fold_extra_(self, scale: float) -> None:
        self.log_threshold.sub_(math.log(scale))

    def state_tensors(self) -> dict[str, Tensor]:
        """W_enc, b_enc, W_dec, b_dec, threshold [d_sae] and log_threshold [d_sae]."""
        return {**super().state_tensors(), "threshold": self.threshold.detach(), "log_threshold": self.log_threshold}

    def load_state_tensors_(self, tensors: dict[str, Tensor]) -> None:
        if "log_threshold" not in tensors and "threshold" in tensors:
            # a file written by another tool: only θ is known
            tensors = {**tensors, "log_threshold": tensors["threshold"].float().clamp_min(1e-30).log()}
        tensors = {**tensors, "threshold": self.threshold.detach()}  # derived, not loaded
        super().load_state_tensors_(tensors)
