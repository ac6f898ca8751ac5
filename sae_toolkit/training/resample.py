"""Dead-latent resampling (Anthropic, "Towards Monosemanticity" 2023, appendix on neuron resampling), for ReLU SAEs,
and its counterpart for the thresholded SAEs (JumpReLU, Gated with the tanh recipe).

ReLU: each dead latent is re-pointed at an input the SAE reconstructs badly: inputs are drawn with probability
proportional to the square of their reconstruction loss; the decoder row becomes that input (centred by b_dec)
at unit norm, the encoder column the same direction at 0.2 × the mean encoder norm of live latents, the
encoder bias 0 — and the Adam moments of the touched entries are zeroed so stale momentum does not undo it.

JumpReLU / Gated (`resample_thresholded_`): dead latents, and starving ones (firing on under STARVING_RATE of the
sample), are re-pointed at the residual x − x̂ of inputs drawn in proportion to their reconstruction
loss (without replacement). The decoder row is that unit residual direction d; the encoder column is d with the span
of the high-norm rows projected out (OUTLIER_DIMS), so that π = d'·(x − b_dec); the threshold (JumpReLU θ, Gated
−b_gate) is set from the sample so that the latent fires on NEW_RATE_SHARE of the run's rate (`init_thresholds_`, as
every latent starts under --target-l0). Adam: momentum zeroed, second moment set to the live latents' mean.

Why each piece (SmolLM2 mlp_out.9, JumpReLU, L0 16, 500k tokens; training FVU ~0.16 before a resampling point):
- A thresholded latent dies when its θ ends above every pre-activation it sees; from then nothing but the
  pre-activation term's small pull reaches it. Of the latents dead on held-out rows ~95 % never trained (decoder at
  cos 0.998 to its random start) although the trainer's window (tokens / 8) counted them alive: they fired on a
  handful of rows. Hence the starving criterion, measured on the sample.
- 1 % of the rows have norms 6–17× the median; the top quantile of a latent's π is set by them unless the encoder
  is orthogonal to them: without the projection every resampled latent fired on the same high-norm rows (training
  FVU 0.16 → 1.2–5.8 at the resampling step). With it the sample's FVU is unchanged by the resampling.
- Residual rather than input directions (an input's direction doubles what the live latents already reconstruct
  along it); π at full scale (at 0.2× the tanh penalty, in its steep range, closed the new latents again).
- A zeroed second moment makes the next steps ~lr/sqrt(1 − β₂ᵗ) per entry (~15 lr at a quarter of a 488-step run),
  which threw the new encoder columns off their direction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_toolkit.sae import SAE


@torch.no_grad()
def resample_dead_latents_(sae: SAE, optimizer: torch.optim.Optimizer, dead: Tensor, inputs: Tensor,
                           generator: torch.Generator) -> int:
    """Re-initialise the latents where `dead` [d_sae] bool is set; returns how many were resampled.

    inputs: [n, d_in] candidate inputs, in the units the SAE is trained on. generator: a CPU generator, so the
    choice of inputs is reproducible and saved with checkpoints.
    """
    dead = dead.to(sae.W_dec.device)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    x = inputs.to(sae.W_dec.device, sae.W_dec.dtype)
    losses = (x - sae(x).x_hat).pow(2).sum(-1)  # [n]
    weights = losses.pow(2).double().cpu()
    if not weights.sum() > 0:
        return 0  # every input is reconstructed exactly: nothing to point the dead latents at
    picked = torch.multinomial(weights, n_dead, replacement=True, generator=generator).to(x.device)
    # Centred by b_dec because the encoder sees x − b_dec; the direction is then what the latent should detect.
    directions = x[picked] - sae.b_dec  # [n_dead, d_in]
    directions /= directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0, device=x.device)
    idx = dead.nonzero().squeeze(-1)
    sae.W_dec[idx] = directions
    sae.W_enc[:, idx] = directions.T * (0.2 * enc_norm)
    sae.b_enc[idx] = 0.0
    for param, select in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        for key in ("exp_avg", "exp_avg_sq"):
            moment = optimizer.state.get(param, {}).get(key)
            if moment is not None:
                moment[select] = 0.0
    return n_dead


NEW_RATE_SHARE = 0.1
"""A resampled latent's threshold is set so that it fires on this share of the run's rate. At the full rate the new
latents, all pointed at badly reconstructed rows, fired together on those rows and overshot them: at L0 32 the 429
latents resampled at 3/4 of the run took the training FVU from 0.11 to 6.9, with no time left to recover (held-out EV
0.833 against 0.880 unresampled); at a quarter 0.873, at a tenth 0.878 (L0 16: 0.865, as unresampled)."""
STARVING_RATE = 3.5e-4
"""A latent firing on fewer than this share of the sample's rows counts as dead: 5 or fewer of 16k rows, an expected
~4 on a ~10k-row held-out check, which sees many such latents dead. Absolute, not a share of the target rate: at a
tenth of the target rate (the same at L0 16 of 4608 latents) the L0-32 run resampled 194/359/715 latents that were
learning and lost 0.036 held-out EV."""
OUTLIER_MULTIPLE = 4.0
"""Rows whose ‖x − b_dec‖ exceeds this multiple of the sample's median are the high-norm rows."""
OUTLIER_DIMS = 8
"""The leading right-singular directions of the (unit) high-norm rows projected out of a resampled encoder column."""


