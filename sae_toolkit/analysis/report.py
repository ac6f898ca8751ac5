"""The report directory of `sae-toolkit analyze`: metrics.json, features.parquet/csv, top_activations.jsonl,
report.html (offline dashboard), plots/*.png and exports/ for SAEBench and Neuronpedia — and `load_report`.

    >>> out = build_report("run", acts="acts.h5", out="report")  # doctest: +SKIP
    >>> rep = load_report(out); rep.features.sort_values("density").tail()  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sae_toolkit import __version__
from sae_toolkit.analysis.effects import AblationEffects, ablation_effects, pick_sites
from sae_toolkit.analysis.evaluation import (
    ActsReader,
    LogitLens,
    Scan,
    WeightStats,
    feature_table,
    latent_record,
    logit_lens,
    model_metrics,
    scan,
    weight_stats,
)
from sae_toolkit.analysis.metrics import density_histogram
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import atomic_dir, check_out_dir, only_names
from sae_toolkit.units import resolve_device

EXPLANATIONS_NAME = "explanations.jsonl"
"""Written by `sae-toolkit explain` (explanations.py) into the report directory; the page shows it."""

_HTML_EXAMPLE_LINES = 200_000
"""Example lines report.html embeds at most (about 40 MB of page); see `_page_data`."""

MAX_TOP_K = 1000
"""Most top examples per latent `analyze` keeps: the scan's cost grows with k for every latent (the issue measured
159 s instead of 3.6 s for an uncapped value)."""

REPORT_FILES = {"metrics.json", "features.csv", "features.parquet", "top_activations.jsonl", "report.html", "plots",
                "exports"}
"""What a report directory holds; an unmarked folder of only these (and a metrics.json naming sae-toolkit's
version) is a report an older sae-toolkit wrote, which --force may replace."""


def _written_by_us(folder: Path) -> bool:
    try:
        return "sae_toolkit" in json.loads((folder / "metrics.json").read_text())["versions"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


REPORT_LEGACY = only_names(REPORT_FILES, _written_by_us)


class Report(NamedTuple):
    """A report directory loaded back (see `load_report`)."""

    metrics: dict
    """metrics.json."""
    features: object
    """features table as a pandas DataFrame, one row per latent."""
    top_activations: dict[int, dict]
    """top_activations.jsonl by feature index."""
    path: Path
    """The report directory."""


def build_report(path: str | Path, *, acts: str | Path, out: str | Path, model: str | None = None,
                 tokens: int | None = None, top_k: int = 20, device: str = "auto",
                 seq_range: tuple[int, int] | None = None, ce_windows: int = 64, batch_tokens: int = 4096,
                 force: bool = False, allow_mismatch: bool = False,
                 outlier_multiple: float | None = 5.0, exclude_first_positions: int = 0,
                 effects: int = 16, effect_examples: int = 4, effect_features: list[int] | None = None) -> Path:
    """Analyze the SAE of `path` (a training RUN_DIR with sae/ and metrics.jsonl, or an SAE directory) on the
    activation file `acts` and write the report directory `out`; returns `out`.

    tokens / seq_range limit the evaluated windows. With `model` (a model SPEC), also the logit lens and CE/KL with
    the SAE spliced in, over the first `ce_windows` evaluated windows (four forwards each), and the measured
    ablation effects (effects.py) of `effects` features (or of `effect_features`) at `effect_examples` top
    examples each (two forwards per example; effects=0 turns them off). outlier_multiple,
    exclude_first_positions: the massive-activation positions to exclude (activations.outliers).

    `out` must be new, empty or an earlier report (files.py); it appears complete or not at all. The SAE must have
    finite weights and match the activations and `model` (compatibility.py) unless allow_mismatch.
    """
    from sae_toolkit.analysis.compatibility import check_acts, check_model
    from sae_toolkit.sae import SAE
    from sae_toolkit.sae.checks import require_finite_weights

    if not 0 <= top_k <= MAX_TOP_K:
        raise SAEToolkitError(f"--top-k {top_k} is outside 0..{MAX_TOP_K}; more examples per latent make the scan "
                              f"far slower (each is kept for every latent): pass at most {MAX_TOP_K}")
    if ce_windows < 1:
        raise SAEToolkitError(f"--ce-windows {ce_windows} must be at least 1 (windows for the CE/KL metrics)")
    check_out_dir(out, "report", force=force, legacy=REPORT_LEGACY)
    device = resolve_device(device)
    path = Path(path)
    run_dir = path if (path / "sae" / "cfg.json").is_file() else None
    sae = SAE.load(path, device=device)
    require_finite_weights(sae, path)
    notes = check_model(sae, model, allow_mismatch=allow_mismatch, where=path)
    t0 = time.perf_counter()
    try:
        reader = ActsReader(acts, sae.cfg.hookpoint or None, d_in=sae.cfg.d_in, seq_range=seq_range, tokens=tokens,
                             outlier_multiple=outlier_multiple, exclude_first_positions=exclude_first_positions)
    except SAEToolkitError:
        if not allow_mismatch:
            raise
        # another hookpoint of the SAE's width, if the file holds exactly one (check_acts notes the mismatch)
        reader = ActsReader(acts, None, d_in=sae.cfg.d_in, seq_range=seq_range, tokens=tokens,
                             outlier_multiple=outlier_multiple, exclude_first_positions=exclude_first_positions)
    with reader:
        notes += check_acts(sae, reader, allow_mismatch=allow_mismatch, where=path)
        res = scan(sae, reader, top_k=top_k, device=device, batch_tokens=batch_tokens,
                   massive_multiple=outlier_multiple)
        lens, model_m, effects_res = None, {}, None
        if model:
            from sae_toolkit.model.loading import load_model

            mdl, tok = load_model(model, device=device)
            try:
                # a transcoder's decoder writes into its target, so the lens reads from there
                lens = logit_lens(sae, mdl, tok, hookpoint=sae.cfg.target or reader.hookpoint)
            except SAEToolkitError as e:
                notes.append(f"logit lens skipped: {e}")
            s0 = reader.seq_range[0]
            n_ce = min(ce_windows, reader.seq_range[1] - s0)
            ids = reader.tokens(list(range(s0, s0 + n_ce)))
            mean_act = res.metrics.mean_x.float() if res.metrics.mean_x is not None else None
            acc = model_metrics(sae, mdl, ids, hookpoint=reader.hookpoint, bos_token_id=reader.bos_token_id,
                                device=device, mean_act=mean_act, excluded_positions=reader.excluded_positions)
            model_m = acc.compute()
            notes.append(f"CE/KL over the first {n_ce} of {reader.seq_range[1] - s0} evaluated windows "
                         f"(sequences {s0}..{s0 + n_ce}; raise with --ce-windows)")
            if res.top is not None and (effects > 0 or effect_features):
                effects_res = _measure_effects(sae, mdl, tok, res, reader, effects, effect_examples,
                                               effect_features, device, notes)
            del mdl
    provenance = {
        "sae": str(path.resolve()), "run_dir": str(run_dir.resolve()) if run_dir else None,
        "acts": str(Path(acts).resolve()), "eval_model": model, "device": device,
        "analysis_seconds": round(time.perf_counter() - t0, 2),
    }
    return write_report(out, sae, res, weight_stats(sae), lens=lens, model_metrics=model_m, notes=notes,
                        provenance=provenance, run_dir=run_dir, force=force,
                        effects=effects_res)


def _measure_effects(sae, mdl, tok, res: Scan, reader: ActsReader, n: int, per_latent: int,
                     latents: list[int] | None, device: str, notes: list[str]) -> AblationEffects | None:
    bad = [i for i in latents or [] if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise SAEToolkitError(f"effect feature {bad[0]} is not a latent of this SAE; use 0 … {sae.cfg.d_sae - 1}")
    sites = pick_sites(res, n, per_latent, latents)
    windows = dict(zip(sorted({s for lst in sites.values() for s, _ in lst}),
                       reader.tokens(sorted({s for lst in sites.values() for s, _ in lst}))))
    try:
        eff = ablation_effects(sae, mdl, tok, sites, windows, hookpoint=reader.hookpoint, device=device)
    except SAEToolkitError as e:
        notes.append(f"ablation effects skipped: {e}")
        return None
    notes.append(f"ablation effects for {len(sites)} features (raise with --effects N, 0 turns them off)")
    return eff


def write_report(out: str | Path, sae, res: Scan, weights: WeightStats, *, lens: LogitLens | None = None,
                 model_metrics: dict | None = None, notes: list[str] | None = None, provenance: dict | None = None,
                 run_dir: Path | None = None, html_examples: int = 10, force: bool = False,
                 effects: AblationEffects | None = None) -> Path:
    """Write every file of the report directory from analysis results (build_report's second half).

    Written into a temporary sibling and renamed into place: a kill leaves the old report or the new one, and a
    rewrite leaves none of the old report's files (e.g. Neuronpedia batches of a larger SAE) behind."""
    with atomic_dir(out, "report", force=force, legacy=REPORT_LEGACY) as tmp:
        _write_report_files(tmp, sae, res, weights, lens, model_metrics, notes, provenance, run_dir, html_examples,
                            effects)
    return Path(out)


def _write_report_files(out: Path, sae, res: Scan, weights: WeightStats, lens: LogitLens | None,
                        model_metrics: dict | None, notes: list[str] | None, provenance: dict | None,
                        run_dir: Path | None, html_examples: int,
                        effects: AblationEffects | None) -> None:
    from sae_toolkit.analysis.exports import write_neuronpedia, write_saebench

    (out / "plots").mkdir(parents=True, exist_ok=True)
    notes = list(notes or [])
    table = feature_table(res, weights, lens)
    # Quote every string: token strings such as "\r" would otherwise split a row for most CSV readers.
    table.to_csv(out / "features.csv", index=False, quoting=csv.QUOTE_NONNUMERIC)
    try:
        table.to_parquet(out / "features.parquet", index=False)
    except ImportError:
        notes.append("features.parquet skipped: install pyarrow (pip install 'sae-toolkit[report]')")
    metrics = _clean(_metrics_json(sae, res, model_metrics or {}, notes, provenance or {}, lens))
    metrics["ablation_effects"] = None if effects is None else {"features": len(effects.examples),
                                                                 "note": effects.note}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")

    records = []
    with open(out / "top_activations.jsonl", "w") as fh:
        for i in range(sae.cfg.d_sae):
            rec = latent_record(res, i) if res.top is not None else {
                "feature": i, "density": float(res.metrics.density[i]),
                "max_activation": float(res.metrics.act_max[i]), "examples": [], "interval_examples": []}
            rec["mean_activation"] = float(res.metrics.mean_activation[i])
            if lens is not None:
                rec["logit_pos"] = [{"token": t, "value": float(v)} for t, v in
                                    zip(lens.top_tokens[i], lens.top_values[i].tolist())]
                rec["logit_neg"] = [{"token": t, "value": float(v)} for t, v in
                                    zip(lens.bottom_tokens[i], lens.bottom_values[i].tolist())]
            if effects is not None and i in effects.examples:
                rec["ablation_falls"] = [{"token": t, "value": v} for t, v in effects.falls[i]]
                rec["ablation_rises"] = [{"token": t, "value": v} for t, v in effects.rises[i]]
                rec["ablation_examples"] = effects.examples[i]
            _round_examples(rec)
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            records.append(rec)

    _write_page(out, metrics, table, records, run_dir, html_examples)
    write_saebench(out / "exports" / "saebench_core.json", sae, metrics, table)
    write_neuronpedia(out / "exports" / "neuronpedia", sae, metrics, records)


def _write_page(out: Path, metrics: dict, table, records: list[dict], run_dir: Path | None,
                html_examples: int) -> None:
    from sae_toolkit.analysis.html import render

    plots = _plots(out / "plots", metrics, table, run_dir)
    data = _page_data(metrics, table, records, plots, html_examples)
    data["explanations"] = {i: [r.get("explanation", ""), (r.get("detection") or {}).get("balanced_accuracy")]
                            for i, r in load_explanations(out).items()}
    page = render(data)
    (out / "report.html").write_text(page, encoding="utf-8")


def rebuild_html(path: str | Path, html_examples: int = 10) -> Path:
    """Redraw plots/ and report.html of an existing report directory from its own files (no SAE, model or
    activation file needed), e.g. after upgrading sae-toolkit; returns the page's path."""
    from sae_toolkit.files import MARKER

    rep = load_report(path)
    run_dir = Path(rep.metrics["run_dir"]) if rep.metrics.get("run_dir") else None
    records = [rep.top_activations[i] for i in sorted(rep.top_activations)]
    # The old page stays until the new one is complete; plots/ is redrawn from scratch (no stale plot survives).
    with atomic_dir(rep.path, "report", force=True, legacy=REPORT_LEGACY, flag="report") as tmp:
        shutil.copytree(rep.path, tmp, dirs_exist_ok=True, ignore=lambda d, names: [
            n for n in names if n in (MARKER, "report.html") or (Path(d) == rep.path and n == "plots")])
        (tmp / "plots").mkdir()
        _write_page(tmp, rep.metrics, rep.features, records, run_dir, html_examples)
    return rep.path / "report.html"


def load_explanations(folder: str | Path) -> dict[int, dict]:
    """explanations.jsonl of a report directory by feature ({} when `explain` has not run on it)."""
    path = Path(folder) / EXPLANATIONS_NAME
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[int(r["feature"])] = r
    return out


def load_report(path: str | Path) -> Report:
    """Load a report directory: metrics dict, features DataFrame, top activations by feature index."""
    import pandas as pd

    path = Path(path)
    if not (path / "metrics.json").is_file():
        raise SAEToolkitError(f"{path} is not a report directory (no metrics.json); write one with "
                              "`sae-toolkit analyze`")
    metrics = json.loads((path / "metrics.json").read_text())
    try:
        features = pd.read_parquet(path / "features.parquet")
    except (ImportError, FileNotFoundError):
        features = pd.read_csv(path / "features.csv", keep_default_na=False)
    top = {}
    with open(path / "top_activations.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            top[rec["feature"]] = rec
    return Report(metrics, features, top, path)


# ---- pieces -------------------------------------------------------------------------------------------------


def _metrics_json(sae, res: Scan, model_m: dict, notes: list[str], provenance: dict,
                  lens: LogitLens | None) -> dict:
    import transformers

    m = res.metrics.compute()
    r = res.reader
    counts, edges = density_histogram(res.metrics.density)
    l0_counts = res.metrics.l0_counts.tolist()
    while len(l0_counts) > 1 and l0_counts[-1] == 0:
        l0_counts.pop()
    return {
        **m,
        **model_m,
        "tokens_evaluated": m["tokens"],
        "seqs_evaluated": r.seq_range[1] - r.seq_range[0],
        "seq_range": list(r.seq_range),
        "hookpoint": r.hookpoint,
        "target": sae.cfg.target or None,
        "skip": bool(sae.cfg.skip),
        "model": r.model,
        "dataset": r.dataset,
        "context_size": r.ctx,
        "arch": sae.cfg.arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "d_out": sae.cfg.d_out,
        # one exclusion set for metrics and top activations alike
        "excluded_token_ids": r.special_ids.tolist(),
        "excluded_positions": r.excluded_positions.nonzero().flatten().tolist(),
        "excluded_tokens": dict(r.n_excluded),
        # reported, not excluded: they hold much of the variance and the model needs them (analysis/sinks.py)
        "massive_tokens": None if res.massive is None else res.massive.summary(res.metrics),
        "sink_latents": None if res.massive is None else res.massive.sink_summary(),
        "ce_loss_recovered_baseline": "zero ablation: (ce_zero_ablation - ce_sae) / (ce_zero_ablation - ce_clean);"
                                      " ce_loss_recovered_mean uses the mean activation instead of zeros",
        "logit_lens": None if lens is None else lens.note,
        "notes": notes,
        "density_histogram": {"counts": counts, "log10_edges": edges},
        "l0_histogram": {"counts": l0_counts},
        **provenance,
        "versions": {"sae_toolkit": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _clean(o):
    """NaN/inf → None, recursively (JSON has no NaN)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def _round_examples(rec: dict) -> None:
    # float32 activations carry ~7 digits; 6 keep the file small without changing any comparison that matters.
    for ex in rec["examples"] + rec["interval_examples"]:
        ex["values"] = [float(f"{v:.6g}") for v in ex["values"]]
        ex["activation"] = float(f"{ex['activation']:.6g}")


def _plots(folder: Path, metrics: dict, table, run_dir: Path | None) -> dict[str, bytes]:
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

    curves = _training_curves(run_dir)
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


def _training_curves(run_dir: Path | None) -> dict[str, list]:
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


def _page_data(metrics: dict, table, records: list[dict], plots: dict[str, bytes], html_examples: int) -> dict:
    """What report.html embeds: token strings interned in one vocab list to keep the page small."""
    from sae_toolkit.analysis.html import finite, png_data_uri

    vocab: dict[str, int] = {}

    def tid(s: str) -> int:
        return vocab.setdefault(s, len(vocab))

    def ex_row(e: dict) -> list:
        return [finite(e["activation"]), e["seq"], e["peak"], [tid(t) for t in e["tokens"]],
                [finite(v, 3) or 0 for v in e["values"]]]

    features, examples, lens_data, effects_data = [], {}, {}, {}
    # The page holds every alive latent's examples; past ~200k example lines a browser struggles, so large
    # dictionaries show fewer per latent (the full lists stay in top_activations.jsonl).
    alive = sum(1 for r in records if r["examples"])
    per_latent = max(3, min(html_examples, _HTML_EXAMPLE_LINES // max(1, alive)))
    cols = table[["feature", "density", "mean_activation", "max_activation", "enc_dec_cos", "nearest_feature",
                  "nearest_cos"]].to_numpy()
    for row, rec in zip(cols, records):
        i = int(row[0])
        peak = rec["examples"][0]["tokens"][rec["examples"][0]["peak"]] if rec["examples"] else ""
        features.append([i, finite(row[1], 5) or 0, finite(row[2]) or 0, finite(row[3]) or 0,
                         finite(row[4]) or 0, int(row[5]), finite(row[6]) or 0, tid(peak),
                         1 if rec.get("sink") else 0])
        if rec["examples"]:
            examples[i] = {"top": [ex_row(e) for e in rec["examples"][:per_latent]],
                           "intervals": [ex_row(e) for e in _one_per_interval(rec["interval_examples"])]}
        if "logit_pos" in rec:
            lens_data[i] = {"pos": [[tid(p["token"]), finite(p["value"])] for p in rec["logit_pos"]],
                            "neg": [[tid(p["token"]), finite(p["value"])] for p in rec["logit_neg"]]}
        if "ablation_falls" in rec:
            effects_data[i] = {"falls": [[tid(p["token"]), finite(p["value"])] for p in rec["ablation_falls"]],
                               "rises": [[tid(p["token"]), finite(p["value"])] for p in rec["ablation_rises"]],
                               "n": rec["ablation_examples"]}
    m = metrics
    pct = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.1%}"
    num = lambda v, d=3: "n/a" if v is None or not math.isfinite(v) else f"{v:.{d}f}"
    sig = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"
    cards = [("explained variance", num(m["explained_variance"])), ("FVU", num(m["fvu"])), ("L0", num(m["l0"], 1)),
             ("dead latents", pct(m["dead_fraction"])), ("MSE", sig(m["mse"])),
             ("cosine sim", num(m["cosine_sim"])), ("L2 ratio", num(m["l2_ratio"]))]
    if "ce_clean" in m:
        cards += [("CE loss recovered (vs zero ablation)", num(m["ce_loss_recovered"])),
                  ("CE loss recovered (vs mean ablation)", num(m.get("ce_loss_recovered_mean"))),
                  ("Δ CE (nats)", num(m["delta_ce"])),
                  ("KL(clean‖SAE)", num(m["kl_sae"])), ("CE clean", num(m["ce_clean"]))]
    cards.append(("tokens evaluated", f"{m['tokens_evaluated']:,}"))
    massive, sinks = m.get("massive_tokens"), m.get("sink_latents")
    if massive:
        cards.append(("massive-activation tokens (kept in the metrics)",
                      f"{massive['count']:,} ({pct(massive['fraction'])}, {pct(massive['variance_share'])} of the "
                      f"variance; EV without them {num(massive['explained_variance_without'])})"))
    if sinks:
        cards.append(("sink latents (peak on massive tokens; hidden from the default list)", f"{sinks['count']:,}"))
    if m.get("excluded_positions"):
        cards.append(("massive-activation positions excluded",
                      f"{', '.join(map(str, m['excluded_positions']))} "
                      f"({m['excluded_tokens']['outlier_positions']:,} tokens)"))
    title = f"SAE report — {m['hookpoint']}" + (f" of {m['model']}" if m["model"] else "")
    k = f", k={m['k']}" if m.get("k") else ""
    kind = "SAE"
    if m.get("target"):  # transcoders: say what is read and what is written
        kind = "skip transcoder" if m.get("skip") else "transcoder"
        title = f"{kind.capitalize()} report — reads {m['hookpoint']}, writes {m['target']}" + (
            f" of {m['model']}" if m["model"] else "")
        k += f", d_out={m['d_out']}"
    subtitle = (f"{m['arch']} {kind}, d_in={m['d_in']}, d_sae={m['d_sae']}{k} · dataset {m['dataset'] or '?'} · "
                f"{m['seqs_evaluated']} windows of {m['context_size']} tokens · sae-toolkit {__version__}")
    return {
        "meta": {"title": title, "subtitle": subtitle, "notes": " · ".join(m["notes"]),
                 "sink_rule": (f"{sinks['rule']} (massive: {massive['rule']})" if sinks and massive else ""),
                 "lens_note": m["logit_lens"] or "", "default_feature": _default_feature(records)},
        "cards": cards,
        "plots": [[name, png_data_uri(png)] for name, png in plots.items()],
        "vocab": list(vocab),
        "features": features,
        "examples": examples,
        "lens": lens_data,
        "effects": effects_data,
    }


def _one_per_interval(examples: list[dict]) -> list[dict]:
    seen, out = set(), []
    for e in examples:  # sorted by activation, so each interval's strongest sample is kept
        key = tuple(e["interval"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _default_feature(records: list[dict]) -> int | None:
    """The feature shown first: the one whose top examples most agree on their peak token (an easy one to name),
    ties broken by max activation, sink latents aside; the first feature when none has enough examples."""
    best, best_key = None, None
    for rec in records:
        if rec.get("sink"):
            continue
        peaks = [e["tokens"][e["peak"]].strip() for e in rec["examples"]]
        if len(peaks) < 3:
            continue
        share = max(peaks.count(p) for p in set(peaks)) / len(peaks)
        key = (share, rec["max_activation"])
        if best_key is None or key > best_key:
            best, best_key = rec["feature"], key
    return best if best is not None else (records[0]["feature"] if records else None)
