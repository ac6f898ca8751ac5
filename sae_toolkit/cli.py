"""Command-line front end: parse arguments, call one library function, print where the output went.

The commands and flags are the contract of DESIGN.md §2 and are all defined here; the sub-commands of a stage run
in its commands.py (activations, training, analysis), which import the library lazily so that `sae-toolkit --help`
stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import sae_toolkit
from sae_toolkit import __version__
from sae_toolkit.activations.commands import cache_command, info_command
from sae_toolkit.analysis.commands import analyze_command, explain_command, steer_command
from sae_toolkit.errors import SAEToolkitError, failure_message
from sae_toolkit.training.commands import train_command
from sae_toolkit.units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SAEToolkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _list(kind: type):
    """`a,b,c` → [kind(a), kind(b), kind(c)] (a sweep over the values)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}: write one value or a comma list, e.g. 16,32")
        return values

    return parse


def _seq_range(text: str) -> tuple[int, int]:
    """`START:STOP` → (START, STOP), a half-open range of sequence indices in the activation file."""
    start, sep, stop = text.partition(":")
    try:
        lo, hi = int(start), int(stop)
    except ValueError:
        lo = hi = -1
    if not sep or lo < 0 or hi <= lo:
        raise argparse.ArgumentTypeError(f"cannot read sequence range {text!r}: write START:STOP, e.g. 0:800")
    return lo, hi


def _int_list(text: str) -> tuple[int, ...]:
    """`A,B,C` → (A, B, C), positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: write positive integers separated by commas, "
                                         "e.g. 64,64,128")
    return values


def _cmd_export(args: argparse.Namespace) -> None:
    from sae_toolkit.sae import export_saelens

    out = export_saelens(args.sae_dir, args.out, force=args.force)
    print(f"wrote {args.format} SAE to {out}")


def _cmd_import(args: argparse.Namespace) -> None:
    from sae_toolkit.sae import import_sae

    out, sae = import_sae(args.src, args.out, hookpoint=args.hookpoint)
    fmt = sae.cfg.extra.get("source_format", "sae-toolkit")
    print(f"wrote sae-toolkit SAE ({sae.cfg.arch}, d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}, hookpoint "
          f"{sae.cfg.hookpoint or '?'}) imported from {fmt} to {out}")


def _latent_value(text: str) -> tuple[int, float]:
    """`I=V` → (latent I, value V) for --feature / --scale."""
    i, sep, v = text.partition("=")
    try:
        return int(i), float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: write FEATURE=VALUE, e.g. 123=8") from None


def _feature_list(text: str) -> list[int]:
    """`1,5,10-12` → [1, 5, 10, 11, 12]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read feature list {text!r}: write e.g. 3,17,40-45") from None
    return out


def _cmd_demo(args: argparse.Namespace) -> None:
    from sae_toolkit.demo import run_demo

    run_demo(out=args.out, quick=args.quick, device=args.device, force=args.force)


