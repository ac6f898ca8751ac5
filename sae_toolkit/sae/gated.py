"""Gated SAEs (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"), trained
with the JumpReLU tanh recipe (default) or the paper's L1 + auxiliary loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import kernels
from sae_toolkit.sae.base import SAE, SAEConfig, TrainOutput
from sae_toolkit.sae.jumprelu import _Step, fused_entries, fused_tanh_output, start_thresholds
from sae_toolkit.sae.registry import register

PROJECT_GATE_SHARE = 0.75
"""`GatedSAE.project_` closes the gap τ > 0 between the magnitude's threshold and the gate's this much from the gate's
side (b_gate −= share·τ) and the rest from the magnitude's (b_mag += (1 − share)·e^{r_mag}·τ)."""


class _GatedTanhStep(Function):
    """Gated's tanh-recipe step from precomputed gate pre-activations π = W_encᵀx̃ + b_gate, backward written out
    sparse (the Gated counterpart of `jumprelu._TanhStep`).

    Forward (no autograd inside), on U = {π > −ε/2} (flat row-major indices `flat_u`; with `wide` U = {π ≥ 0} and the
    backward takes the band below the gate from `pre` as one GEMM), less the entries whose magnitude is ≤ 0
    (`GatedSAE._fused_entries`; `partial`: open gates among them, so the pre-activation term's per-latent sums are
    taken over `pre`): f = ReLU(π_mag)·1[π > 0] with π_mag = e^{r_mag}(π − b_gate) + b_mag;
    returns (f W_dec [batch, d_out], Σ tanh(c·f), Σ ReLU(−π), fired [d_sae] bool, number of open gates). The same
    values and gradients as the composed graph in `GatedSAE.training_loss`:
    - ∂L/∂f is one dot product g[row]·W_dec[col] per entry with π ≥ 0; the gate's estimator (∂/∂b_gate =
      (1/ε) Σ_{|π| < ε/2} ∂L/∂H, ∂L/∂H = g·W_dec,i·ReLU(π_mag) + g_pen·tanh(c·ReLU(π_mag))) takes the band below the
      gate as bag sums of g's rows per latent, weighted by ReLU(π_mag), plus per-latent sums of tanh(c·ReLU(π_mag)),
    - the pre-activation term sees W_encᵀx̃ detached (`GatedSAE`): its gradient is −#{b: π < 0} on b_gate only, and
      its value Σ_b ReLU(−π) = −Σ_b π + Σ_{π ≥ 0} π takes Σ_b π as a matvec.
    """

    @staticmethod
    def forward(ctx, pre, sae_in, W_enc, b_enc, b_dec, r_mag, b_mag, W_dec, c, eps, flat_u, wide, partial):
        n_rows, d_sae = pre.shape
        rows, cols = flat_u // d_sae, flat_u % d_sae
        z = pre.reshape(-1).index_select(0, flat_u)  # π on U
        s = kernels.flat_nonzero(z >= 0)  # S: ReLU(−π) = 0 there; ⊇ the open gates (equal only if π = 0)
        s_rows, s_cols, s_z = rows[s], cols[s], z[s]
        e_r = r_mag.exp()
        mag = (s_z - b_enc.index_select(0, s_cols)) * e_r.index_select(0, s_cols) + b_mag.index_select(0, s_cols)
        f = mag.relu() * (s_z > 0)
        dec = kernels.bag_sum(W_dec, s_cols, kernels.row_offsets(s_rows, n_rows), f)
        t = torch.tanh(c * f)
        if partial:  # U leaves out open gates whose magnitude is ≤ 0: the pre-activation term's sums over `pre`
            relu_sum = pre.clamp(max=0).sum(0).neg_()  # [d_sae] Σ_b ReLU(−π)
            n_lt = (pre < 0).sum(0).to(b_enc.dtype)  # [d_sae] #{b: π < 0}
        else:  # U holds every π ≥ 0: Σ_b ReLU(−π) = −Σ_b π + Σ_S π, with Σ_b π a matvec
            pi_sum = sae_in.sum(0).to(W_enc.dtype) @ W_enc + n_rows * b_enc  # [d_sae] Σ_b π
            relu_sum = (torch.zeros_like(b_enc).index_add_(0, s_cols, s_z) - pi_sum).clamp_min_(0)
            n_lt = n_rows - torch.bincount(s_cols, minlength=d_sae).to(b_enc.dtype)
        opened = f > 0
        fired = torch.zeros(d_sae, dtype=torch.bool, device=pre.device).index_fill_(0, s_cols[opened], True)
        ctx.save_for_backward(sae_in, W_enc, b_enc, b_mag, W_dec, e_r, rows, cols, z, s, s_rows, s_cols, mag, f, t,
                              n_lt, pre if wide else None)
        ctx.c, ctx.eps, ctx.has_b_dec = c, eps, b_dec is not None
        ctx.mark_non_differentiable(fired)
        return dec, t.sum(), relu_sum.sum(), fired, opened.sum()

    @staticmethod
    def backward(ctx, g_dec, g_pen, g_pre, _fired, _n_open):
        (sae_in, W_enc, b_enc, b_mag, W_dec, e_r, rows, cols, z, s, s_rows, s_cols, mag, f, t, n_lt,
         pre) = ctx.saved_tensors
        n_rows, d_sae, c, eps = sae_in.shape[0], b_enc.shape[0], ctx.c, ctx.eps
        g_dec = g_dec.contiguous()
        # S's entries in column order (what the ∂W_enc and ∂W_dec bag sums need, and the dot products run faster so)
        t_s = kernels.transposed(kernels.SparseActs(f, s_rows, s_cols, n_rows), d_sae)
        s_o = s.index_select(0, t_s.order)  # positions in U
        cols_o, z_o = cols.index_select(0, s_o), z.index_select(0, s_o)
        f_o, t_o, mag_o = (v.index_select(0, t_s.order) for v in (f, t, mag))
        # ∂L/∂f on S: the reconstruction's g·W_dec,i plus the tanh term's g_pen·c·sech²
        g_w = kernels.gather_dot_by_column(g_dec, W_dec, t_s.rows, cols_o).to(z.dtype)
        dldf = g_w + (g_pen * c) * (1 - t_o * t_o)
        # the gate's estimator over its band: ∂L/∂H = g·W_dec,i·ReLU(π_mag) + g_pen·tanh(c·ReLU(π_mag)) (the
        # penalty's whole jump); below the gate only as per-latent sums W_dec,i · Σ_b ReLU(π_mag)·g_b (bag sums of
        # g's rows, or one GEMM for a wide band) + g_pen·Σ_b tanh(c·ReLU(π_mag))
        if pre is not None:
            # ReLU(π_mag) = ReLU(e^r·π + b_mag − e^r·b_gate) on the band −ε/2 < π < 0, zero elsewhere
            w = torch.addcmul(b_mag - e_r * b_enc, pre, e_r).relu_().mul_((pre < 0) & (pre > -eps / 2))
            g_band = w.to(W_dec.dtype).t() @ g_dec.to(W_dec.dtype)  # [d_sae, d_out]: Σ_b ReLU(π_mag)·g_b in one GEMM
            jump_sum = w.mul_(c).tanh_().sum(0)
        else:
            below = kernels.flat_nonzero((z < 0) & (z > -eps / 2))
            l_cols, l_z = cols.index_select(0, below), z.index_select(0, below)
            l_w = ((l_z - b_enc.index_select(0, l_cols)) * e_r.index_select(0, l_cols)
                   + b_mag.index_select(0, l_cols)).relu_()
            order = kernels.argsort_keys(l_cols, d_sae)
            g_band = kernels.bag_sum(g_dec.to(W_dec.dtype), rows.index_select(0, below).index_select(0, order),
                                     kernels.row_offsets(l_cols.index_select(0, order), d_sae),
                                     l_w.index_select(0, order))  # [d_sae, d_out]
            jump_sum = torch.zeros_like(b_enc).index_add_(0, l_cols, l_w.mul_(c).tanh_())
        band_o = z_o < eps / 2
        mag_b = mag_o[band_o].relu()
        band_sum = (g_band.mul_(W_dec).sum(-1).to(b_enc.dtype) + g_pen * jump_sum.to(b_enc.dtype)).index_add_(
            0, cols_o[band_o], g_w[band_o] * mag_b + g_pen * torch.tanh(c * mag_b))
        dm = dldf * (f_o > 0)  # ∂L/∂π_mag on S: f = ReLU(π_mag) where the gate is open
        e_o = e_r.index_select(0, cols_o)
        grad_r = torch.zeros_like(e_r).index_add_(0, cols_o, dm * (z_o - b_enc.index_select(0, cols_o)) * e_o)
        grad_b_mag = torch.zeros_like(b_mag).index_add_(0, cols_o, dm)
        grad_b_enc = band_sum / eps - g_pre * n_lt  # π_mag's (π − b_gate) leaves b_gate no gradient
        dpi = dm * e_o  # ∂π on S, from π_mag (the pre-activation term sees W_encᵀx̃ detached: b_gate only)
        bag = kernels.bag_sum(sae_in.to(W_enc.dtype), t_s.rows, t_s.offsets, dpi)
        grad_W_enc = kernels.in_layout(bag, W_enc)
        grad_b_dec = None
        if ctx.has_b_dec and ctx.needs_input_grad[4]:  # x̃ = x − b_dec: −W_enc Σ_b ∂π_b
            grad_b_dec = -(torch.zeros_like(b_enc).index_add_(0, cols_o, dpi) @ W_enc.t())
        grad_W_dec = kernels.bag_sum(g_dec.to(W_dec.dtype), t_s.rows, t_s.offsets, f_o)
        return (None, None, grad_W_enc, grad_b_enc, grad_b_dec, grad_r, grad_b_mag, grad_W_dec, None, None, None,
                None, None)


