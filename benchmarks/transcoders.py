"""SAE on mlp_out.N vs transcoder (mlp_in.N → mlp_out.N) vs skip transcoder, at equal L0 and equal tokens.

    python -m sae_toolkit cache --model smollm2-135m --hookpoint mlp_in.9 --hookpoint mlp_out.9 \
        --dataset builtin:pydoc --tokens 110k --out /tmp/tc/acts.h5
    python benchmarks/transcoders.py --acts /tmp/tc/acts.h5 --layer 9 [--out benchmarks/TRANSCODERS.md]

All three are TopK (same k, d_sae, seed, batches per step and training tokens) trained on the first sequences
of the file; FVU is measured on the held-out last sequences, always against mlp_out.N (the SAE reconstructs it,
the transcoders predict it from mlp_in.N). CE loss recovered and KL splice each one's output in place of the
MLP's output (zero ablation of mlp_out.N is the common baseline). Prints one JSON line per model, writes a
Markdown table.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.analysis.evaluation import evaluate, model_metrics
from sae_toolkit.model.loading import load_model
from sae_toolkit.sae import SAE, SAEConfig, SAEOutput
from sae_toolkit.training.trainer import TrainConfig, train_sae
from sae_toolkit.units import resolve_device

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--acts", default="/tmp/tc/acts.h5")
parser.add_argument("--layer", type=int, default=9)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--k", type=int, default=32)
parser.add_argument("--expansion", type=int, default=8)
parser.add_argument("--batch-size", type=int, default=1024)
parser.add_argument("--passes", type=float, default=2.0, help="training tokens = passes x training rows")
parser.add_argument("--eval-fraction", type=float, default=0.1, help="last share of sequences held out")
parser.add_argument("--ce-windows", type=int, default=8, help="held-out windows for CE/KL (3 forwards each)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="auto")
parser.add_argument("--work", default="/tmp/tc/runs", help="run directories (must not exist yet unless --reuse)")
parser.add_argument("--reuse", action="store_true", help="reuse finished runs (and their results) in --work")
parser.add_argument("--no-linear", action="store_true", help="skip the least-squares linear map baseline")
parser.add_argument("--out", default=str(Path(__file__).with_name("TRANSCODERS.md")))
args = parser.parse_args()

device = resolve_device(args.device)
hp_in, hp_out = f"mlp_in.{args.layer}", f"mlp_out.{args.layer}"
with ActsReader(args.acts, hp_out, tokenizer=None) as r:
    n_seqs, ctx, bos = r.n_seqs, r.ctx, r.bos_token_id
n_train = int(n_seqs * (1 - args.eval_fraction))
train_tokens = int(args.passes * n_train * (ctx - (bos is not None)))
variants = [("SAE", hp_out, "", False), ("transcoder", hp_in, hp_out, False), ("skip transcoder", hp_in, hp_out, True)]

model, _ = load_model(args.model, device=device)
with ActsReader(args.acts, hp_out, seq_range=(n_train, n_seqs), tokenizer=None) as r:
    ce_ids = r.tokens(list(range(n_train, min(n_seqs, n_train + args.ce_windows))))



class LinearMap(torch.nn.Module):
    """Baseline: the best affine map mlp_in → mlp_out (least squares on the training windows), no sparsity."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.W, self.b = torch.nn.Parameter(W), torch.nn.Parameter(b)
        self.cfg = SAEConfig(arch="topk", d_in=W.shape[0], d_sae=2, k=1, d_out=W.shape[1], hookpoint=hp_in,
                             target=hp_out)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        return SAEOutput(x @ self.W + self.b, x.new_zeros(*x.shape[:-1], 2))


def fit_linear() -> LinearMap:
    """Normal equations accumulated in float64 over the training windows (BOS rows excluded)."""
    xtx, xty = None, None
    with ActsReader(args.acts, hp_in, seq_range=(0, n_train), tokenizer=None) as ri, \
            ActsReader(args.acts, hp_out, seq_range=(0, n_train), tokenizer=None) as ro:
        for (_, toks, x), (_, _, y) in zip(ri.chunks(64), ro.chunks(64)):
            keep = (toks.reshape(-1) != bos) if bos is not None else torch.ones(len(x), dtype=torch.bool)
            x1 = torch.cat([x[keep], torch.ones(int(keep.sum()), 1)], 1).double()  # [n, d_in + 1]
            xtx = x1.T @ x1 if xtx is None else xtx + x1.T @ x1
            xty = x1.T @ y[keep].double() if xty is None else xty + x1.T @ y[keep].double()
    sol = torch.linalg.solve(xtx + 1e-6 * torch.eye(len(xtx), dtype=xtx.dtype), xty).float()  # [d_in + 1, d_out]
    return LinearMap(sol[:-1].contiguous(), sol[-1].contiguous())


