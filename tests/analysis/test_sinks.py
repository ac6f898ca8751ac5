"""Massive-activation tokens and sink latents (analysis/sinks.py): a planted massive direction on scattered tokens
is found (the per-position rule misses it), the latent reading it is flagged in every report file and left out of
the dashboard's default view, and the counts reach metrics.json and the demo's summary."""

import json
import re

import numpy as np
import pytest
import torch
from _report_helpers import BOS, perfect_relu_sae, write_acts

from sae_toolkit.analysis.report import build_report, load_report
from sae_toolkit.analysis.sinks import MassiveTokens, sink_shares
from sae_toolkit.demo import DemoResult, format_summary, nameable_features

N_SEQS, CTX, D = 24, 16, 8
MASSIVE = [(s, 1 + (5 * s) % (CTX - 1)) for s in range(12)]  # one per window, at 12 different positions


def _planted(tmp_path):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(N_SEQS, CTX, D)).astype(np.float32)
    acts[..., 0] = -np.abs(acts[..., 0])  # latent 0 (relu of dimension 0) fires only on the massive tokens
    for s, p in MASSIVE:
        acts[s, p] = 0.05 * rng.normal(size=D)
        acts[s, p, 0] = 40.0  # ~15x the median norm (~2.7), always along the same direction
    tokens = rng.integers(3, 40, size=(N_SEQS, CTX))
    tokens[:, 0] = BOS
    return write_acts(tmp_path / "acts.h5", acts, tokens), acts


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sinks")
    path, acts = _planted(tmp)
    sae = perfect_relu_sae(D)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # x̂ = x / 2: a reconstruction whose EV is known in closed form
    sae.save(tmp / "sae")
    out = build_report(tmp / "sae", acts=path, out=tmp / "report", top_k=5, device="cpu", effects=0)
    return out, acts


def test_planted_massive_tokens_are_counted_and_the_position_rule_misses_them(planted_report):
    out, acts = planted_report
    m = json.loads((out / "metrics.json").read_text())
    assert m["excluded_tokens"]["outlier_positions"] == 0  # no position has a massive median
    mt = m["massive_tokens"]
    assert mt["count"] == len(MASSIVE) and mt["fraction"] == pytest.approx(len(MASSIVE) / (N_SEQS * (CTX - 1)))
    x = acts[:, 1:].reshape(-1, D).astype(np.float64)  # the evaluated tokens (BOS out)
    massive = np.zeros((N_SEQS, CTX), bool)
    for s, p in MASSIVE:
        massive[s, p] = True
    is_m = massive[:, 1:].reshape(-1)
    centred = ((x - x.mean(0)) ** 2).sum(1)
    assert mt["variance_share"] == pytest.approx(centred[is_m].sum() / centred.sum(), rel=1e-6)
    rest = x[~is_m]
    ev_rest = 1 - (0.25 * (rest ** 2).sum()) / ((rest - rest.mean(0)) ** 2).sum()
    assert mt["explained_variance_without"] == pytest.approx(ev_rest, rel=1e-6)
    assert m["sink_latents"]["count"] == 1 and m["sink_latents"]["features"] == [0]


def test_sink_latent_is_flagged_with_one_token_set_per_record(planted_report):
    out, _ = planted_report
    rep = load_report(out)
    sink = rep.top_activations[0]
    assert sink["sink"] is True and sink["massive_share"] == 1.0
    assert {(e["seq"], e["position"]) for e in sink["examples"]} <= set(MASSIVE)
    assert len({e["position"] for e in sink["examples"]}) > 1  # bound to tokens, not to one position
    for i, rec in rep.top_activations.items():
        assert rec["sink"] is (i == 0) and (rec["massive_share"] == 0.0) is (i != 0)
        if rec["examples"]:  # the record's numbers and its examples come from the same tokens
            assert rec["max_activation"] == pytest.approx(rec["examples"][0]["activation"], rel=1e-5)
    assert rep.features["sink"].tolist() == [True] + [False] * (2 * D - 1)


def test_dashboard_default_view_leaves_sink_latents_out(planted_report):
    out, _ = planted_report
    page = (out / "report.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                                re.S).group(1))
    flags = {f[0]: f[8] for f in data["features"]}
    assert flags[0] == 1 and not any(flags[i] for i in flags if i != 0)
    top_by_max = max(data["features"], key=lambda f: f[3])
    assert top_by_max[0] == 0  # without the filter, the sink latent would head the default sort
    assert data["meta"]["default_feature"] != 0
    assert "massive tokens" in data["meta"]["sink_rule"]
    cards = dict(data["cards"])
    assert any(k.startswith("sink latents") and v == "1" for k, v in cards.items())
    assert any(k.startswith("massive-activation tokens") and v.startswith("12 ") for k, v in cards.items())
    # the list drops flagged rows unless the box is ticked or an index is typed
    assert "rows = rows.filter((i) => !F[i][8])" in page and 'id="sinks" type="checkbox"' in page


def test_detection_off_writes_no_flags(tmp_path):
    path, _ = _planted(tmp_path)
    sae = perfect_relu_sae(D)
    sae.save(tmp_path / "sae")
    out = build_report(tmp_path / "sae", acts=path, out=tmp_path / "report", top_k=3, device="cpu", effects=0,
                       outlier_multiple=0)
    rep = load_report(out)
    assert rep.metrics["massive_tokens"] is None and rep.metrics["sink_latents"] is None
    assert "sink" not in rep.top_activations[0] and "sink" not in rep.features.columns


def test_sink_shares_counts_only_filled_slots():
    seq = torch.tensor([[0, 1, -1], [2, -1, -1], [-1, -1, -1]])
    pos = torch.tensor([[3, 4, 0], [5, 0, 0], [0, 0, 0]])
    massive_rows = torch.tensor([0 * 10 + 3, 2 * 10 + 5])  # ctx 10; row 0 (seq 0, pos 0) is not massive
    assert sink_shares(seq, pos, 10, massive_rows).tolist() == [0.5, 1.0, 0.0]
    with pytest.raises(Exception, match="multiple"):
        MassiveTokens(-1.0, 1.0, 10, 4)


def test_demo_summary_skips_sink_latents_and_reports_the_counts(planted_report, tmp_path):
    out, _ = planted_report
    recs = [{"feature": 0, "density": 0.1, "max_activation": 99.0, "sink": True,
             "examples": [{"tokens": ["x"], "values": [1.0]}] * 5},
            {"feature": 1, "density": 0.1, "max_activation": 2.0, "sink": False,
             "examples": [{"tokens": ["y"], "values": [1.0]}] * 5}]
    path = tmp_path / "top.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [f["feature"] for f in nameable_features(path)] == [1]
    metrics = json.loads((out / "metrics.json").read_text())
    text = format_summary(DemoResult(out=out, acts=out, run=out, report=out, metrics=metrics))
    assert re.search(r"sink latents \(not in the default list\)\s+1\b", text)
    assert re.search(r"massive-activation tokens\s+12 ", text)
    assert "CE loss recovered (vs zero ablation)" in text
