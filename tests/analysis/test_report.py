"""The report directory end to end: every file, numbers against an independent computation, the HTML is safe
and offline, exports parse, `analyze` through the CLI in bounded memory."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from _report_helpers import ListTokenizer, brute_force_top, random_file, tiny_model_file

from sae_toolkit.analysis.evaluation import evaluate, scan, weight_stats
from sae_toolkit.analysis.report import build_report, load_report, rebuild_html, write_report
from sae_toolkit.cli import main
from sae_toolkit.model.loading import load_tokenizer
from sae_toolkit.sae import SAEConfig, make_sae

PAYLOAD = "<script>alert(1)</script>"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in = dict(attrs).get("type", "js")
            self.scripts.append([self._in, ""])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.scripts[-1][1] += data


def _parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    p.close()
    return p


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A RUN_DIR (sae/ + metrics.jsonl) with a TopK SAE on tiny-llama mlp_out.1, and its activation file."""
    tmp = tmp_path_factory.mktemp("run")
    acts = tiny_model_file(tmp / "acts.h5", n_seqs=8, ctx=32)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=64, d_sae=96, k=6, hookpoint="mlp_out.1", model="tiny-llama"))
    sae.save(tmp / "run" / "sae")
    lines = [{"step": s, "tokens": 256 * s, "loss": 1 / s, "mse": 1 / s, "fvu": 0.5 / s, "l0": 6.0,
              "dead_fraction": 0.1, "lr": 1e-3} for s in range(1, 20)]
    (tmp / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 2")
    out = build_report(tmp / "run", acts=acts, out=tmp / "report", model="tiny-llama", top_k=5, ce_windows=2,
                       device="cpu")
    return sae, acts, out


def test_report_directory_holds_every_file(tiny_run):
    _, _, out = tiny_run
    for name in ("metrics.json", "features.parquet", "features.csv", "top_activations.jsonl", "report.html",
                 "plots/density_histogram.png", "plots/l0_histogram.png", "plots/training_curves.png",
                 "exports/saebench_core.json", "exports/neuronpedia/batch-0.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("l0", "dead_fraction", "dead_fraction_tokens", "fvu", "explained_variance", "mse", "cosine_sim",
                "l2_ratio", "ce_clean", "ce_sae", "ce_zero_ablation", "ce_loss_recovered", "delta_ce", "kl_sae",
                "tokens_evaluated", "hookpoint", "model", "versions", "density_histogram", "logit_lens"):
        assert key in m, key
    assert m["tokens_evaluated"] == 8 * 31 and m["hookpoint"] == "mlp_out.1" and m["model_seqs"] == 2
    assert m["delta_ce"] == pytest.approx(m["ce_sae"] - m["ce_clean"])
    assert sum(m["density_histogram"]["counts"]) == 96
    assert any("first 2 of 8" in n for n in m["notes"])


def test_metrics_json_agrees_with_an_independent_computation(tiny_run):
    sae, acts, out = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    import h5py

    with h5py.File(acts) as f:
        x = torch.from_numpy(f["acts/mlp_out.1"][:]).double()
        keep = torch.from_numpy(f["tokens"][:].reshape(-1) != f.attrs["bos_token_id"])
    x = x[keep]
    with torch.no_grad():
        o = sae(x.float())
    x_hat, lat = o.x_hat.double(), o.feature_acts
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(fvu.item(), rel=1e-6)
    assert m["explained_variance"] == pytest.approx(1 - fvu.item(), rel=1e-6)
    assert m["mse"] == pytest.approx(((x - x_hat) ** 2).mean().item(), rel=1e-6)
    assert m["l0"] == pytest.approx((lat > 0).sum(-1).double().mean().item())
    assert m["dead_fraction"] == pytest.approx(((lat > 0).sum(0) == 0).double().mean().item())
    table = pd.read_csv(out / "features.csv")
    np.testing.assert_allclose(table["density"], (lat > 0).double().mean(0).numpy(), rtol=1e-6)
    assert len(table) == 96 and list(table["feature"]) == list(range(96))


def test_top_activations_jsonl_equals_brute_force(tiny_run):
    sae, acts, out = tiny_run
    import h5py

    with h5py.File(acts) as f:
        x = torch.from_numpy(f["acts/mlp_out.1"][:])
        tokens = torch.from_numpy(f["tokens"][:]).long()
    with torch.no_grad():
        lat = sae(x).feature_acts.view(8, 32, -1)
    tok = load_tokenizer("tiny-llama")
    ref = brute_force_top(lat, tokens != 0, k=5)  # byte tokenizer: BOS=0, EOS=1, PAD=2; only BOS in the corpus
    recs = [json.loads(line) for line in (out / "top_activations.jsonl").read_text().splitlines()]
    assert [r["feature"] for r in recs] == list(range(96))
    for r, want in zip(recs, ref):
        assert [(e["seq"], e["position"]) for e in r["examples"]] == [(s, p) for s, p, _ in want]
        for e, (s, p, v) in zip(r["examples"], want):
            assert e["activation"] == pytest.approx(v, rel=1e-5)
            assert len(e["tokens"]) == len(e["values"]) and e["values"][e["peak"]] == pytest.approx(v, rel=1e-5)
            start = p - e["peak"]
            assert start == max(0, p - 12)  # default context: 12 tokens before the peak, 4 after
            assert e["tokens"] == [tok.decode([t]) for t in tokens[s, start:start + len(e["tokens"])].tolist()]
        assert "logit_pos" in r and len(r["logit_pos"]) == 10


def test_load_report_round_trip(tiny_run):
    _, _, out = tiny_run
    rep = load_report(out)
    assert rep.metrics == json.loads((out / "metrics.json").read_text())
    assert isinstance(rep.features, pd.DataFrame) and len(rep.features) == 96
    assert {"density", "max_activation", "enc_dec_cos", "nearest_feature", "max_token", "top_logit"} <= set(
        rep.features.columns)
    assert set(rep.top_activations) == set(range(96))


def test_html_is_offline_and_parses(tiny_run):
    _, _, out = tiny_run
    page = (out / "report.html").read_text()
    tags = _parse(page)
    assert [t for t, _ in tags.tags].count("script") == 2
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may spell anything
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    assert "http" not in text.lower() and "innerHTML" not in page
    data = json.loads(next(text for kind, text in tags.scripts if kind == "application/json"))
    assert {"meta", "cards", "plots", "vocab", "features", "examples", "lens"} <= set(data)
    assert len(data["features"]) == 96 and len(data["plots"]) == 4
    assert all(src.startswith("data:image/png;base64,") for _, src in data["plots"])


def test_corpus_markup_renders_as_text(tmp_path):
    strings = [f"w{i}" for i in range(40)]
    strings[5] = PAYLOAD
    strings[6] = "</script><img src=x onerror=alert(2)>"
    strings[7] = "<!--"
    strings[8] = "&amp;\u2028"
    path, acts, tokens = random_file(tmp_path / "a.h5", vocab=12)
    torch.manual_seed(1)
    sae = make_sae(SAEConfig(arch="relu", d_in=16, d_sae=24, hookpoint="mlp_out.1"))
    res = scan(sae, path, top_k=5, tokenizer=ListTokenizer(strings))
    out = write_report(tmp_path / "rep", sae, res, weight_stats(sae))
    page = (out / "report.html").read_text()
    assert PAYLOAD not in page and "</script><img" not in page and "<img" not in page and "<!--" not in page
    tags = _parse(page)
    assert [t for t, _ in tags.tags].count("script") == 2 and "img" not in [t for t, _ in tags.tags]
    data = json.loads(next(text for kind, text in tags.scripts if kind == "application/json"))
    assert PAYLOAD in data["vocab"] and strings[6] in data["vocab"]  # the text survives, as data
    jsonl = (out / "top_activations.jsonl").read_text()
    assert PAYLOAD in jsonl  # the raw files keep the exact strings (they are not HTML)


def test_sae_dir_without_model_and_exports(tmp_path):
    path, _, _ = random_file(tmp_path / "a.h5")
    sae = make_sae(SAEConfig(arch="relu", d_in=16, d_sae=24, hookpoint="mlp_out.1"))
    sae.save(tmp_path / "sae")
    out = build_report(tmp_path / "sae", acts=path, out=tmp_path / "rep", device="cpu")
    m = json.loads((out / "metrics.json").read_text())
    assert "ce_clean" not in m and m["logit_lens"] is None and m["run_dir"] is None
    assert not (out / "plots" / "training_curves.png").exists()
    core = json.loads((out / "exports" / "saebench_core.json").read_text())
    assert core["eval_type_id"] == "core"
    rq = core["eval_result_metrics"]["reconstruction_quality"]
    assert rq["explained_variance"] == pytest.approx(m["explained_variance"]) and rq["cossim"] == m["cosine_sim"]
    assert core["eval_result_metrics"]["sparsity"]["l0"] == m["l0"]
    assert len(core["eval_result_unstructured"]["feature_density"]) == 24
    batch = json.loads((out / "exports" / "neuronpedia" / "batch-0.json").read_text())
    assert len(batch["features"]) == 24 and batch["layer"] == 1
    top = load_report(out).top_activations
    for feat in batch["features"]:
        rec = top[feat["feature_index"]]
        assert feat["frac_nonzero"] == rec["density"]
        assert [a["values"] for a in feat["activations"]][:len(rec["examples"])] == [
            e["values"] for e in rec["examples"]]


def test_cli_analyze_on_a_file_larger_than_its_batch_reads_in_chunks(tmp_path, monkeypatch, capsys):
    import sae_toolkit.activations.store as store

    path, _, _ = random_file(tmp_path / "a.h5", n_seqs=40, ctx=16)
    sae = make_sae(SAEConfig(arch="relu", d_in=16, d_sae=24, hookpoint="mlp_out.1"))
    sae.save(tmp_path / "sae")
    reads = []
    real = store._to_float32
    monkeypatch.setattr(store, "_to_float32", lambda raw, dtype: reads.append(len(raw)) or real(raw, dtype))
    import sae_toolkit.analysis.report as report

    real_build = report.build_report
    monkeypatch.setattr(report, "build_report", lambda *a, **kw: real_build(*a, **kw, batch_tokens=64))
    rc = main(["analyze", str(tmp_path / "sae"), "--acts", str(path), "--out", str(tmp_path / "rep"),
               "--device", "cpu", "--top-k", "3"])
    assert rc == 0 and "report.html" in capsys.readouterr().out
    assert len(reads) == 10 and max(reads) == 64  # 40 windows x 16 tokens, 4 windows per read
    whole = evaluate(sae, path, batch_tokens=10_000, tokenizer=None)
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["fvu"] == pytest.approx(whole["fvu"], rel=1e-9) and m["tokens_evaluated"] == whole["tokens"]


def test_rebuild_html_from_the_report_files_alone(tiny_run):
    _, _, out = tiny_run
    before = _parse((out / "report.html").read_text())
    (out / "report.html").unlink()
    (out / "plots" / "training_curves.png").unlink()
    page = rebuild_html(out).read_text()
    after = _parse(page)
    old = json.loads(next(t for k, t in before.scripts if k == "application/json"))
    new = json.loads(next(t for k, t in after.scripts if k == "application/json"))
    assert new["features"] == old["features"] and new["lens"] == old["lens"] and new["cards"] == old["cards"]
    assert (out / "plots" / "training_curves.png").is_file() and len(new["plots"]) == 4


def test_not_an_sae_directory_is_a_one_line_error(tmp_path):
    from sae_toolkit.errors import SAEToolkitError

    path, _, _ = random_file(tmp_path / "a.h5")
    with pytest.raises(SAEToolkitError, match="not an SAE directory"):
        build_report(tmp_path, acts=path, out=tmp_path / "rep", device="cpu")
    with pytest.raises(SAEToolkitError, match="not a report directory"):
        load_report(tmp_path)
