"""Peer SAE trainers for benchmarks/quality.py: EleutherAI sparsify's TopK, driven as its own trainer drives it.

Only used when `sparsify` is importable (a throwaway venv, never a project dependency):

    PYTHONPATH=$PWD /tmp/peers/bin/python benchmarks/quality.py --acts /tmp/q/acts.h5 --hookpoint mlp_out.9 --l0 32

What sparsify 1.3.3's `Trainer` does per step (sparsify/trainer.py, sparse_coder.py), reproduced here on the rows
our store serves (same training rows, batches and order as our runs; raw activations, as sparsify sees them):
- `SparseCoder(d_in, SparseCoderConfig(k, num_latents))` under `torch.manual_seed(seed)`: encoder = nn.Linear's
  default init with zero bias, W_dec = the encoder weight, unit rows.
- on the first batch b_dec = the batch mean; before every forward the decoder rows are set to unit norm.
- loss = FVU (‖e‖² over the batch's total variance) + auxk_alpha·AuxK + Multi-TopK FVU/8; the defaults are
  auxk_alpha = 0 (so no dead mask, no AuxK) and multi_topk = False.
- the gradient parallel to the decoder rows is removed, then its default optimizer `signum`:
  ScheduleFreeWrapper(SignSGD, momentum=0.95) at lr = 5e-3 / sqrt(num_latents / 2^14), no schedule.
- the saved SAE is the schedule-free average (`optimizer.eval()` before `save_to_disk`).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from sae_toolkit.activations.pairs import open_store
from sae_toolkit.sae import SAE
from sae_toolkit.sae.formats.common import build_sae
from sae_toolkit.training.config import TrainConfig


def sparsify_available() -> bool:
    """True when EleutherAI's `sparsify` (and its `schedulefree` dependency) can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("sparsify", "schedulefree"))


def sparsify_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eai-sparsify")
    except PackageNotFoundError:  # imported from a folder on PYTHONPATH without its dist-info
        import sparsify

        return str(getattr(sparsify, "__version__", "?"))


def train_sparsify_topk(cfg: TrainConfig, d_sae: int, *, progress: bool = True) -> tuple[SAE, dict]:
    """Train sparsify's TopK (k = cfg.k, d_sae latents) on the rows, batches and token budget of our run `cfg`
    with sparsify's defaults; returns it as our (raw-unit) TopK SAE, and what it used {"lr", "optimizer"}."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from tqdm.auto import tqdm

    # our store with the run's own row selection (held-out split, BOS and massive-activation positions, shuffle
    # seed) but raw activations: sparsify normalizes nothing
    store = open_store(cfg.acts, cfg.hookpoint, batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed,
                       seq_range=cfg.seq_range, exclude_bos=cfg.exclude_bos, normalize=False,
                       in_memory=cfg.in_memory, prefetch=cfg.prefetch, outlier_multiple=cfg.outlier_multiple,
                       exclude_first_positions=cfg.exclude_first_positions)
    try:
        torch.manual_seed(cfg.seed)
        sc = SparseCoder(store.d_in, SparseCoderConfig(k=cfg.k, num_latents=d_sae), device=cfg.device,
                         dtype=torch.float32)
        lr = 5e-3 / math.sqrt(sc.num_latents / 2**14)  # sparsify's default for its default optimizer (signum)
        opt = ScheduleFreeWrapper(SignSGD([dict(params=sc.parameters(), lr=lr)]), momentum=0.95)
        opt.train()
        steps = (cfg.tokens or store.n_rows) // cfg.batch_size
        for step in tqdm(range(steps), desc="train sparsify-topk", unit="step"):
            x = store.next_batch()
            if step == 0:
                sc.b_dec.data = x.mean(0)
            sc.set_decoder_norm_to_unit_norm()
            out = sc(x)
            (out.fvu + out.multi_topk_fvu / 8).backward()
            sc.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
        opt.eval()  # sparsify saves the schedule-free average
    finally:
        store.close()
    tensors = {"W_enc": sc.encoder.weight.detach().T.contiguous(), "b_enc": sc.encoder.bias.detach(),
               "W_dec": sc.W_dec.detach(), "b_dec": sc.b_dec.detach()}
    sae = build_sae("topk", tensors, device=cfg.device, dtype="float32", k=cfg.k, hookpoint=cfg.hookpoint,
                    model="", apply_b_dec_to_input=True,
                    source={"source_format": "sparsify", "source": f"sparsify {sparsify_version()} (trained here)"})
    return sae, {"lr": lr, "optimizer": "signum (schedule-free SignSGD, momentum 0.95)"}
