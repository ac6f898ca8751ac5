"""The `analyze`, `steer` and `explain` sub-commands: a parsed command line → a report, steered text, explanations.

The flags are the CLI contract and live in sae_toolkit/cli.py with the rest of the parser (DESIGN.md §2); here is
what runs once they are parsed: parse → call one library function → print where the output went.
"""

from __future__ import annotations

import argparse

from sae_toolkit.errors import SAEToolkitError


def analyze_command(args: argparse.Namespace) -> None:
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


def steer_command(args: argparse.Namespace) -> None:
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


def explain_command(args: argparse.Namespace) -> None:
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
