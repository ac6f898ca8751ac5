"""The `train` sub-command: a parsed command line → one run directory, or a sweep / torchrun runs side by side.

The flags are the CLI contract and live in sae_toolkit/cli.py with the rest of the parser (DESIGN.md §2); here is
what runs once they are parsed: parse → call one library function → print where the output went.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sae_toolkit.errors import SAEToolkitError


def train_command(args: argparse.Namespace) -> None:
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
        # every rank is done with its collectives before any rank tears the group down (the ranks' aborts at exit
        # once blamed on this race came from a pinned group: see sae_toolkit/process_group.py)
        ctx.barrier()
    finally:
        if ctx.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ctx.is_main:
        where = "" if len(configs) == 1 else f" ({len(configs)} runs: {', '.join(Path(c.out).name for c in configs)})"
        print(f"wrote run to {root}{where}")
    return True
