"""Command-line front end: parse arguments, call one library function, print where the output went.

The commands and flags are the contract of DESIGN.md §2; the work happens in the library modules,
imported lazily so that `sae-toolkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import sae_toolkit
from sae_toolkit import __version__
from sae_toolkit.errors import SAEToolkitError, failure_message
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


def _cmd_cache(args: argparse.Namespace) -> None:
    from sae_toolkit.activations.cacher import CacheConfig, cache_activations

    cfg = CacheConfig(
        model=args.model,
        hookpoints=args.hookpoint,
        dataset=args.dataset,
        split=args.split,
        text_column=args.text_column,
        tokens=args.tokens,
        context_size=args.context_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        out=args.out,
        resume=args.resume,
    )
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one shard per rank, joined by rank 0
        from sae_toolkit.activations.shards import cache_distributed

        path = cache_distributed(cfg)
        if os.environ.get("RANK") != "0":
            return
    else:
        from sae_toolkit.activations.shards import refuse_joined

        refuse_joined(cfg)
        path = cache_activations(cfg)
    print(f"wrote activations to {path}")


def _cmd_info(args: argparse.Namespace) -> None:
    from sae_toolkit.activations.info import describe

    print(describe(args.file))


def _cmd_train(args: argparse.Namespace) -> None:
    from sae_toolkit.training.trainer import TrainConfig, train_sae

    if args.arch is None:
        if not args.target:
            raise SAEToolkitError("--arch is required for an SAE (relu|topk|batchtopk|jumprelu|gated|matryoshka); "
                                  "transcoders (--target) default to topk")
        args.arch = ["topk"]
    cfg = TrainConfig(
        acts=args.acts or "",
        hookpoint=args.hookpoint[0],
        arch=args.arch[0],
        target=args.target or "",
        skip=args.skip,
        expansion=args.expansion[0],
        n_features=args.n_features,
        k=args.k[0],
        l1_coefficient=args.l1_coefficient,
        lr=args.lr,
        batch_size=args.batch_size,
        tokens=args.tokens,
        device=args.device,
        seed=args.seed,
        out=args.out,
        resume=args.resume,
        seq_range=args.seqs,
        compile=args.compile,
        target_l0=args.target_l0,
        decoder_norm_penalty=args.decoder_norm_penalty,
        jumprelu_loss=args.jumprelu_loss,
        gated_loss=args.gated_loss,
        matryoshka_groups=args.matryoshka_groups,
        outlier_multiple=args.outlier_multiple,
        exclude_first_positions=args.exclude_first_positions,
    )
    if _train_many(args, cfg):
        return
    run_dir = train_sae(cfg, force=args.force)
    print(f"wrote run to {run_dir} (SAE in {run_dir / 'sae'})")


def _train_many(args: argparse.Namespace, base) -> bool:
    """From the model, several SAEs, or under torchrun: train them side by side (training/sweep.py).
    False when it is the plain one-SAE-from-a-file case, which `train_sae` runs."""
    import os

    many = len(args.hookpoint) > 1 or len(args.arch) > 1 or len(args.expansion) > 1 or len(args.k) > 1
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.acts and (args.model or args.dataset):
        raise SAEToolkitError(f"got both an activation file ({args.acts}) and --model/--dataset; give one source")
    if not args.acts and not (args.model and args.dataset):
        raise SAEToolkitError("no activations: pass an .h5 file, or --model SPEC --dataset SPEC to train without one")
    if args.acts and not (many or distributed):
        return False
    if args.target:
        raise SAEToolkitError("transcoders (--target) train one at a time from an activation file: drop the sweep "
                              "lists, extra --hookpoint flags, --model/--dataset or torchrun")
    if args.force:
        raise SAEToolkitError("--force starts over a single run; for a sweep, from the model or under torchrun "
                              "choose a new --out (or --resume the old one)")
    from sae_toolkit.activations.stream import StreamConfig
    from sae_toolkit.training.distributed import init_distributed
    from sae_toolkit.training.sweep import sweep_configs, train_sweep

    stream = None if args.acts else StreamConfig(
        model=args.model, dataset=args.dataset, hookpoints=args.hookpoint, split=args.split,
        text_column=args.text_column, context_size=args.context_size, forward_batch=args.model_batch_size,
        buffer_tokens=args.buffer_tokens)
    configs = sweep_configs(base, hookpoints=list(dict.fromkeys(args.hookpoint)), archs=args.arch,
                            expansions=args.expansion, ks=args.k)
    ctx = init_distributed(args.device)
    try:
        root = train_sweep(configs, stream=stream, ctx=ctx, distribute_modules=args.distribute_modules)
        # every rank is done with its collectives before any rank tears the group down: a rank that destroyed it
        # while another was still in its last all-reduce aborted now and then (gloo, 2 processes on CPU)
        ctx.barrier()
    finally:
        if ctx.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ctx.is_main:
        where = "" if len(configs) == 1 else f" ({len(configs)} runs: {', '.join(Path(c.out).name for c in configs)})"
        print(f"wrote run to {root}{where}")
    return True


def _cmd_analyze(args: argparse.Namespace) -> None:
    from sae_toolkit.analysis.report import build_report

    out = build_report(
        args.path,
        acts=args.acts,
        out=args.out,
        model=args.model,
        tokens=args.tokens,
        top_k=args.top_k,
        device=args.device,
        seq_range=args.seqs,
        ce_windows=args.ce_windows,
        force=args.force,
        allow_mismatch=args.allow_mismatch,
        outlier_multiple=args.outlier_multiple,
        exclude_first_positions=args.exclude_first_positions,
        effects=args.effects,
        effect_examples=args.effect_examples,
    )
    print(f"wrote report to {out} (open {out / 'report.html'})")


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


def _cmd_steer(args: argparse.Namespace) -> None:
    from sae_toolkit.analysis.steering import generate, side_by_side
    from sae_toolkit.model.loading import load_model
    from sae_toolkit.sae import SAE
    from sae_toolkit.units import resolve_device

    if not args.feature and not args.scale:
        raise SAEToolkitError("nothing to steer: give --feature I=V (0 ablates) or --scale I=FACTOR")
    device = resolve_device(args.device)
    sae = SAE.load(args.sae_dir, device=device)
    model, tok = load_model(args.model, device=device)
    features, scale = dict(args.feature or []), dict(args.scale or [])
    out = generate(model, tok, sae, args.prompt, features, scale=scale, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed)
    edits = [f"{i}={v:g}" for i, v in features.items()] + [f"{i}*={v:g}" for i, v in scale.items()]
    mode = "greedy" if args.temperature == 0 else f"sampled, temperature {args.temperature:g}, seed {args.seed}"
    print(f"prompt: {args.prompt!r}")
    print(f"steering {sae.cfg.hookpoint}: {', '.join(edits)} at every position; {args.max_new_tokens} tokens, {mode}")
    print(side_by_side(out.baseline, out.steered))


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


def _cmd_explain(args: argparse.Namespace) -> None:
    from sae_toolkit.analysis.explainers import make_explainer
    from sae_toolkit.analysis.explanations import explain_report
    from sae_toolkit.units import resolve_device

    explainer = make_explainer(args.explainer, api_key_env=args.api_key_env, model=args.explainer_model,
                               device=resolve_device(args.device))
    path = explain_report(args.report_dir, explainer, features=args.features, n_features=args.n_features,
                          seed=args.seed)
    from sae_toolkit.analysis.report import load_explanations

    rows = load_explanations(path.parent)
    for i in args.features or sorted(rows):
        r = rows.get(i)
        if r is not None:
            ba = r["detection"].get("balanced_accuracy")
            print(f"feature {i:>6}  detection {'n/a' if ba is None else f'{ba:.2f}'}  {r['explanation']}")
    print(f"wrote {path} and updated {path.parent / 'report.html'}")


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
    c.set_defaults(func=_cmd_cache)

    i = sub.add_parser("info", help="describe an activation file")
    i.add_argument("file")
    i.set_defaults(func=_cmd_info)

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
    t.set_defaults(func=_cmd_train)

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
    a.set_defaults(func=_cmd_analyze)

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
    s.set_defaults(func=_cmd_steer)

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
    x.set_defaults(func=_cmd_explain)

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
