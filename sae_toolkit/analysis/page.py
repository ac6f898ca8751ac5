"""What report.html embeds: the report's metrics, features table and latent records as the page's compact data.

    >>> render(page_data(metrics, table, records, plots, html_examples=10))  # doctest: +SKIP
"""

from __future__ import annotations

import math

from sae_toolkit import __version__

_HTML_EXAMPLE_LINES = 200_000
"""Example lines report.html embeds at most (about 40 MB of page); see `page_data`."""


def page_data(metrics: dict, table, records: list[dict], plots: dict[str, bytes], html_examples: int) -> dict:
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
