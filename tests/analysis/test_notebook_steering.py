"""notebooks/03_steering.ipynb runs top to bottom on a tiny model and report: looks up a feature, clamps it, ablates
it, and round-trips a SAELens export through SAE.load."""

import json
from pathlib import Path

import torch
from _report_helpers import tiny_model_file

from sae_toolkit.analysis.report import build_report
from sae_toolkit.sae import SAEConfig, make_sae

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "03_steering.ipynb"


def test_steering_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    acts = tiny_model_file(tmp_path / "acts.h5", n_seqs=6, ctx=32)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=64, d_sae=64, k=6, hookpoint="mlp_out.1", model="tiny-llama"))
    sae.save(tmp_path / "sae")
    report = build_report(tmp_path / "sae", acts=acts, out=tmp_path / "report", device="cpu", top_k=5)
    monkeypatch.setenv("SAE_TOOLKIT_REPORT", str(report))
    monkeypatch.setenv("SAE_TOOLKIT_SAE", str(tmp_path / "sae"))
    monkeypatch.setenv("SAE_TOOLKIT_PROMPT", "def f(x): return")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "topk SAE on mlp_out.1 of tiny-llama" in text
    assert "no feature peaks on 'if'" in text  # the byte-level toy corpus has no ' if' token
    changed = int(text.split(" steered continuations differ")[0].rsplit(": ", 1)[1].split(" of ")[0])
    assert changed >= 1
    assert "log p ablated" in text
    assert "loaded the SAELens export (topk, from saelens); steered continuation identical: True" in text
    assert len([o for o in outputs if "text/html" in o.get("data", {})]) >= 3
