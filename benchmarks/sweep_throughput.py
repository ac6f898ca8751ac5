"""Sweep throughput: tokens/s of training several SAEs side by side (one read of the data) vs one after another.

One JSON line per measurement, then one summary line per source with the ratio. Both modes run in the same
process in interleaved rounds on the same data: `sweep` = one `train_sweep` over all k values; `sequential` =
one `train_sweep` per k, back to back. tokens_per_s = training tokens / wall seconds for *all* the SAEs.

Sources: `model` streams activations from the model (the forward pass is the shared cost); `cache` reads an
HDF5 file (written once, before timing) through the ActivationStore.

    python benchmarks/sweep_throughput.py                          # SmolLM2-135M mlp_out.6, CPU-sized
    python benchmarks/sweep_throughput.py --model tiny-llama --hookpoint mlp_out.1 --tokens 8k --rounds 1
    python benchmarks/sweep_throughput.py --device cuda --tokens 2M --batch-size 4096   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # bars would dominate the output; the JSON lines are the result

from sae_toolkit.activations.cacher import cache_activations  # noqa: E402
from sae_toolkit.activations.config import CacheConfig  # noqa: E402
from sae_toolkit.activations.stream import StreamConfig  # noqa: E402
from sae_toolkit.training.config import TrainConfig  # noqa: E402
from sae_toolkit.training.sweep import sweep_configs, train_sweep  # noqa: E402


def run(configs: list[TrainConfig], stream: StreamConfig | None) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train_sweep(configs, stream=stream)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="builtin:pydoc")
    p.add_argument("--hookpoint", default="mlp_out.6")
    p.add_argument("--ks", default="16,32,64", help="the sweep: one TopK SAE per k")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--tokens", default="16k")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sources", default="model,cache")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from sae_toolkit.units import parse_size

    tokens = parse_size(args.tokens) // args.batch_size * args.batch_size
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        acts = tmp_path / "acts.h5"
        if "cache" in args.sources:
            with contextlib.redirect_stdout(io.StringIO()):
                cache_activations(CacheConfig(model=args.model, hookpoints=[args.hookpoint], dataset=args.dataset,
                                              tokens=tokens * 2, context_size=args.context_size, device=args.device,
                                              out=str(acts)))
        for source in args.sources.split(","):
            stream = StreamConfig(args.model, args.dataset, [args.hookpoint], context_size=args.context_size) \
                if source == "model" else None
            times: dict[str, list[float]] = {"sweep": [], "sequential": []}
            for r in range(args.rounds):
                for mode in ("sweep", "sequential"):  # interleaved: machine-load drift hits both modes alike
                    out = tmp_path / f"{source}-{mode}-{r}"
                    base = TrainConfig(acts=str(acts) if source == "cache" else "", hookpoint=args.hookpoint,
                                       arch="topk", batch_size=args.batch_size, tokens=tokens, device=args.device,
                                       log_every=10**9, out=str(out))
                    configs = sweep_configs(base, hookpoints=[args.hookpoint], archs=["topk"],
                                            expansions=[args.expansion], ks=ks)
                    if mode == "sweep":
                        seconds = run(configs, stream)
                    else:
                        seconds = sum(run([TrainConfig.from_dict({**c.to_dict(), "out": f"{c.out}-solo"})], stream)
                                      for c in configs)
                    times[mode].append(seconds)
                    print(json.dumps({"bench": "sweep_throughput", "source": source, "mode": mode, "round": r,
                                      "model": args.model, "hookpoint": args.hookpoint, "n_saes": len(ks),
                                      "tokens": tokens, "batch_size": args.batch_size, "device": args.device,
                                      "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}),
                          flush=True)
            sweep, seq = statistics.median(times["sweep"]), statistics.median(times["sequential"])
            print(json.dumps({"bench": "sweep_throughput", "source": source, "summary": True, "n_saes": len(ks),
                              "sweep_tokens_per_s": round(tokens / sweep, 1),
                              "sequential_tokens_per_s": round(tokens / seq, 1),
                              "speedup": round(seq / sweep, 3)}), flush=True)


if __name__ == "__main__":
    main()
