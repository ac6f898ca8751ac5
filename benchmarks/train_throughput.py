"""Training-step throughput (tokens/s): sae-toolkit's `train_step` per arch against the dense encoder matmul floor
and, when importable, EleutherAI sparsify's TopK step and SAELens' standard (ReLU + L1) step.

Every contender gets its own model and optimizer and the same batches. Timing runs in interleaved rounds: each
round runs one step of every contender (order rotated per round), and a contender's figure is the median over
rounds, so load from other processes on a shared machine hits all contenders alike. One JSON line per contender,
then one per ratio (only ratios between contenders of the same run mean anything).

    python benchmarks/train_throughput.py                        # CPU, d_in=576, d_sae=4608, batch 1024
    python benchmarks/train_throughput.py --device cuda --d-sae 18432 --batch 4096
    python benchmarks/train_throughput.py --quick                # tiny shapes, 3 rounds: checks that it runs

Peers stay out of the project's dependencies; install them in a throwaway venv and run with its python:
    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0
    /tmp/peers/bin/pip install eai-sparsify sae-lens
    PYTHONPATH=. /tmp/peers/bin/python benchmarks/train_throughput.py

Contenders (k=32, Adam, 10 % of latents marked dead where the arch has AuxK):
  matmul_floor          one dense encoder matmul x @ W_enc: the floor under any TopK step
  topk_dead10/_nodead   our TopK step with 10 % / no dead latents (AuxK on / off)
  sparsify_topk_*       sparsify's SparseCoder forward (fvu + auxk/32) + backward + its decoder upkeep + Adam
  relu_fresh/_sparse2   our ReLU + L1 step, fresh SAE / b_enc set so latents fire on ~2 % of (token, latent)s
  saelens_relu_*        SAELens StandardTrainingSAE.training_forward_pass + backward + Adam, same two regimes
  batchtopk_dead10, jumprelu_fresh, jumprelu_sparse2, gated_fresh, gated_sparse2 (b_gate: gates open on ~2 %)
  jumprelu_l0k          JumpReLU with θ set so that k latents per token fire on average: TopK's L0 (sparse2: ~3×)
  jumprelu_*_band       the same with the threshold estimator's band (θ − ε/2, θ) as wide as in a trained SAE: the
                        encoder scaled so that it holds the share of pre-activations measured on SmolLM2 mlp_out.9
                        SAEs trained with the defaults (tanh recipe, ε = 2): 9.5 % at held-out L0 35, 27 % at L0 112
  gated_open48          Gated as it trained before `GatedSAE.project_` (710ad7f; same data, L0 89): gates open on
                        48 % of the (token, latent)s, the magnitudes ReLU(π_mag) positive on 2 %. Since then the
                        first step's projection opens the magnitude wherever the gate opens, so from the second round
                        on this contender fires on ~48 % (its ratios are no longer that regime's); a Gated SAE
                        trained now fires wherever its gate opens, the regime of gated_sparse2
  *_composed            jumprelu_sparse2_band and gated_open48 on the composed autograd graph (the fused CPU step
                        switched off): what those regimes ran on before the fused step covered them
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import torch

from sae_toolkit.sae import SAEConfig, jumprelu, make_sae
from sae_toolkit.training.step import make_optimizer, train_step

# (numerator, denominator, target) — a target of None is informational. "Within 1.2× of our TopK" compares archs at
# the same sparsity: JumpReLU at TopK's L0 (jumprelu_l0k*). At ~3× TopK's L0 (jumprelu_sparse2*: 2 % of the
# (token, latent)s) the step does 3× TopK's sparse work by definition; those ratios are printed for context.
RATIOS = [
    ("topk_dead10", "sparsify_topk_dead10", 2.0),
    ("topk_nodead", "sparsify_topk_nodead", 1.5),
    ("topk_dead10", "matmul_floor", 0.4),
    ("topk_dead10_compiled", "topk_dead10", None),
    ("jumprelu_sparse2_compiled", "topk_nodead", None),
    ("topk_nodead", "matmul_floor", 0.4),
    ("relu_fresh", "saelens_relu_fresh", 1.0),
    ("relu_sparse2", "saelens_relu_sparse2", 1.5),
    ("batchtopk_dead10", "topk_dead10", 1 / 1.2),
    ("jumprelu_sparse2", "topk_nodead", None),
    ("jumprelu_l0k", "topk_nodead", 1 / 1.2),
    ("jumprelu_l0k_band", "topk_nodead", 1 / 1.2),
    ("jumprelu_sparse2_band", "topk_nodead", None),
    ("gated_open48", "topk_nodead", None),
    ("jumprelu_sparse2_band", "jumprelu_sparse2_band_composed", None),
    ("gated_open48", "gated_open48_composed", None),
    ("jumprelu_fresh", "topk_nodead", None),
    ("gated_sparse2", "topk_nodead", None),
    ("gated_fresh", "topk_nodead", None),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(d_in: int, batch: int, device: torch.device, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    # heavy-tailed, non-centred rows at mean norm ~sqrt(d_in), like normalized residual-stream activations
    return [(torch.randn(batch, d_in, generator=g) * (1 + torch.rand(batch, 1, generator=g)) + 0.3).to(device)
            for _ in range(n)]


def _dead_mask(d_sae: int, frac: float, device: torch.device) -> torch.Tensor:
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    dead[: int(d_sae * frac)] = True
    return dead


@torch.no_grad()
def _sparsify_b_enc(W_enc: torch.Tensor, b_dec: torch.Tensor, x: torch.Tensor, density: float) -> torch.Tensor:
    """b_enc [d_sae] putting each latent's pre-activation above 0 on `density` of the rows of x (a trained
    ReLU SAE's firing rate); W_enc [d_in, d_sae]."""
    x = x[: max(1, (1 << 24) // W_enc.shape[1])]  # torch.quantile takes at most 2^24 elements
    pre = (x - b_dec) @ W_enc
    return -pre.float().quantile(1 - density, dim=0).to(W_enc.dtype)


@torch.no_grad()
def _band_scale(W_enc: torch.Tensor, x: torch.Tensor, density: float, band: float, eps: float) -> float:
    """Factor a for W_enc (and the thresholds) such that, with each latent's threshold at its (1 − density)
    quantile, `band` of the pre-activations of x lie in the estimator's band below it, (θ − ε/2, θ): the
    spread of a trained SAE's pre-activations around its thresholds (scaling the encoder narrows the spread, and
    the band's width ε stays)."""
    x = x[: max(1, (1 << 24) // W_enc.shape[1])]
    pre = (x @ W_enc).float()
    q = pre.quantile(1 - density, dim=0)
    below = pre < q
    lo, hi = -12.0, 12.0  # bisection on log a: the band's share shrinks as a grows
    for _ in range(40):
        mid = (lo + hi) / 2
        share = float((below & (pre > q - eps / (2 * math.exp(mid)))).float().mean())
        lo, hi = (mid, hi) if share > band else (lo, mid)
    return math.exp((lo + hi) / 2)


def toolkit_contenders(d_in: int, d_sae: int, device: torch.device, x0: torch.Tensor, autocast: bool,
                       names: set[str], backend: str = "inductor") -> dict[str, Callable[[torch.Tensor], None]]:
    out: dict[str, Callable[[torch.Tensor], None]] = {}

    def add(name: str, arch: str, dead_frac: float = 0.0, density: float | None = None,
            compiled: bool = False, band: float | None = None, gate_open: float | None = None,
            composed: bool = False) -> None:
        if name not in names:
            return
        torch.manual_seed(0)
        sae = make_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=32 if "topk" in arch else None),
                       device=device).train()
        if density is not None:
            with torch.no_grad():
                if band is not None:
                    sae.W_enc.mul_(_band_scale(sae.W_enc, x0, density, band, sae.cfg.jumprelu_bandwidth))
                b = _sparsify_b_enc(sae.W_enc, sae.b_dec, x0, density)
                if arch == "jumprelu":  # θ at the (1 − density) quantile instead of a negative bias
                    sae.log_threshold.copy_((-b).clamp_min(1e-3).log())
                elif gate_open is not None:  # Gated: the magnitudes select (π_mag = W_encᵀx̃ + b_mag), not the gates
                    sae.b_mag.copy_(b)
                    sae.b_enc.copy_(_sparsify_b_enc(sae.W_enc, sae.b_dec, x0, gate_open))
                else:
                    sae.b_enc.copy_(b)
        opt = make_optimizer(sae, 1e-5, device=device)  # the trainer's (fused Adam on CPU and CUDA)
        dead = _dead_mask(d_sae, dead_frac, device)
        # `train --compile`: the loss + backward as one graph (compiled during the warm-up steps)
        loss_fn = (torch.compile(sae.training_loss, fullgraph=True, dynamic=False, backend=backend)
                   if compiled else None)

        def step(x: torch.Tensor) -> None:
            if composed:  # no share of entries is small enough for the fused tanh step
                jumprelu.FUSED_MAX_DENSITY, saved = -1.0, jumprelu.FUSED_MAX_DENSITY
            try:
                train_step(sae, opt, x, dead_mask=dead, autocast=autocast, loss_fn=loss_fn)
            finally:
                if composed:
                    jumprelu.FUSED_MAX_DENSITY = saved

        out[name] = step

    add("topk_dead10", "topk", 0.1)
    add("topk_nodead", "topk", 0.0)
    add("topk_dead10_compiled", "topk", 0.1, compiled=True)
    add("jumprelu_sparse2_compiled", "jumprelu", density=0.02, compiled=True)
    add("batchtopk_dead10", "batchtopk", 0.1)
    add("relu_fresh", "relu")
    add("relu_sparse2", "relu", density=0.02)
    add("jumprelu_fresh", "jumprelu")
    add("jumprelu_sparse2", "jumprelu", density=0.02)
    add("jumprelu_l0k", "jumprelu", density=32 / d_sae)
    add("jumprelu_l0k_band", "jumprelu", density=32 / d_sae, band=0.095)
    add("jumprelu_sparse2_band", "jumprelu", density=0.02, band=0.27)
    add("gated_open48", "gated", density=0.02, gate_open=0.48)
    add("jumprelu_sparse2_band_composed", "jumprelu", density=0.02, band=0.27, composed=True)
    add("gated_open48_composed", "gated", density=0.02, gate_open=0.48, composed=True)
    add("gated_fresh", "gated")
    add("gated_sparse2", "gated", density=0.02)
    return out


def floor_contender(d_in: int, d_sae: int, device: torch.device, autocast: bool) -> Callable[[torch.Tensor], None]:
    W_enc = torch.randn(d_in, d_sae, device=device)

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            x @ W_enc

    return step


def sparsify_contenders(d_in: int, d_sae: int, device: torch.device,
                        names: set[str]) -> dict[str, Callable[[torch.Tensor], None]]:
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return {}
    out: dict[str, Callable[[torch.Tensor], None]] = {}
    for name, frac in (("sparsify_topk_dead10", 0.1), ("sparsify_topk_nodead", 0.0)):
        if name not in names:
            continue
        torch.manual_seed(0)
        sae = SparseCoder(d_in, SparseCoderConfig(k=32, num_latents=d_sae), device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-5)  # what sparsify's trainer builds for optimizer="adam"
        dead = _dead_mask(d_sae, frac, device)

        def step(x: torch.Tensor, sae=sae, opt=opt, dead=dead) -> None:
            # sparsify.Trainer's inner step for loss_fn="fvu", auxk_alpha=1/32, one micro-batch
            o = sae(x, dead_mask=dead)
            (o.fvu + o.auxk_loss / 32 + o.multi_topk_fvu / 8).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sae.set_decoder_norm_to_unit_norm()
            # its trainer also marks fired latents every step
            fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
            fired[o.latent_indices.flatten()] = True

        out[name] = step
    return out


def saelens_contenders(d_in: int, d_sae: int, device: torch.device, x0: torch.Tensor, autocast: bool,
                       names: set[str]) -> dict[str, Callable[[torch.Tensor], None]]:
    try:
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return {}
    out: dict[str, Callable[[torch.Tensor], None]] = {}
    for name, density in (("saelens_relu_fresh", None), ("saelens_relu_sparse2", 0.02)):
        if name not in names:
            continue
        torch.manual_seed(0)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, device=str(device),
                                                            l1_coefficient=5.0))
        if density is not None:
            with torch.no_grad():
                sae.b_enc.copy_(_sparsify_b_enc(sae.W_enc, sae.b_dec, x0, density))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-5)  # SAELens' SAETrainer: plain torch Adam

        def step(x: torch.Tensor, sae=sae, opt=opt) -> None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                o = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 5.0},
                                                             dead_neuron_mask=None, n_training_steps=0,
                                                             is_logging_step=False))
            o.loss.backward()
            opt.step()
            opt.zero_grad()

        out[name] = step
    return out


