"""Training throughput (tokens/s) of `sae_toolkit.training.trainer.train_step` per architecture, beside the seed loop.

One JSON line per measurement. CPU: d_in=576, d_sae=4608, batch 1024. With a GPU also (576, 18432, 4096) and
(1536, 16384, 4096), bf16 autocast as the trainer uses it. The seed reference is the tutorial's
LLMSparseAutoencoder + Adam + decoder renormalisation, re-typed here (separate b_pre, dense ReLU, .item() of its
metrics every step, as its loop does), measured in the same process on the same batches.

    python benchmarks/train_throughput.py            # CPU (+ GPU shapes when CUDA is present)
    python benchmarks/train_throughput.py --steps 5  # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from torch import nn

from sae_toolkit.sae import ARCHS, SAEConfig, make_sae
from sae_toolkit.training.trainer import train_step

CPU_SHAPES = [(576, 4608, 1024)]
GPU_SHAPES = [(576, 18432, 4096), (1536, 16384, 4096)]


class SeedLLMSparseAutoencoder(nn.Module):
    """The seed tutorial's LLMSparseAutoencoder (Towards Monosemanticity style), as the tutorial wrote it."""

    def __init__(self, d_model: int, n_features: int, l1_coeff: float = 1e-3):
        super().__init__()
        self.l1_coeff = l1_coeff
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.W_enc = nn.Parameter(torch.randn(d_model, n_features) / (d_model**0.5))
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.W_dec = nn.Parameter(torch.randn(n_features, d_model) / (n_features**0.5))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self._normalize_decoder()

    @torch.no_grad()
    def _normalize_decoder(self):
        norms = self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
        self.W_dec.data = self.W_dec.data / norms

    def forward(self, x):
        z = torch.relu((x - self.b_pre) @ self.W_enc + self.b_enc)
        return z @ self.W_dec + self.b_dec, z

    def loss(self, x, x_hat, z):
        recon = ((x - x_hat) ** 2).mean()
        sparsity = self.l1_coeff * z.abs().mean()
        with torch.no_grad():
            l0 = (z > 0).float().sum(dim=-1).mean()
            dead_frac = (z.max(dim=0).values == 0).float().mean()
        return {"loss": recon + sparsity, "recon_loss": recon, "l1_loss": sparsity, "l0_per_token": l0,
                "dead_feature_frac": dead_frac}


def seed_step(sae: SeedLLMSparseAutoencoder, opt: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    """One iteration of the tutorial's train_llm_sae inner loop."""
    opt.zero_grad()
    x_hat, z = sae(batch)
    metrics = sae.loss(batch, x_hat, z)
    metrics["loss"].backward()
    opt.step()
    with torch.no_grad():
        sae._normalize_decoder()
    {k: v.item() for k, v in metrics.items()}


def _time(step, batches: list[torch.Tensor], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, after `warmup` untimed steps."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_shape(d_in: int, d_sae: int, batch: int, device: torch.device, steps: int, warmup: int,
                archs: list[str]) -> None:
    torch.manual_seed(0)
    # Heavy-tailed, non-centred rows, roughly like normalized residual-stream activations.
    batches = [torch.randn(batch, d_in, device=device) * (1 + torch.rand(batch, 1, device=device)) + 0.3
               for _ in range(4)]
    cuda = device.type == "cuda"
    common = {"d_in": d_in, "d_sae": d_sae, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
              "steps": steps, "torch": torch.__version__}
    if cuda:
        common["gpu"] = torch.cuda.get_device_name(device)

    ref = SeedLLMSparseAutoencoder(d_in, d_sae).to(device)
    sec = _time(partial(seed_step, ref, torch.optim.Adam(ref.parameters(), lr=5e-4)), batches, steps, warmup, device)
    _emit({"bench": "train_step", "impl": "seed_reference", "arch": "relu", **common, "ms_per_step": sec * 1e3,
           "tokens_per_s": batch / sec})
    del ref

    for arch in archs:
        sae = make_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=32 if arch in ("topk", "batchtopk") else None),
                       device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=cuda)
        dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
        dead[: d_sae // 10] = True  # a realistic share of dead latents, so AuxK does its work

        def step(x, sae=sae, opt=opt, dead=dead):
            train_step(sae, opt, x, dead_mask=dead, autocast=cuda)

        sec = _time(step, batches, steps, warmup, device)
        _emit({"bench": "train_step", "impl": "sae_toolkit", "arch": arch, **common, "autocast_bf16": cuda,
               "ms_per_step": sec * 1e3, "tokens_per_s": batch / sec})
        del sae, opt


def _emit(row: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU shapes even when CUDA is present")
    args = p.parse_args()
    for shape in CPU_SHAPES:
        bench_shape(*shape, torch.device("cpu"), args.steps, args.warmup, args.archs)
    if torch.cuda.is_available() and not args.cpu_only:
        for shape in GPU_SHAPES:
            bench_shape(*shape, torch.device("cuda"), args.steps, args.warmup, args.archs)


if __name__ == "__main__":
    main()
