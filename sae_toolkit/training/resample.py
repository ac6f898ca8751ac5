"""Dead-latent resampling (Anthropic, "Towards Monosemanticity" 2023, appendix on neuron resampling), for ReLU SAEs.

Each dead latent is re-pointed at an input the SAE reconstructs badly: inputs are drawn with probability
proportional to the square of their reconstruction loss; the decoder row becomes that input (centred by b_dec)
at unit norm, the encoder column the same direction at 0.2 × the mean encoder norm of live latents, the
encoder bias 0 — and the Adam moments of the touched entries are zeroed so stale momentum does not undo it.
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
