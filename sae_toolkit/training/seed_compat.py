"""The seed tutorial's `LLMSparseAutoencoder` and `train_llm_sae`, kept as thin wrappers over the package.

Code written against the tutorial keeps working, but the model is the package's ReLU SAE and each update is
the trainer's `train_step` (parallel-gradient removal + decoder renormalisation every step):

    >>> import numpy as np
    >>> sae = LLMSparseAutoencoder(d_model=16, n_features=64, l1_coeff=1e-3)
    >>> history = train_llm_sae(sae, np.random.randn(256, 16).astype(np.float32), n_epochs=2, batch_size=64,
    ...                         verbose=False)
    >>> x_hat, z = sae(torch.randn(4, 16))
    >>> sorted(history[-1])
    ['dead_feature_frac', 'l0_per_token', 'l1_loss', 'loss', 'recon_loss']

Differences from the tutorial, on purpose: the pre-encoder bias is b_dec itself (`b_pre` is an alias of it),
as in Towards Monosemanticity; and the package's loss sums the squared error over d_model, so training uses the
tutorial's objective times d_model (the same minimiser; Adam is invariant to that scale), with λ mapped to
l1_coeff · d_model / n_features so that `sae.loss` still reports exactly the tutorial's numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE, SAEConfig, make_sae
from sae_toolkit.training.trainer import train_step


class LLMSparseAutoencoder(nn.Module):
    """The tutorial's SAE: `x_hat, z = sae(x)`, `sae.loss(x, x_hat, z)` → dict; backed by the package's ReLU SAE.

    loss = mean((x − x̂)²) + l1_coeff · mean(|z|), decoder rows unit norm.
    """

    def __init__(self, d_model: int, n_features: int, l1_coeff: float = 1e-3):
        """d_model: activation width. n_features: number of SAE latents. l1_coeff: the tutorial's λ."""
        super().__init__()
        if l1_coeff < 0:
            raise SAEToolkitError(f"l1_coeff={l1_coeff!r} must be non-negative")
        self.d_model = d_model
        self.n_features = n_features
        self.l1_coeff = l1_coeff
        self.sae: SAE = make_sae(SAEConfig(arch="relu", d_in=d_model, d_sae=n_features,
                                           l1_coefficient=l1_coeff * d_model / n_features))

    # Parameters under the tutorial's names (the same tensors as the inner SAE's).
    @property
    def W_enc(self) -> nn.Parameter:
        return self.sae.W_enc

    @property
    def b_enc(self) -> nn.Parameter:
        return self.sae.b_enc

    @property
    def W_dec(self) -> nn.Parameter:
        return self.sae.W_dec

    @property
    def b_dec(self) -> nn.Parameter:
        return self.sae.b_dec

    @property
    def b_pre(self) -> nn.Parameter:
        """The tutorial's pre-encoder bias; here it is b_dec (subtracted before encoding, added after decoding)."""
        return self.sae.b_dec

    @torch.no_grad()
    def _normalize_decoder(self) -> None:
        self.sae.normalize_decoder_()

    def encode(self, x: Tensor) -> Tensor:
        """[n, d_model] → [n, n_features] non-negative sparse codes."""
        return self.sae.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        """[n, n_features] → [n, d_model]."""
        return self.sae.decode(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[n, d_model] → (x_hat [n, d_model], z [n, n_features])."""
        out = self.sae(x)
        return out.x_hat, out.feature_acts

    def loss(self, x: Tensor, x_hat: Tensor, z: Tensor) -> dict[str, Tensor]:
        """The tutorial's loss dict: loss, recon_loss, l1_loss, l0_per_token, dead_feature_frac."""
        recon = (x - x_hat).pow(2).mean()
        sparsity = self.l1_coeff * z.abs().mean()
        with torch.no_grad():
            l0 = (z > 0).float().sum(-1).mean()
            dead = (z.max(dim=0).values <= 0).float().mean()
        return {"loss": recon + sparsity, "recon_loss": recon, "l1_loss": sparsity, "l0_per_token": l0,
                "dead_feature_frac": dead}

    def get_top_activating_examples(self, z: Tensor, feature_idx: int, top_k: int = 10) -> tuple[Tensor, Tensor]:
        """Indices and values of the `top_k` rows of z [n, n_features] where latent `feature_idx` is largest."""
        acts = z[:, feature_idx]
        idx = acts.topk(min(top_k, len(acts))).indices
        return idx, acts[idx]


def train_llm_sae(sae: LLMSparseAutoencoder, activations: np.ndarray, n_epochs: int = 10, batch_size: int = 4096,
                  lr: float = 5e-4, *, device: str = "auto", seed: int = 0, verbose: bool = True) -> list[dict]:
    """Train on activations [n_tokens, d_model] for n_epochs of shuffled batches; one dict of epoch means per epoch.

    Each update is the package trainer's `train_step`. The dict keys are the tutorial's
    (loss, recon_loss, l1_loss, l0_per_token, dead_feature_frac), in the tutorial's units.
    """
    from sae_toolkit.units import resolve_device

    acts = np.asarray(activations)
    if acts.ndim != 2 or acts.shape[1] != sae.d_model:
        raise SAEToolkitError(f"activations have shape {acts.shape}; expected [n_tokens, {sae.d_model}]")
    if not np.isfinite(acts).all():
        raise SAEToolkitError("activations contain NaN or inf; clean them before training")
    dev = torch.device(resolve_device(device))
    sae.to(dev)
    x_all = torch.as_tensor(acts, dtype=torch.float32, device=dev)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    d = sae.d_model
    history = []
    for epoch in range(n_epochs):
        sums = {"loss": 0.0, "recon_loss": 0.0, "l1_loss": 0.0, "l0_per_token": 0.0, "dead_feature_frac": 0.0}
        order = torch.randperm(len(x_all), generator=gen).to(dev)
        n_batches = 0
        for i in range(0, len(x_all), batch_size):
            out = train_step(sae.sae, opt, x_all[order[i:i + batch_size]])
            # The package's parts are the tutorial's terms times d_model (see the module docstring).
            stats = {"loss": out.loss.item() / d, "recon_loss": out.parts["mse"].item() / d,
                     "l1_loss": out.parts["l1"].item() / d, "l0_per_token": out.l0.item(),
                     "dead_feature_frac": 1.0 - out.fired.float().mean().item()}
            for k, v in stats.items():
                sums[k] += v
            n_batches += 1
        avg = {k: v / n_batches for k, v in sums.items()}
        history.append(avg)
        if verbose:
            print(f"Epoch {epoch + 1}/{n_epochs} Loss={avg['loss']:.5f} Recon={avg['recon_loss']:.5f} "
                  f"L0={avg['l0_per_token']:.1f} Dead={avg['dead_feature_frac']:.1%}")
    return history
