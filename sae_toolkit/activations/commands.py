"""The `cache` and `info` sub-commands: a parsed command line → the activation file, or its description.

The flags are the CLI contract and live in sae_toolkit/cli.py with the rest of the parser (DESIGN.md §2); here is
what runs once they are parsed: parse → call one library function → print where the output went.
"""

from __future__ import annotations

import argparse


def cache_command(args: argparse.Namespace) -> None:
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


def info_command(args: argparse.Namespace) -> None:
    from sae_toolkit.activations.info import describe

    print(describe(args.file))