@register
class GatedSAE(SAE):
    """f = 1[π_gate > 0] ⊙ ReLU(π_mag),  x̂ = W_decᵀ f + b_dec, with x̃ = x − b_dec and
    π_gate = W_encᵀx̃ + b_enc  (W_enc is the paper's W_gate, b_enc its b_gate),
    π_mag  = exp(r_mag) ⊙ (W_encᵀx̃) + b_mag  (magnitude weights tied to the gate's, rescaled per latent).

    With tied weights the gate opens where π_mag > θ = b_mag − exp(r_mag)·b_gate: a Gated SAE is a JumpReLU with
    per-latent thresholds, and by default (cfg.gated_loss="tanh") it trains like one, with the JumpReLU tanh recipe
        ‖x − x̂‖² + λ Σᵢ tanh(c·fᵢ) + λ_P Σᵢ ReLU(−π_gate,i)   (W_encᵀx̃ detached there: it trains b_gate only),
    the gate's Heaviside H(π_gate) passing a straight-through gradient to b_gate (rectangle kernel of width ε, as
    JumpReLU's threshold; c, ε, λ_P are the jumprelu_* fields; decoder rows have unit norm) and b_gate starting at
    −jumprelu_init_threshold (under --target-l0 from data, `init_thresholds_`). The estimator charges an opening
    gate the penalty's whole jump tanh(c·ReLU(π_mag)) (the penalty written tanh(c·ReLU(π_mag))·H(π_gate), equal in
    value), not its slope at 0 times the jump, c·ReLU(π_mag): that overcharged latents with a large magnitude at
    the gate c·ReLU(π_mag)/tanh(c·ReLU(π_mag)) times (≈ 7× at the typical 1.9) and left 2.8 % of them dead at
    L0 16 on SmolLM2. After every optimizer step `project_` keeps the magnitude positive wherever the gate opens.
    gated_loss="l1" is the paper's
        ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖²,
    the last term decoding with a detached copy of W_dec and b_dec so only the gate path learns from it; its L1
    trains the shared W_enc like a ReLU SAE's, which on SmolLM2 activations cost it ~0.1 EV against the tanh
    recipe. Saved extras: r_mag [d_sae], b_mag [d_sae]. On eager CPU the tanh step runs as one Function
    (`_GatedTanhStep`) once few gates are open (`jumprelu.fused_entries`).
    """

    archs = ("gated",)

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=self.W_enc.dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=self.W_enc.dtype))
        if cfg.gated_loss == "tanh":
            # the gate opens where W_encᵀx̃ > −b_gate: start every latent at JumpReLU's initial threshold
            self.b_enc.data.fill_(-cfg.jumprelu_init_threshold)

    @property
    def steering_lr_scales(self) -> dict[str, float]:
        """lr factors under --target-l0 (training.trainer.param_groups): with the tanh loss b_gate is the
        threshold, and learns 3× faster so that the L0 follows the steered λ (JumpReLU's θ: 10×, see
        JumpReLUSAE.steering_lr_scales). Not 10×: where `project_` has tied a latent's two thresholds (its jump at
        the gate is 0, so neither the estimator nor the penalty pushes its gate shut) Adam turns the pre-activation
        term's small pull on b_gate into full steps, and at 10× the gates ratcheted open (toy, target L0 3: b_gate
        median −1.3 → +2.5, L0 4.2); at 1× the L0 lagged λ (SmolLM2 L0 16: 20.6 on the last batches, 54.4 for 64)."""
        return {"b_enc": 3.0} if self.cfg.gated_loss == "tanh" else {}

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[..., d_in] → (π_gate, π_mag), each [..., d_sae]."""
        h = self._sae_in(x) @ self.W_enc
        return h + self.b_enc, h * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae]: ReLU(π_mag) where the gate is open, else 0."""
        gate, mag = self._paths(x)
        return (gate > 0) * mag.relu()

    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one batch x [batch, d_in]; parts {"mse", "l0", "pre_act"} (gated_loss="tanh") or {"mse", "l1",
        "aux"} ("l1"); λ·sparsity_scale on the sparsity term. dead_mask unused. MSE (and aux) = mean over the batch
        of ‖·‖² summed over d_in."""
        if x.ndim != 2:
            raise SAEToolkitError(f"training_loss takes a [batch, d_in] batch, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        y = self._target(x, target)
        cfg = self.cfg
        computed = self._encoder_pass(x)  # π_gate [batch, d_sae], x̃; no autograd yet
        if cfg.gated_loss == "tanh":
            entries, partial = self._fused_entries(computed[0])
            if entries is not None:
                return self._fused_tanh_loss(x, y, *computed, *entries, partial, sparsity_scale)
        gate = self._pre_acts_with_grad(x, computed)  # π_gate with grad; sparse ∂W_enc once few gates are open
        h = gate - self.b_enc  # W_encᵀx̃
        mag = h * self.r_mag.exp() + self.b_mag  # π_mag: the same W_enc product, rescaled
        skip = self.skip_out(x) if cfg.skip else 0.0  # [batch, d_out]
        if cfg.gated_loss == "tanh":
            # H(π_gate) = H(h − (−b_gate)); the step's estimator sends ∂/∂b_gate = (1/ε)·K(π_gate/ε)·∂L/∂H, and
            # ∂L/∂H = ReLU(π_mag)·∂L/∂f for the reconstruction (JumpReLU's −(θ/ε)·K·∂L/∂f with the jump ReLU(π_mag)
            # at the gate) and the penalty's whole jump tanh(c·ReLU(π_mag)), written so: tanh(c·f) = tanh(c·m)·H
            opened = _Step.apply(h, -self.b_enc, cfg.jumprelu_bandwidth)
            f = mag.relu() * opened
            x_hat = kernels.adaptive_decode(f, self.W_dec) + self.b_dec + skip
            penalty = self._row_sum(torch.tanh(cfg.jumprelu_tanh_scale * mag.relu()) * opened).mean()
            parts = {
                "mse": self._mse(y, x_hat),
                "l0": cfg.l1_coefficient * sparsity_scale * penalty,
                # h detached: the term pulls only the gate's threshold −b_gate (as JumpReLU's pulls only θ)
                "pre_act": cfg.jumprelu_pre_act_coefficient * self._row_sum((-(h.detach() + self.b_enc)).relu()).mean(),
            }
            active = f.detach() > 0
            return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)
        f = (gate > 0) * mag.relu()
        x_hat = kernels.adaptive_decode(f, self.W_dec) + self.b_dec + skip
        gate_acts = gate.relu()
        x_hat_frozen = kernels.adaptive_decode(gate_acts, self.W_dec.detach()) + self.b_dec.detach() + (
            skip.detach() if cfg.skip else 0.0)
        parts = {
            "mse": self._mse(y, x_hat),
            "l1": cfg.l1_coefficient * sparsity_scale * self._row_sum(gate_acts).mean(),
            "aux": self._mse(y, x_hat_frozen),
        }
        active = f.detach() > 0
        return TrainOutput(sum(parts.values()), x_hat, active.any(0), active.sum(-1).float().mean(), parts)

    @torch.no_grad()
    def project_(self) -> None:
        """gated_loss="tanh": where the magnitude's threshold lies above the gate's (τ = b_gate − b_mag·e^{−r_mag} > 0,
        on the W_encᵀx̃ scale −b_mag·e^{−r} > −b_gate), move both to one point, ¾ of the way from the gate's:
        b_gate −= ¾τ, b_mag += e^r·τ/4 (PROJECT_GATE_SHARE). Then τ = 0: the magnitude is positive wherever the
        gate opens, a latent fires exactly where its gate opens, and the gate's threshold is the one the estimator
        and the pre-activation term train. The trainer calls it after every optimizer step.

        Why: unconstrained, b_gate drifts up (median +1.8 at L0 92 on SmolLM2, 48 % of the gates open) and ReLU(π_mag)
        does the selecting. A latent whose magnitude is ≤ 0 wherever its gate opens gets no gradient from the
        reconstruction, the penalty, the gate's estimator (its jump ReLU(π_mag) at the gate is 0) or the
        pre-activation term (on b_gate), and stays dead. Why both: raising b_mag alone let the
        pre-activation term ratchet b_gate and b_mag up together (the penalty cannot push a latent with a zero
        jump shut; on the toy L0 ran away from its target), lowering b_gate alone left the magnitude's threshold
        without a pull (1.7 % dead at L0 32 on SmolLM2). Why ¾ rather than the midpoint: moving the magnitudes less
        kept issue 11's toy at MMCS 0.964 / 0.964 (seeds 0 / 1; midpoint 0.954 / 0.948) with 0.2 % dead at L0 32."""
        if self.cfg.gated_loss == "tanh":
            tau = (self.b_enc - self.b_mag * (-self.r_mag).exp()).clamp_(min=0)  # [d_sae] τ where τ > 0, else 0
            self.b_enc.sub_(PROJECT_GATE_SHARE * tau)
            self.b_mag.add_(tau.mul_((1 - PROJECT_GATE_SHARE) * self.r_mag.exp()))

    @torch.no_grad()
    def _fused_entries(self, gate: Tensor) -> tuple[tuple[Tensor, bool] | None, bool]:
        """`jumprelu.fused_entries` of the gate pre-activations [batch, d_sae], without the entries whose magnitude
        π_mag = e^r(π − b_gate) + b_mag is ≤ 0 (f = 0 and no gradient: ReLU(π_mag) weighs the gate's estimator),
        i.e. π ≤ τ = b_gate − b_mag·e^{−r}; and whether that leaves out open gates (some τ ≥ 0).

        Why: trained with the tanh recipe on SmolLM2, b_gate drifts up until most gates are open (48 % at L0 89) and
        ReLU(π_mag) does the selecting; counted by the gates alone every step took the composed graph."""
        if not kernels.host_syncs_ok(gate):  # GPU, torch.compile: the composed graph, and no host sync for it
            return None, False
        tau = self.b_enc - self.b_mag * (-self.r_mag).exp()
        floor = tau - 1e-5 * tau.abs() - 1e-6  # a hair below τ: an entry at the edge is kept, whatever the rounding
        entries = fused_entries(gate, 0.0, self.cfg.jumprelu_bandwidth, floor)
        return entries, entries is not None and bool((floor >= 0).any())

    def _fused_tanh_loss(self, x: Tensor, y: Tensor, pre: Tensor, sae_in: Tensor, flat_u: Tensor, wide: bool,
                         partial: bool, sparsity_scale: float) -> TrainOutput:
        cfg = self.cfg
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        step = _GatedTanhStep.apply(
            pre, sae_in, self.W_enc, self.b_enc, b_dec, self.r_mag, self.b_mag, self.W_dec, cfg.jumprelu_tanh_scale,
            cfg.jumprelu_bandwidth, flat_u, wide, partial)
        return fused_tanh_output(self, x, y, step, sparsity_scale)

    @torch.no_grad()
    def init_thresholds_(self, x: Tensor, rate: float, latents: Tensor | None = None) -> None:
        """gated_loss="tanh": set b_gate from the sample x [n, d_in] so that every gate starts open on ~rate of the
        rows (`jumprelu.start_thresholds` of W_encᵀx̃, as JumpReLUSAE.init_thresholds_). latents: [m] indices to set
        (uncapped, as JumpReLU's); None: all. No-op for "l1"."""
        if self.cfg.gated_loss != "tanh":
            return
        if latents is None:
            self.b_enc.copy_(-start_thresholds(self._sae_in(x), self.W_enc, None, rate))
        else:
            self.b_enc[latents] = -start_thresholds(self._sae_in(x), self.W_enc[:, latents], None, rate, cap=False)

    def _fold_extra_(self, scale: float) -> None:
        self.b_mag.div_(scale)

    def state_tensors(self) -> dict[str, Tensor]:
        """W_enc (= W_gate), b_enc (= b_gate), W_dec, b_dec, r_mag, b_mag."""
        return {**super().state_tensors(), "r_mag": self.r_mag, "b_mag": self.b_mag}