def run(contenders: dict[str, Callable[[torch.Tensor], None]], batches: list[torch.Tensor], rounds: int,
        warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each contender, one step of each per round (rotating order)."""
    names = list(contenders)
    for name in names:
        for i in range(warmup):
            contenders[name](batches[i % len(batches)])
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        x = batches[r % len(batches)]
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            _sync(device)
            t0 = time.perf_counter()
            contenders[name](x)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def emit(row: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="+", default=None, help="contender names to run (default: all)")
    p.add_argument("--no-autocast", action="store_true", help="on CUDA: fp32 matmuls instead of bf16 autocast")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds: only checks that it runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="add topk_dead10_compiled, jumprelu_sparse2_compiled (torch.compile'd loss)")
    p.add_argument("--compile-backend", default="inductor", help="aot_eager for a quick check on CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.d_in, args.d_sae, args.batch, args.rounds, args.warmup = 32, 256, 128, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = device.type == "cuda" and not args.no_autocast
    all_names = {"matmul_floor", "topk_dead10", "topk_nodead", "batchtopk_dead10", "relu_fresh", "relu_sparse2",
                 "jumprelu_fresh", "jumprelu_sparse2", "jumprelu_l0k", "gated_fresh", "gated_sparse2",
                 "jumprelu_l0k_band", "jumprelu_sparse2_band", "gated_open48", "jumprelu_sparse2_band_composed",
                 "gated_open48_composed",
                 "sparsify_topk_dead10",
                 "sparsify_topk_nodead", "saelens_relu_fresh", "saelens_relu_sparse2"}
    names = set(args.only) if args.only else set(all_names)
    if args.compile:
        names.update({"topk_dead10_compiled", "jumprelu_sparse2_compiled"})
    batches = _batches(args.d_in, args.batch, device)
    contenders: dict[str, Callable[[torch.Tensor], None]] = {}
    if "matmul_floor" in names:
        contenders["matmul_floor"] = floor_contender(args.d_in, args.d_sae, device, autocast)
    contenders.update(toolkit_contenders(args.d_in, args.d_sae, device, batches[0], autocast, names,
                                         args.compile_backend))
    contenders.update(sparsify_contenders(args.d_in, args.d_sae, device, names))
    contenders.update(saelens_contenders(args.d_in, args.d_sae, device, batches[0], autocast, names))
    times = run(contenders, batches, args.rounds, args.warmup, device)
    common = {"device": str(device), "d_in": args.d_in, "d_sae": args.d_sae, "batch": args.batch, "k": 32,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "autocast_bf16": autocast}
    if device.type == "cuda":
        common["gpu"] = torch.cuda.get_device_name(device)
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = args.batch / med
        emit({"bench": "train_step", "contender": name, **common, "ms_median": med * 1e3,
              "ms_min": min(ts) * 1e3, "tokens_per_s": rate[name]})
    for num, den, target in RATIOS:
        if num in rate and den in rate:
            row = {"bench": "train_step_ratio", "ratio": f"{num}/{den}", "value": rate[num] / rate[den]}
            if target is not None:
                row.update(target=round(target, 3), met=rate[num] / rate[den] >= target)
            emit(row)
    missing = sorted(n for n in ("sparsify_topk_dead10", "saelens_relu_fresh") if n in names and n not in rate)
    if missing:
        emit({"bench": "train_step_note", "note": f"peers not importable, skipped: {missing}"})
    return rate


if __name__ == "__main__":
    main()