@torch.no_grad()
def resample_thresholded_(sae: SAE, optimizer: torch.optim.Optimizer, dead: Tensor, inputs: Tensor,
                          generator: torch.Generator, rate: float | None = None) -> int:
    """Re-initialise the dead latents (`dead` [d_sae] bool) and the starving ones (STARVING_RATE) of a JumpReLU or
    tanh-Gated SAE so each fires on ~NEW_RATE_SHARE · rate of `inputs` [n, d_in]; returns how many were resampled.
    rate: the run's firing rate (target L0 / d_sae); None takes the SAE's mean L0 on inputs / d_sae. generator: a CPU
    generator (reproducible, saved with checkpoints)."""
    x = inputs.to(sae.W_dec.device, sae.W_dec.dtype)
    f = sae.encode(x)
    if rate is None:
        rate = float((f > 0).float().mean())
    rate = min(max(rate, 1.0 / x.shape[0]), 0.5)  # at least one row of the sample
    dead = dead.to(x.device) | ((f > 0).sum(0) < max(1.0, STARVING_RATE * x.shape[0]))
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    residual = x - sae.decode(f)  # [n, d_in]
    weights = residual.pow(2).sum(-1).double().cpu()  # [n] reconstruction loss
    if not weights.sum() > 0:
        return 0  # every input is reconstructed exactly: nothing to point the dead latents at
    n_pick = min(n_dead, int((weights > 0).sum()))
    picked = torch.multinomial(weights, n_pick, replacement=False, generator=generator)
    if n_pick < n_dead:  # fewer badly reconstructed inputs than dead latents: the rest share them
        picked = torch.cat([picked, torch.multinomial(weights, n_dead - n_pick, replacement=True, generator=generator)])
    directions = residual[picked.to(x.device)]  # [n_dead, d_in]
    directions /= directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    idx = dead.nonzero().squeeze(-1)
    sae.W_dec[idx] = directions
    sae.W_enc[:, idx] = _without_high_norm_span(directions, x - sae.b_dec).T
    # π = d'·(x − b_dec): the encoder subtracts b_dec itself, or its bias does (b_enc; Gated: the magnitude's b_mag)
    offset = 0.0 if sae.cfg.apply_b_dec_to_input else -(sae.W_enc[:, idx].T @ sae.b_dec)
    if hasattr(sae, "b_mag"):
        sae.r_mag[idx] = 0.0
        sae.b_mag[idx] = offset
    else:
        sae.b_enc[idx] = offset
    sae.init_thresholds_(x, rate * NEW_RATE_SHARE, latents=idx)
    alive = ~dead
    for name, param in sae.named_parameters():
        dim = 1 if name == "W_enc" else 0 if param.shape[:1] == (sae.cfg.d_sae,) else None
        state = optimizer.state.get(param, {})
        if dim is None:
            continue
        if "exp_avg" in state:
            state["exp_avg"].index_fill_(dim, idx, 0.0)
        if "exp_avg_sq" in state and alive.any():
            sq = state["exp_avg_sq"]
            live = sq.index_select(dim, alive.nonzero().squeeze(-1)).mean(dim, keepdim=True)
            sq.index_copy_(dim, idx, live.expand_as(sq.index_select(dim, idx)).contiguous())
    return n_dead


def _without_high_norm_span(directions: Tensor, centred: Tensor) -> Tensor:
    """[m, d_in] unit directions with the OUTLIER_DIMS leading directions of the high-norm rows of centred [n, d_in]
    projected out, renormalized."""
    norms = centred.norm(dim=-1)
    high = centred[norms > OUTLIER_MULTIPLE * norms.median()]
    if high.shape[0] == 0:
        return directions
    basis = torch.linalg.svd(high / high.norm(dim=-1, keepdim=True), full_matrices=False).Vh[:OUTLIER_DIMS]
    out = directions - (directions @ basis.T) @ basis
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-8)
