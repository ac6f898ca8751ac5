"""`sae-toolkit explain`: one-line feature explanations from an explainer model, scored by detection.

For each feature, from its report's top_activations.jsonl:

1. the explainer sees every other top example plus half of the interval samples, activating tokens marked
   <<like this>>, and answers one line;
2. detection (Paulo et al. 2024, "Automatically interpreting millions of features"): the explainer gets the
   explanation and a shuffled list of held-out excerpts — the remaining top and interval examples (activating) and
   as many excerpts on which the feature is zero (other features' example windows, checked against the SAE and
   activation file the report was made from when they are still there) — and labels each 0/1. The score is the
   balanced accuracy ½(TP/P + TN/N): 0.5 is chance, 1 perfect.

explanations.jsonl gets one line per feature; metrics.json a summary; report.html shows both.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

from sae_toolkit.analysis.explainers import ChatClient
from sae_toolkit.analysis.report import EXPLANATIONS_NAME, load_explanations, load_report, rebuild_html
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import read_marker, write_marker

__all__ = ["EXPLANATIONS_NAME", "balanced_accuracy", "explain_report", "explanation_prompt", "parse_labels"]

_SYSTEM = "You are an interpretability researcher studying features of a language model's sparse autoencoder."
_MAX_SHOWN = 10
"""Top examples shown to the explainer at most (plus up to 3 interval samples)."""
_MAX_HELD_OUT = 10
"""Activating excerpts scored per feature at most (and as many non-activating ones)."""


def excerpt(ex: dict, mark: bool) -> str:
    """An example's tokens as one line; with ``mark``, tokens at ≥ ¼ of its peak activation wrapped in << >>."""
    parts, open_ = [], False
    cut = 0.25 * max(ex["values"] or [0.0])
    for tok, v in zip(ex["tokens"], ex["values"]):
        on = mark and v > 0 and v >= cut
        if on and not open_:
            parts.append("<<")
        if not on and open_:
            parts.append(">>")
        open_ = on
        parts.append(tok)
    if open_:
        parts.append(">>")
    return "".join(parts).replace("\r", "\\r").replace("\n", "\\n")


def explanation_prompt(shown: list[dict]) -> list[dict[str, str]]:
    """Chat messages asking for a one-line explanation of the examples in ``shown``."""
    lines = "\n".join(f"{n}. {excerpt(e, mark=True)}" for n, e in enumerate(shown, 1))
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": "Below are text excerpts on which one feature activates, strongest first. "
             "Tokens where it is active are marked <<like this>>.\n\n" + lines + "\n\nIn one short line, say what "
             "the feature detects. Reply with the explanation only."}]


def detection_prompt(explanation: str, excerpts: list[str]) -> list[dict[str, str]]:
    """Chat messages asking for a 0/1 label per excerpt given the explanation."""
    lines = "\n".join(f"{n}. {t}" for n, t in enumerate(excerpts, 1))
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"A feature is explained as: {explanation}\n\nFor each numbered excerpt "
             "below, answer 1 if the feature is active on some token of it and 0 if not.\n\n" + lines +
             f"\n\nReply with only a JSON list of {len(excerpts)} numbers (0 or 1), one per excerpt, in order."}]


def parse_explanation(reply: str) -> str:
    """The first non-empty line of the reply, without a leading 'Explanation:' or quotes; at most 300 chars."""
    for line in reply.strip().splitlines():
        line = re.sub(r"^\s*(explanation|answer)\s*:\s*", "", line.strip(), flags=re.I).strip().strip("\"'`")
        if line:
            return line[:300]
    return ""


def parse_labels(reply: str, n: int) -> list[int] | None:
    """n labels from the reply: its first JSON list, else its 0/1 digits in order; None when not exactly n."""
    m = re.search(r"\[[^\[\]]*\]", reply)
    labels: list = []
    if m:
        try:
            labels = json.loads(m.group(0))
        except json.JSONDecodeError:
            labels = []
    if not labels:
        labels = re.findall(r"\b[01]\b", reply)
    try:
        labels = [int(x) for x in labels]
    except (TypeError, ValueError):
        return None
    return labels if len(labels) == n and set(labels) <= {0, 1} else None


def balanced_accuracy(truth: list[int], pred: list[int]) -> tuple[float, float, float]:
    """(½(TPR + TNR), TPR, TNR) of 0/1 predictions; truth must hold both classes."""
    pos = [p for t, p in zip(truth, pred) if t == 1]
    neg = [p for t, p in zip(truth, pred) if t == 0]
    if not pos or not neg:
        raise SAEToolkitError("balanced accuracy needs activating and non-activating excerpts")
    tpr, tnr = sum(pos) / len(pos), sum(1 - p for p in neg) / len(neg)
    return (tpr + tnr) / 2, tpr, tnr


class _ZeroCheck:
    """Whether a feature is zero on an example window, from the SAE and activation file behind the report."""

    def __init__(self, metrics: dict) -> None:
        self.ok = False
        sae_path, acts = metrics.get("sae"), metrics.get("acts")
        if not (sae_path and acts and Path(sae_path).exists() and Path(acts).is_file()):
            return
        from sae_toolkit.activations.reader import ActsReader
        from sae_toolkit.sae import SAE

        try:
            self.sae = SAE.load(sae_path)
            self.reader = ActsReader(acts, metrics.get("hookpoint"), d_in=self.sae.cfg.d_in, tokenizer=None)
        except SAEToolkitError:
            return
        self.ok = True

    def is_zero(self, feature: int, ex: dict) -> bool:
        import torch

        from sae_toolkit.activations.format import to_float32

        start = ex["position"] - ex["peak"]
        row = ex["seq"] * self.reader.ctx + start
        x = torch.from_numpy(to_float32(self.reader.dset[row:row + len(ex["tokens"])], self.reader.dtype))
        toks = self.reader.tokens([ex["seq"]])[0, start:start + len(ex["tokens"])]
        keep = toks != (self.reader.bos_token_id if self.reader.bos_token_id is not None else -1)
        with torch.no_grad():
            f = self.sae.encode(x)[:, feature]
        return bool((f[keep] <= 0).all())

    def close(self) -> None:
        if self.ok:
            self.reader.close()


