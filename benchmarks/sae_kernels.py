"""Sparse TopK kernels vs the dense formulation: one training forward+backward, one JSON line per measurement.

    python benchmarks/sae_kernels.py [--device cpu|cuda] [--d-in 768] [--d-sae 24576] [--k 32] [--batch 4096]
                                     [--arch topk|batchtopk] [--threads N]

"dense" runs the same TopK (or BatchTopK) loss with a dense [batch, d_sae] activation matrix and autograd through
the full encoder/decoder matmuls; "sparse" is the SAE's training_loss (kernels in sae_toolkit/sae/kernels.py).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sae_toolkit.sae import SAEConfig, make_sae


def dense_loss(sae, x: torch.Tensor) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [batch, d_sae]
    if sae.cfg.arch == "batchtopk":
        flat = pre.reshape(-1)
        idx = flat.topk(sae.cfg.k * x.shape[0], sorted=False).indices
        f = torch.zeros_like(flat).scatter(0, idx, flat[idx].relu()).view_as(pre)
    else:
        vals, idx = pre.topk(sae.cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return (x - (f @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()


def sparse_loss(sae, x: torch.Tensor) -> torch.Tensor:
    return sae.training_loss(x).loss


def timed(fn, sae, x, reps: int, device: str) -> float:
    def once():
        sae.zero_grad(set_to_none=True)
        fn(sae, x).backward()

    once()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk"])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=args.arch, d_in=args.d_in, d_sae=args.d_sae, k=args.k), device=args.device)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    for name, fn in (("dense", dense_loss), ("sparse", sparse_loss)):
        s = timed(fn, sae, x, args.reps, args.device)
        row = {
            "bench": f"{args.arch}_train_step",
            "impl": name,
            "device": args.device,
            "d_in": args.d_in,
            "d_sae": args.d_sae,
            "k": args.k,
            "batch": args.batch,
            "threads": torch.get_num_threads() if args.device == "cpu" else None,
            "ms": round(1e3 * s, 2),
            "tokens_per_s": round(args.batch / s),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
