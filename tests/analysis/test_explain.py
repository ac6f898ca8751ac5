"""sae-toolkit explain: explanations and detection scores from a deterministic fake explainer, through a local
stub OpenAI-compatible server (127.0.0.1, started here) and a local tiny model; nothing is downloaded."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from _report_helpers import tiny_model_file

from sae_toolkit.analysis.explanations import balanced_accuracy, excerpt, explain_report, parse_labels
from sae_toolkit.analysis.report import build_report, load_report
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAEConfig, make_sae


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    acts = tiny_model_file(tmp / "acts.h5", n_seqs=8, ctx=32)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=64, d_sae=32, k=4, hookpoint="mlp_out.1", model="tiny-llama"))
    sae.save(tmp / "sae")
    return build_report(tmp / "sae", acts=acts, out=tmp / "report", device="cpu", top_k=6)


class Oracle:
    """Explains feature N as 'feature N <script>…'; labels an excerpt 1 exactly when it is one of feature N's own
    example windows (so a correct pipeline scores 1.0). mode='yes' labels everything 1; 'junk' answers prose."""

    name = "oracle"

    def __init__(self, report, mode: str = "oracle"):
        recs = load_report(report).top_activations
        self.texts = {i: {excerpt(e, mark=False) for e in r["examples"] + r["interval_examples"]}
                      for i, r in recs.items()}
        self.marked = {i: {excerpt(e, mark=True) for e in r["examples"] + r["interval_examples"]}
                       for i, r in recs.items()}
        self.mode = mode
        self.calls: list[list[dict]] = []

    def chat(self, messages, max_tokens):
        self.calls.append(messages)
        text = messages[-1]["content"]
        if text.startswith("Below are"):
            shown = [ln.split(". ", 1)[1] for ln in text.splitlines() if re.match(r"^\d+\. ", ln)]
            feature = next(i for i, m in self.marked.items() if set(shown) <= m)
            return f"Explanation: feature {feature} <script>alert(1)</script>\nmore text"
        feature = int(re.search(r"feature (\d+)", text).group(1))
        excerpts = [ln.split(". ", 1)[1] for ln in text.splitlines() if re.match(r"^\d+\. ", ln)]
        if self.mode == "junk":
            return "I think they are all about foxes."
        labels = [1 if self.mode == "yes" or e in self.texts[feature] else 0 for e in excerpts]
        return "Sure: " + json.dumps(labels)


def test_oracle_scores_one_and_always_yes_scores_half(report):
    recs = load_report(report).top_activations
    feats = [i for i in sorted(recs) if len(recs[i]["examples"]) >= 4][:3]
    oracle = Oracle(report)
    path = explain_report(report, oracle, features=feats)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["feature"] for r in rows] == feats
    for r in rows:
        assert r["explanation"] == f"feature {r['feature']} <script>alert(1)</script>"
        d = r["detection"]
        assert d["negatives_verified"] is True and d["n_activating"] == d["n_non_activating"] > 0
        assert d["balanced_accuracy"] == 1.0, r
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["explanations"]["features"] == 3 and metrics["explanations"]["mean_balanced_accuracy"] == 1.0
    html = (report / "report.html").read_text()
    assert "<script>alert" not in html and "\\u003cscript\\u003ealert(1)" in html and '"explanations":{' in html

    yes = Oracle(report, mode="yes")
    explain_report(report, yes, features=feats[:1])
    rows = {json.loads(x)["feature"]: json.loads(x) for x in path.read_text().splitlines()}
    assert rows[feats[0]]["detection"]["balanced_accuracy"] == 0.5
    assert rows[feats[1]]["detection"]["balanced_accuracy"] == 1.0  # other features' lines are kept

    explain_report(report, Oracle(report, mode="junk"), features=feats[:1])
    row = json.loads(path.read_text().splitlines()[0])
    assert row["detection"]["balanced_accuracy"] is None and "did not answer" in row["detection"]["error"]
    with pytest.raises(SAEToolkitError, match="not in"):
        explain_report(report, Oracle(report), features=[10_000])


def test_parsing_and_balanced_accuracy():
    assert parse_labels("labels: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_labels("1\n0\n1", 3) == [1, 0, 1]
    assert parse_labels("[1, 0]", 3) is None and parse_labels("[1, 2, 0]", 3) is None
    assert balanced_accuracy([1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]) == (0.625, 0.5, 0.75)
    ex = {"tokens": ["a", "b", "c", "\n"], "values": [0.0, 4.0, 0.5, 2.0], "peak": 1}
    assert excerpt(ex, mark=True) == "a<<b>>c<<\\n>>" and excerpt(ex, mark=False) == "ab c\\n".replace(" ", "")


class _Stub(BaseHTTPRequestHandler):
    oracle: Oracle
    seen: list

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"data": [{"id": "stub-model"}]} if self.path == "/v1/models" else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("Authorization"), body["model"], body["temperature"]))
        if self.headers.get("Authorization") != "Bearer sekrit":
            return self._send(401, {"error": "no key"})
        reply = self.oracle.chat(body["messages"], body["max_tokens"])
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def log_message(self, *args):
        pass


def test_explain_cli_against_a_local_stub_server(report, monkeypatch, capsys):
    from sae_toolkit.cli import main

    recs = load_report(report).top_activations
    feats = [i for i in sorted(recs) if len(recs[i]["examples"]) >= 4][:2]
    _Stub.oracle, _Stub.seen = Oracle(report), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        argv = ["explain", str(report), "--explainer", url, "--api-key-env", "SAE_TEST_KEY",
                "--features", ",".join(map(str, feats))]
        monkeypatch.delenv("SAE_TEST_KEY", raising=False)
        assert main(argv) == 2
        assert "HTTP 401" in capsys.readouterr().err
        monkeypatch.setenv("SAE_TEST_KEY", "sekrit")
        assert main(argv) == 0
        out = capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert f"feature {feats[0]:>6}  detection 1.00  feature {feats[0]} <script>" in out
    assert {s[1:] for s in _Stub.seen[1:]} == {("Bearer sekrit", "stub-model", 0)}
    assert {s[0] for s in _Stub.seen} == {"/v1/chat/completions"}
    rows = [json.loads(x) for x in (report / "explanations.jsonl").read_text().splitlines()]
    assert {r["feature"]: r["explainer"] for r in rows if r["feature"] in feats} == {f: f"{url} stub-model"
                                                                                      for f in feats}
    # a server that is not there: one line, no traceback
    assert main(["explain", str(report), "--explainer", url, "--features", str(feats[0])]) == 2
    assert "cannot reach explainer" in capsys.readouterr().err


def test_explain_with_a_local_model(report):
    from sae_toolkit.analysis.explainers import make_explainer

    feats = [i for i, r in sorted(load_report(report).top_activations.items()) if len(r["examples"]) >= 2][:1]
    path = explain_report(report, make_explainer("tiny-llama"), features=feats)
    row = next(json.loads(x) for x in path.read_text().splitlines() if json.loads(x)["feature"] == feats[0])
    assert row["explainer"] == "tiny-llama" and isinstance(row["explanation"], str)
    assert row["detection"]["n_activating"] > 0  # a random model's labels rarely parse; either outcome is recorded
    assert row["detection"]["balanced_accuracy"] is not None or "did not answer" in row["detection"]["error"]
