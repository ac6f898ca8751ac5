"""A/B of the CPU training step's seventh-round changes, on one thread, in process time, interleaved rounds.

For each contender of `train_throughput.py` two copies run side by side in the same process: "new" (this tree) and
"old" with the round's changes switched back — JumpReLU's `training_loss` from an older tree's `sae/jumprelu.py`
(the row-major fused step with sorted band entries), AuxK's dead block in float32 (`kernels.LOW_PRECISION_SUMS`),
torch's bool counts instead of numpy's and `torch.linalg.vecdot` instead of `kernels.row_dots`. Each round runs one
step of every copy (order rotated per round); a figure is the median over rounds of `time.process_time()`, which a
busy machine disturbs far less than wall time on one thread. One JSON line per contender.

    git archive 6d1877c sae_toolkit | tar -x -C /tmp/base      # the tree before the round
    PYTHONPATH=. python benchmarks/step_ab.py --baseline /tmp/base --only topk_dead10 jumprelu_l0k_band
    PYTHONPATH=. python benchmarks/step_ab.py --bf16-only --only jumprelu_sparse2_band   # the bf16 sums alone
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as tt  # noqa: E402

from sae_toolkit.sae import jumprelu, kernels, registry  # noqa: E402


def _old_jumprelu(tree: Path):
    """The JumpReLUSAE class of an older tree's sae/jumprelu.py, loaded without registering it."""
    path = tree / "sae_toolkit" / "sae" / "jumprelu.py"
    register, registry.register = registry.register, (lambda cls: cls)
    try:
        spec = importlib.util.spec_from_file_location("_baseline_jumprelu", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        registry.register = register
    return mod.JumpReLUSAE


def _switches(old_cls) -> dict[tuple[object, str], object]:
    J = jumprelu.JumpReLUSAE
    return {(J, "training_loss"): old_cls.training_loss, (J, "_fused_tanh_loss"): old_cls._fused_tanh_loss,
            (kernels, "LOW_PRECISION_SUMS"): False,
            (kernels, "count_true"): lambda m: int(m.sum().item()),
            (kernels, "max_true_per_row"): lambda m: int(m.sum(-1).max()),
            (kernels, "row_dots"): lambda a, b: torch.linalg.vecdot(a, b)}


def _with(switches: dict, step: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    def run(x: torch.Tensor) -> None:
        saved = {k: getattr(*k) for k in switches}
        for (obj, attr), value in switches.items():
            setattr(obj, attr, value)
        try:
            step(x)
        finally:
            for (obj, attr), value in saved.items():
                setattr(obj, attr, value)
    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, help="a tree holding sae_toolkit/ before the round")
    p.add_argument("--only", nargs="+", default=["topk_dead10", "topk_nodead", "jumprelu_l0k_band",
                                                 "jumprelu_l0k", "jumprelu_sparse2_band"])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16-only", action="store_true",
                   help='"old" = this tree with only kernels.LOW_PRECISION_SUMS off (no --baseline needed)')
    args = p.parse_args(argv)
    if not args.bf16_only and args.baseline is None:
        p.error("--baseline is required unless --bf16-only")
    torch.set_num_threads(args.threads)
    switches = ({(kernels, "LOW_PRECISION_SUMS"): False} if args.bf16_only
                else _switches(_old_jumprelu(args.baseline)))
    cpu = torch.device("cpu")
    batches = tt._batches(576, 1024, cpu)
    steps = {}
    for name in args.only:
        for variant in ("new", "old"):
            step = tt.toolkit_contenders(576, 4608, cpu, batches[0], False, {name})[name]
            steps[(name, variant)] = step if variant == "new" else _with(switches, step)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    items = list(steps.items())
    for r in range(args.rounds):
        k = r % len(items)
        for key, step in items[k:] + items[:k]:
            t = time.process_time()
            step(batches[r % len(batches)])
            times[key].append(time.process_time() - t)
    for name in args.only:
        new, old = (statistics.median(times[(name, v)][2:]) for v in ("new", "old"))
        print(json.dumps({"contender": name, "new_ms": round(1000 * new, 1), "old_ms": round(1000 * old, 1),
                          "old_over_new": round(old / new, 3), "old": "fp32 sums" if args.bf16_only else "baseline",
                          "threads": args.threads, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