rows = []
if not args.no_linear:
    variants.append(("linear map (least squares, dense)", hp_in, hp_out, None))
for name, hookpoint, target, skip in variants:
    kind = "linear" if skip is None else ("skip_" if skip else "") + ("transcoder" if target else "sae")
    out = Path(args.work) / kind
    saved = out / "benchmark_row.json"
    if args.reuse and saved.is_file():  # a finished variant of an interrupted benchmark
        rows.append(json.loads(saved.read_text()))
        print(json.dumps(rows[-1]), flush=True)
        continue
    t0 = time.perf_counter()
    if skip is None:
        sae = fit_linear()
    else:
        cfg = TrainConfig(acts=args.acts, hookpoint=hookpoint, target=target, skip=skip, arch="topk", k=args.k,
                          expansion=args.expansion, batch_size=args.batch_size, tokens=train_tokens, seed=args.seed,
                          seq_range=(0, n_train), device=device, out=str(out), log_every=10_000)
        if not (args.reuse and (out / "sae" / "cfg.json").is_file()):
            train_sae(cfg)
        sae = SAE.load(out, device=device)
    train_s = time.perf_counter() - t0  # ~0 for a reused run
    m = evaluate(sae, args.acts, seq_range=(n_train, n_seqs), device=device, tokenizer=None)
    mm = model_metrics(sae, model, ce_ids, hookpoint=hookpoint, bos_token_id=bos, device=device).compute()
    row = {"benchmark": "transcoders", "model": name, "hookpoint": hookpoint, "target": target or hookpoint,
           "skip": skip, "k": None if skip is None else args.k, "d_sae": None if skip is None else sae.cfg.d_sae,
           "train_tokens": None if skip is None else train_tokens, "eval_tokens": m["tokens"], "fvu": m["fvu"],
           "explained_variance": m["explained_variance"], "l0": None if skip is None else m["l0"],
           "dead_fraction": None if skip is None else m["dead_fraction"], "ce_clean": mm["ce_clean"],
           "ce_replaced": mm["ce_sae"], "ce_zero_ablation": mm["ce_zero_ablation"],
           "ce_loss_recovered": mm["ce_loss_recovered"], "kl": mm["kl_sae"], "ce_tokens": mm["model_tokens"],
           "train_seconds": round(train_s, 1)}
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    rows.append(row)

command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
lines = [
    "# SAE vs transcoder vs skip transcoder",
    "",
    f"Model `{args.model}`, layer {args.layer}, corpus of `{args.acts}` ({n_seqs} windows of {ctx} tokens). All TopK, "
    f"k={args.k}, d_sae={rows[0]['d_sae']}, batch {args.batch_size}, {train_tokens:,} training tokens each "
    f"({args.passes:g} passes over the first {n_train} windows), seed {args.seed}, {device} "
    f"({platform.processor() or platform.machine()}, torch {torch.__version__}). FVU on the held-out "
    f"{rows[0]['eval_tokens']:,} tokens (windows {n_train}..{n_seqs}, BOS excluded), always measured on "
    f"`{hp_out}`. CE loss recovered / KL: the output replaces the MLP's output (`{hp_out}`) over "
    f"{rows[0]['ce_tokens']:,} held-out predictions; zero ablation of `{hp_out}` is the 0 point.",
    "",
    "| model | reads → writes | L0 | FVU | explained var. | dead | CE clean | CE replaced | CE zero-abl. | "
    "CE loss recovered | KL(clean‖replaced) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    l0 = "dense" if r["l0"] is None else f"{r['l0']:.1f}"
    dead = "–" if r["dead_fraction"] is None else f"{r['dead_fraction']:.1%}"
    lines.append(f"| {r['model']} | `{r['hookpoint']}` → `{r['target']}` | {l0} | {r['fvu']:.4f} | "
                 f"{r['explained_variance']:.4f} | {dead} | {r['ce_clean']:.4f} | "
                 f"{r['ce_replaced']:.4f} | {r['ce_zero_ablation']:.4f} | {r['ce_loss_recovered']:.4f} | "
                 f"{r['kl']:.4f} |")
lines += ["", "Reproduce:", "", "```", command, "```", "",
          "JSON lines printed by the run:", "", "```", *[json.dumps(r) for r in rows], "```", ""]
Path(args.out).write_text("\n".join(lines))
print(f"wrote {args.out}")
