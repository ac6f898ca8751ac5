"""A/B of W_enc's memory layout: latent-major W_enc with the trainer's Adam (`training.step.Adam`, "new") against
the d_in-major W_enc of before with torch's fused Adam ("old"), for contenders of `train_throughput.py`, both in the
same process in interleaved rounds (order rotated per round), median per contender. One thread: process time;
more: wall time. One JSON line per contender.

    PYTHONPATH=. python benchmarks/layout_ab.py                    # 2 threads, 15 rounds
    PYTHONPATH=. python benchmarks/layout_ab.py --threads 1 --only topk_nodead gated_sparse2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as tt  # noqa: E402


def _old_optimizer(sae, lr, device=None):
    """W_enc copied back to d_in-major (the kernels take either layout) and torch's own fused Adam."""
    with torch.no_grad():
        sae.W_enc.data = sae.W_enc.data.contiguous()
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", default=["topk_nodead", "topk_dead10", "jumprelu_l0k_band", "relu_sparse2"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    xs = tt._batches(576, 1024, dev)
    new = tt.toolkit_contenders(576, 4608, dev, xs[0], False, set(a.only))
    tt.make_optimizer, saved = _old_optimizer, tt.make_optimizer
    try:
        old = tt.toolkit_contenders(576, 4608, dev, xs[0], False, set(a.only))
    finally:
        tt.make_optimizer = saved
    steps = {**{n + "/new": f for n, f in new.items()}, **{n + "/old": f for n, f in old.items()}}
    clock = time.process_time if a.threads == 1 else time.perf_counter
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        for i in range(2):
            steps[n](xs[i])
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = clock()
            steps[n](xs[r % 4])
            times[n].append(clock() - t)
    for n in a.only:
        o, w = statistics.median(times[n + "/old"]) * 1e3, statistics.median(times[n + "/new"]) * 1e3
        print(json.dumps({"contender": n, "old_ms": round(o, 2), "new_ms": round(w, 2), "old/new": round(o / w, 3),
                          "threads": a.threads}))


if __name__ == "__main__":
    main()
