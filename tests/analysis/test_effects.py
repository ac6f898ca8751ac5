"""Measured ablation effects in the report: equal to an independent steer()-based computation, bounded by
--effects, absent without a model, shown in the dashboard."""

from __future__ import annotations

import torch
from _report_helpers import tiny_model_file

from sae_toolkit import steer
from sae_toolkit.analysis.report import build_report, load_report
from sae_toolkit.model.hookpoints import forward_kwargs
from sae_toolkit.model.loading import load_model
from sae_toolkit.sae import SAEConfig, make_sae


def test_report_effects_match_an_independent_ablation(tmp_path):
    acts = tiny_model_file(tmp_path / "acts.h5", n_seqs=6, ctx=32)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=64, d_sae=64, k=6, hookpoint="mlp_out.1", model="tiny-llama"))
    sae.save(tmp_path / "sae")
    out = build_report(tmp_path / "sae", acts=acts, out=tmp_path / "report", device="cpu", top_k=5,
                       model="tiny-llama", ce_windows=1, effects=3, effect_examples=2)
    rep = load_report(out)
    measured = {i: r for i, r in rep.top_activations.items() if "ablation_falls" in r}
    assert len(measured) == 3 and rep.metrics["ablation_effects"]["features"] == 3
    assert any("ablation effects for 3 features" in n for n in rep.metrics["notes"])

    model, tok = load_model("tiny-llama")
    import h5py

    with h5py.File(acts) as f:
        tokens = torch.from_numpy(f["tokens"][:].astype("int64"))
    for i, rec in measured.items():
        assert rec["ablation_examples"] == 2
        sites = [(e["seq"], e["position"]) for e in rec["examples"][:2]]
        deltas = []
        for s, p in sites:
            ids = tokens[s:s + 1, :p + 1]
            with torch.no_grad():
                clean = model(**forward_kwargs(model, ids)).logits[0, p].log_softmax(-1)
                with steer(model, sae, {i: 0.0}, positions=[p]):
                    ablated = model(**forward_kwargs(model, ids)).logits[0, p].log_softmax(-1)
            deltas.append(ablated - clean)
        mean = torch.stack(deltas).mean(0)
        falls = rec["ablation_falls"]
        assert falls, i
        lo = mean.topk(len(falls), largest=False)
        assert [f["token"] for f in falls] == [tok.decode([int(t)]) for t in lo.indices]
        torch.testing.assert_close(torch.tensor([f["value"] for f in falls]), lo.values, rtol=1e-3, atol=1e-5)
        rises = rec["ablation_rises"]
        assert all(r["value"] > 0 for r in rises) and all(f["value"] < 0 for f in falls)
        if rises:
            assert abs(rises[0]["value"] - float(mean.max())) < 1e-4
    html = (out / "report.html").read_text()
    assert "Ablation effect (measured)" in html and '"effects":{' in html

    no_model = build_report(tmp_path / "sae", acts=acts, out=tmp_path / "r2", device="cpu", top_k=5)
    assert not any("ablation_falls" in r for r in load_report(no_model).top_activations.values())