def explain_report(report: str | Path, explainer: ChatClient, *, features: list[int] | None = None,
                   n_features: int = 20, seed: int = 0) -> Path:
    """Explain and score ``features`` of a report directory (default: a seeded random sample of ``n_features``
    features with enough examples); returns the path of explanations.jsonl. Re-running replaces the lines of the
    features explained again and keeps the others."""
    from tqdm.auto import tqdm

    rep = load_report(report)
    recs = rep.top_activations
    usable = [i for i in sorted(recs) if len(recs[i]["examples"]) >= 2]
    if features is None:
        if not usable:
            raise SAEToolkitError(f"{rep.path}: no feature has 2 or more top examples to explain; analyze with "
                                  "more tokens or a larger --top-k")
        features = sorted(random.Random(seed).sample(usable, min(n_features, len(usable))))
    for i in features:
        if i not in recs:
            raise SAEToolkitError(f"feature {i} is not in {rep.path} (it has features 0 … {len(recs) - 1})")
        if len(recs[i]["examples"]) < 2:
            raise SAEToolkitError(f"feature {i} has {len(recs[i]['examples'])} top examples in {rep.path}; "
                                  "explaining and scoring needs at least 2")
    zero = _ZeroCheck(rep.metrics)
    rows = []
    try:
        for i in tqdm(features, desc="explain", unit="feature"):
            rows.append(_explain_one(i, recs, explainer, zero, random.Random(f"{seed}:{i}")))
    finally:
        zero.close()
    path = _write_rows(rep.path, rows)
    marker = read_marker(rep.path)
    if marker is not None and EXPLANATIONS_NAME not in marker["files"]:
        # the report folder's ownership record claims the new file, so reruns of explain and analyze may replace it
        write_marker(rep.path, marker["kind"], [*marker["files"], EXPLANATIONS_NAME])
    _update_metrics(rep.path, explainer.name)
    rebuild_html(rep.path)
    return path


def _explain_one(i: int, recs: dict[int, dict], explainer: ChatClient, zero: _ZeroCheck,
                 rng: random.Random) -> dict:
    rec = recs[i]
    top, intervals = rec["examples"], rec["interval_examples"]
    shown = top[0::2][:_MAX_SHOWN] + intervals[0::2][:3]
    held = (top[1::2] + intervals[1::2])[:_MAX_HELD_OUT]
    explanation = parse_explanation(explainer.chat(explanation_prompt(shown), max_tokens=60))
    own = {(e["seq"], e["position"]) for e in top + intervals}
    cands = [e for j, r in recs.items() if j != i for e in r["examples"] + r["interval_examples"]
             if (e["seq"], e["position"]) not in own]
    rng.shuffle(cands)
    neg, seen = [], set()
    for e in cands:
        if len(neg) == len(held):
            break
        text = excerpt(e, mark=False)
        if text in seen or (zero.ok and not zero.is_zero(i, e)):
            continue
        seen.add(text)
        neg.append(text)
    items = [(excerpt(e, mark=False), 1) for e in held] + [(t, 0) for t in neg]
    rng.shuffle(items)
    row = {"feature": i, "explanation": explanation, "explainer": explainer.name,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    det = {"n_activating": len(held), "n_non_activating": len(neg), "negatives_verified": zero.ok,
           "balanced_accuracy": None}
    if held and neg:
        reply = explainer.chat(detection_prompt(explanation, [t for t, _ in items]), max_tokens=8 + 4 * len(items))
        labels = parse_labels(reply, len(items))
        if labels is None:
            det["error"] = f"the explainer did not answer {len(items)} labels: {reply.strip()[:120]!r}"
        else:
            ba, tpr, tnr = balanced_accuracy([t for _, t in items], labels)
            det.update(balanced_accuracy=round(ba, 4), true_positive_rate=round(tpr, 4),
                       true_negative_rate=round(tnr, 4))
    else:
        det["error"] = "not enough held-out activating or non-activating excerpts to score"
    row["detection"] = det
    return row


def _write_rows(folder: Path, rows: list[dict]) -> Path:
    path = folder / EXPLANATIONS_NAME
    old = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                old[int(r["feature"])] = r
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    old.update({r["feature"]: r for r in rows})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(old[i], ensure_ascii=False) + "\n" for i in sorted(old)))
    os.replace(tmp, path)  # appears whole
    return path


def _update_metrics(folder: Path, name: str) -> None:
    rows = load_explanations(folder)
    scores = [r["detection"]["balanced_accuracy"] for r in rows.values()
              if r["detection"].get("balanced_accuracy") is not None]
    path = folder / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["explanations"] = {"file": EXPLANATIONS_NAME, "explainer": name, "features": len(rows),
                               "scored": len(scores),
                               "mean_balanced_accuracy": round(sum(scores) / len(scores), 4) if scores else None}
    tmp = path.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
