"""Issue 12's CPU targets in one run: the training-step ratios (`train_throughput.py`, against sparsify and SAELens
when the interpreter running this has them) and the data path (`store_throughput.py --train` at steady state),
then one table of every target: ratio, value, target, met.

    make bench-cpu                                    # builds .venv-peers (torch 2.13 CPU + sparsify + SAELens) once
    PYTHONPATH=. .venv-peers/bin/python benchmarks/cpu_targets.py    # the same, by hand

Each script prints its own JSON lines (passed through here); only ratios measured in the same run mean anything
(contenders run in interleaved rounds). A quiet machine gives the figures in benchmarks/RESULTS.md; another
process on the cores moves the ratios by ±10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(script: str, *args: str) -> list[dict]:
    """Run one benchmark script with this interpreter; its JSON lines, echoed as they come."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True, env=env)
    rows = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            rows.append(json.loads(line))
    if proc.wait() != 0:
        raise SystemExit(f"{script} failed with exit status {proc.returncode}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the training-step benchmark")
    p.add_argument("--quick", action="store_true", help="tiny shapes: only checks that it runs")
    args = p.parse_args()
    quick = ["--quick"] if args.quick else []
    rows = run("train_throughput.py", "--rounds", str(args.rounds), *quick)
    rows += run("store_throughput.py", "--batches-per-round", "8" if args.quick else "48", "--train", *quick)
    targets = [r for r in rows if r.get("target") is not None and "ratio" in r]
    if not any(r["ratio"].startswith("topk_nodead/sparsify") for r in targets):
        print("sparsify / SAELens not importable here: the peer ratios are missing (see `make bench-cpu`)")
    width = max(len(r["ratio"]) for r in targets)
    print(f"\n{'ratio':<{width}}  {'value':>7}  {'target':>7}  met")
    for r in targets:
        print(f"{r['ratio']:<{width}}  {r['value']:7.3f}  {r['target']:7.3f}  {'yes' if r['met'] else 'NO'}")


if __name__ == "__main__":
    main()