def _outlier_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outlier-multiple", type=float, default=5.0,
                   help="exclude positions whose median activation norm exceeds this multiple of the median; "
                   "analysis also marks tokens above it and the sink latents built on them (0: off)")
    p.add_argument("--exclude-first-positions", type=int, default=0, help="also exclude the first N positions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-toolkit", description=sae_toolkit.__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"sae-toolkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cache", help="run a model over a corpus and store hooked activations in HDF5")
    c.add_argument("--model", required=True, help="hub id, local dir, .gguf file or builtin (smollm2-135m)")
    c.add_argument("--hookpoint", required=True, action="append", help="module path[:input] or alias; repeatable")
    c.add_argument("--dataset", required=True, help="HF dataset id, local .txt/.jsonl/.parquet/.csv, builtin:pydoc")
    c.add_argument("--split", default="train")
    c.add_argument("--text-column", default=None, help="column holding the text (default: guessed)")
    c.add_argument("--tokens", required=True, type=_size, help="tokens to cache, e.g. 20k, 1M")
    c.add_argument("--context-size", type=int, default=128)
    c.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default: 32k tokens' worth on a GPU, 32 on CPU)")
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    c.add_argument("--device", default="auto")
    c.add_argument("--out", required=True, help="output .h5 file")
    c.add_argument("--resume", action="store_true", help="continue an interrupted file")
    c.set_defaults(func=cache_command)

    i = sub.add_parser("info", help="describe an activation file")
    i.add_argument("file")
    i.set_defaults(func=info_command)

    t = sub.add_parser("train", help="train SAEs on cached activations or straight from a model")
    t.add_argument("acts", nargs="?", default=None, help="activation .h5 file (or --model and --dataset)")
    t.add_argument("--hookpoint", required=True, action="append", help="repeatable: one SAE per hookpoint")
    t.add_argument("--arch", default=None, type=_list(str),
                   help="relu, topk, batchtopk, jumprelu, gated or matryoshka; a comma list trains each side by "
                        "side; required for an SAE, a transcoder (--target) defaults to topk")
    t.add_argument("--target", default=None, help="train a transcoder predicting this hookpoint from --hookpoint")
    t.add_argument("--skip", action="store_true", help="transcoder with a learned linear skip path W_skip x")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--expansion", type=_list(int), default=[8], help="d_sae = expansion * d_in; e.g. 8,16")
    g.add_argument("--n-features", type=_size, default=None, help="d_sae, overrides --expansion")
    t.add_argument("--k", type=_list(int), default=[32],
                   help="latents per token (topk, batchtopk, matryoshka); e.g. 16,32,64")
    t.add_argument("--model", default=None, help="train from this model's forward pass instead of a file")
    t.add_argument("--dataset", default=None, help="corpus for --model (as for cache)")
    t.add_argument("--split", default="train")
    t.add_argument("--text-column", default=None)
    t.add_argument("--context-size", type=int, default=128, help="window size for --model")
    t.add_argument("--model-batch-size", type=int, default=32, help="windows per forward pass for --model")
    t.add_argument("--buffer-tokens", type=_size, default=None,
                   help="shuffle buffer for --model (default: 32 batches)")
    t.add_argument("--distribute-modules", action="store_true",
                   help="under torchrun: each hookpoint's SAEs on one rank, fed every rank's rows")
    s = t.add_mutually_exclusive_group()
    s.add_argument("--l1-coefficient", type=float, default=None, help="sparsity penalty (relu, jumprelu, gated)")
    s.add_argument("--target-l0", type=float, default=None,
                   help="steer the sparsity penalty so training ends at this L0 (relu, jumprelu, gated)")
    t.add_argument("--decoder-norm-penalty", action="store_true",
                   help="relu: Anthropic's April-2024 variant (penalty f·‖W_dec‖, no b_dec before encoding, clip 1)")
    t.add_argument("--jumprelu-loss", choices=["tanh", "step"], default="tanh",
                   help="jumprelu: Anthropic 2025 tanh penalty (default) or the L0 step-function estimator")
    t.add_argument("--gated-loss", choices=["tanh", "l1"], default="tanh",
                   help="gated: the JumpReLU tanh recipe on the gate (default) or the paper's L1 + auxiliary loss")
    t.add_argument("--matryoshka-groups", type=_int_list, default=None,
                   help="matryoshka: nested group sizes summing to d_sae, e.g. 256,256,512,1024,2048")
    t.add_argument("--lr", type=float, default=None, help="default: 2e-4 * sqrt(2**14 / d_sae)")
    t.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    t.add_argument("--tokens", type=_size, default=None, help="training tokens (default: one pass over the file)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--seqs", type=_seq_range, default=None, help="train on sequences START:STOP only")
    t.add_argument("--force", action="store_true", help="start over: delete the earlier run's own files in --out")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the training loss + backward as one graph (slow first step; for GPU runs)")
    _outlier_flags(t)
    t.set_defaults(func=train_command)

    a = sub.add_parser("analyze", help="metrics, top activations and an HTML dashboard for an SAE")
    a.add_argument("path", help="training RUN_DIR or SAE directory")
    a.add_argument("--acts", required=True, help="activation .h5 file to evaluate on")
    a.add_argument("--model", default=None, help="model SPEC for CE/KL metrics and the logit lens")
    a.add_argument("--tokens", type=_size, default=None, help="tokens to evaluate (default: the whole file)")
    a.add_argument("--top-k", type=int, default=20, help="top activating examples per latent")
    a.add_argument("--seqs", type=_seq_range, default=None, help="evaluate on sequences START:STOP only")
    a.add_argument("--ce-windows", type=int, default=64, help="windows for the CE/KL metrics (4 forwards each)")
    _outlier_flags(a)
    a.add_argument("--effects", type=int, default=16,
                   help="features whose ablation effect on next-token log-probs is measured with --model (0: off)")
    a.add_argument("--effect-examples", type=int, default=4, help="top examples per feature for --effects")
    a.add_argument("--device", default="auto")
    a.add_argument("--out", required=True, help="report directory (new, empty, or an earlier report)")
    a.add_argument("--force", action="store_true", help="also replace a report an older sae-toolkit wrote")
    a.add_argument("--allow-mismatch", action="store_true",
                   help="analyze even if the SAE's model/hookpoint differ from the activations' or --model")
    a.set_defaults(func=analyze_command)

    e = sub.add_parser("export", help="convert an SAE directory for another tool")
    e.add_argument("sae_dir")
    e.add_argument("--format", required=True, choices=["saelens"])
    e.add_argument("--out", required=True, help="folder (new, empty, or an earlier export)")
    e.add_argument("--force", action="store_true", help="also replace an export an older sae-toolkit wrote")
    e.set_defaults(func=_cmd_export)

    m = sub.add_parser("import", help="convert an SAE of another toolkit (SAELens, sparsify, Gemma Scope, "
                       "dictionary_learning, hf:ORG/REPO[/SUB]) into an sae-toolkit SAE directory")
    m.add_argument("src", help="SAE folder or hf:ORG/REPO[/SUBFOLDER]")
    m.add_argument("--out", required=True, help="new SAE directory")
    m.add_argument("--hookpoint", default=None,
                   help="our hookpoint for the SAE (overrides the mapped one), or the sub-folder to pick")
    m.set_defaults(func=_cmd_import)

    s = sub.add_parser("steer", help="generate with SAE features clamped, ablated or scaled, beside the baseline")
    s.add_argument("sae_dir", help="SAE directory or training RUN_DIR")
    s.add_argument("--model", required=True, help="model SPEC the SAE was trained on")
    s.add_argument("--prompt", required=True)
    s.add_argument("--feature", type=_latent_value, action="append", metavar="I=V",
                   help="set feature I to V at every position (0 ablates); repeatable")
    s.add_argument("--scale", type=_latent_value, action="append", metavar="I=F",
                   help="multiply feature I by F; repeatable")
    s.add_argument("--max-new-tokens", type=int, default=30)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (both continuations use it)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=steer_command)

    x = sub.add_parser("explain", help="explain report features with a chat model and score them by detection")
    x.add_argument("report_dir", help="report directory written by analyze")
    x.add_argument("--explainer", required=True,
                   help="OpenAI-compatible endpoint (http://host:port/v1) or a local chat model SPEC")
    x.add_argument("--explainer-model", default=None, help="the endpoint's model name (default: its first model)")
    x.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    x.add_argument("--features", type=_feature_list, default=None, help="e.g. 3,17,40-45 (default: a sample)")
    x.add_argument("--n-features", type=int, default=20, help="size of the seeded random sample of features")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--device", default="auto", help="device of a local explainer model")
    x.set_defaults(func=explain_command)

    d = sub.add_parser("demo", help="the whole pipeline on SmolLM2-135M and the Python docs, offline")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--quick", action="store_true", help="seconds-long version used by the tests")
    d.add_argument("--device", default="auto")
    d.add_argument("--force", action="store_true", help="also reuse a folder an older sae-toolkit demo wrote")
    d.set_defaults(func=_cmd_demo)
    # --debug works before or after the command name (the sub-parser's copy leaves the global one alone when absent)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or SAE_TOOLKIT_DEBUG=1)")
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are one line on stderr: exit 2 for usage errors, 1 for runtime failures."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sae-toolkit info a.h5 | head`: the reader left; say nothing (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # SAEToolkitError, and OSError/MemoryError/h5py/pickle errors no check caught
        if args.debug or os.environ.get("SAE_TOOLKIT_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        message, code = failure_message(e, getattr(args, "out", None))
        print(f"error: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
