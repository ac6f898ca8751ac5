"""The table at the end of benchmarks/gpu.sh: issue 12's GPU figures from the JSON lines in OUT, against targets.

    python benchmarks/gpu_table.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(out: Path, name: str) -> list[dict]:
    path = out / f"{name}.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # progress bars and warnings
    return rows


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def table(out: Path) -> str:
    lines = ["| figure | value | target | met |", "|---|---|---|---|"]

    def add(figure: str, value: float | None, target: float | None, unit: str = "") -> None:
        if value is None:
            lines.append(f"| {figure} | not measured | {target if target is not None else ''} | |")
            return
        shown = (f"{value / 1e6:.2f}M {unit}" if value >= 1e5 else f"{value:,.0f} {unit}") if unit else f"{value:.3g}"
        tgt = "" if target is None else (f"≥ {target / 1e6:.2f}M" if unit else f"≥ {target:g}")
        met = "" if target is None else ("yes" if value >= target else "**no**")
        lines.append(f"| {figure} | {shown} | {tgt} | {met} |")

    for step in _rows(out, "steps"):
        if step.get("step") == "gpu_tests":
            lines.append(f"| CUDA tests (pytest -m gpu) | {step.get('summary', '')} | all pass | "
                         f"{'yes' if step.get('rc') == 0 else '**no**'} |")
    a, b = _rows(out, "train_576"), _rows(out, "train_1536")
    a += [r for r in _rows(out, "train_576_compiled") if r.get("contender") == "topk_dead10_compiled"]
    shape = lambda rows: (f"d={rows[0]['d_in']} F={rows[0]['d_sae']} B={rows[0]['batch']}" if rows and
                          "d_in" in rows[0] else "")
    for rows, targets in ((a, {"topk_dead10": 3.0e6, "topk_dead10_compiled": 3.0e6, "relu_fresh": 3.0e6}),
                          (b, {"topk_dead10": 1.8e6, "topk_dead10_compiled": 1.8e6})):
        for r in rows:
            if r.get("bench") == "train_step":
                add(f"train step {r['contender']} ({shape(rows)})", r["tokens_per_s"], targets.get(r["contender"]),
                    "tok/s")
    store = _rows(out, "store")
    for r in store:
        if r.get("bench") == "train_from_store":
            add(f"trainer {r['contender']} (d={r['d']} F={r['d_sae']} B={r['batch']})", r["tokens_per_s"], None,
                "tok/s")
        elif r.get("bench") == "store":
            add(f"store {r['contender']} (d={r['d']} batch {r['batch']})", r["rows_per_s"], None, "rows/s")
    ratio = _find(store, bench="train_from_store_ratio")
    add("training fed from fp16 HDF5 / step only", ratio and ratio["value"], 0.9)
    ratio = _find(store, bench="store_ratio")
    add("store streaming / raw h5py sequential read", ratio and ratio["value"], None)
    cache = _rows(out, "cache")
    for r in cache:
        if r.get("measure") in ("forward_early_stop", "h5py_append"):
            add(f"cache {r['measure']}", r["tokens_per_s"], None, "tok/s")
    e2e = _find(cache, measure="cache_end_to_end")
    add("cache SmolLM2-shaped layer 15 → fp16 HDF5, end to end (excl. model load)",
        e2e and e2e["tokens_per_s_excluding_load"], 0.8e6, "tok/s")
    failed = [s["step"] for s in _rows(out, "steps") if s.get("rc") not in (0, None) and s["step"] != "gpu_tests"]
    if failed:
        lines.append(f"\nsteps that exited non-zero: {', '.join(failed)} (see their .log in {out})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
