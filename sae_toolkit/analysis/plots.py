"""The report's plots: plots/*.png (latent density, L0, density vs max activation, training curves) via matplotlib.

    >>> pngs = write_plots(Path("report/plots"), metrics, table, run_dir)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_plots(folder: Path, metrics: dict, table, run_dir: Path | None) -> dict[str, bytes]:
    """plots/*.png; returns name → PNG bytes for the page. Skipped (empty) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    import io

    pngs: dict[str, bytes] = {}

    def save(name: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        pngs[name] = buf.getvalue()
        (folder / f"{name}.png").write_bytes(pngs[name])

    hist = metrics["density_histogram"]
    fig, ax = plt.subplots(figsize=(4.2, 2.7))
    edges = hist["log10_edges"]
    ax.bar(edges[:-1], hist["counts"], width=edges[1] - edges[0], align="edge", color="#0b6bcb")
    ax.set(xlabel="log10(density + 1e-10)", ylabel="latents",
           title=f"Latent density ({metrics['dead_fraction']:.1%} dead)")
    save("density_histogram", fig)

    l0 = metrics["l0_histogram"]["counts"]
    fig, ax = plt.subplots(figsize=(4.2, 2.7))
    ax.bar(range(len(l0)), l0, width=1.0, color="#1a7f37")
    ax.set(xlabel="active latents per token", ylabel="tokens", title=f"L0 (mean {metrics['l0']:.1f})")
    save("l0_histogram", fig)

    alive = table[table["density"] > 0]
    if len(alive):
        fig, ax = plt.subplots(figsize=(4.2, 2.7))
        ax.scatter(np.log10(alive["density"]), alive["max_activation"], s=4, alpha=0.5, color="#8250df")
        ax.set(xlabel="log10 density", ylabel="max activation", title="Alive latents")
        save("density_vs_max", fig)

    curves = training_curves(run_dir)
    if curves:
        keys = [k for k in ("loss", "fvu", "l0", "dead_fraction") if k in curves]
        fig, axes = plt.subplots(1, len(keys), figsize=(2.1 * len(keys), 2.7), squeeze=False)
        x_key = "tokens" if "tokens" in curves else "step"
        scale = 1e6 if max(v for v in curves[x_key] if v is not None) >= 1e5 else 1.0
        for ax, k in zip(axes[0], keys):
            xs, ys = zip(*[(x / scale, y) for x, y in zip(curves[x_key], curves[k]) if x is not None and y is not None])
            ax.plot(xs, ys, color="#cf222e")
            ax.set(xlabel=f"training {x_key}" + (" (M)" if scale > 1 else ""), title=k)
            ax.tick_params(labelsize=7)
            if k in ("loss", "fvu") and min(ys) > 0:
                ax.set_yscale("log")
        fig.tight_layout()
        save("training_curves", fig)
    return pngs


def training_curves(run_dir: Path | None) -> dict[str, list]:
    """metrics.jsonl of a training run as columns (missing values None); {} without one."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        if isinstance(row, dict):
            rows.append(row)
    keys = {k for r in rows for k, v in r.items() if isinstance(v, int | float)}
    if not rows or not ({"tokens", "step"} & keys):
        return {}
    return {k: [r.get(k) for r in rows] for k in keys}

