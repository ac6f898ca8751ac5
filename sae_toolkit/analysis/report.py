"""The report directory of `sae-toolkit analyze`: metrics.json, features.parquet/csv, top_activations.jsonl,
report.html (offline dashboard), plots/*.png and exports/ for SAEBench and Neuronpedia — and `load_report`.
The page's data comes from page.py, its plots from plots.py, the page itself from html.py.

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
from sae_toolkit.analysis.page import page_data
from sae_toolkit.analysis.plots import write_plots
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import atomic_dir, check_out_dir, only_names
from sae_toolkit.units import resolve_device

EXPLANATIONS_NAME = "explanations.jsonl"
"""Written by `sae-toolkit explain` (explanations.py) into the report directory; the page shows it."""

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

    plots = write_plots(out / "plots", metrics, table, run_dir)
    data = page_data(metrics, table, records, plots, html_examples)
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
