"""notebooks/01_inspect_features.ipynb runs top to bottom on a tiny report and shows tables and plots."""

import json
from pathlib import Path

import pytest
import torch
from _report_helpers import tiny_model_file

from sae_toolkit.analysis.report import build_report
from sae_toolkit.sae import SAEConfig, make_sae

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "01_inspect_features.ipynb"


@pytest.mark.parametrize("with_model", [True, False])
def test_inspect_notebook_runs(tmp_path, monkeypatch, with_model):
    import nbformat
    from nbclient import NotebookClient

    acts = tiny_model_file(tmp_path / "acts.h5", n_seqs=6, ctx=32)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=64, d_sae=64, k=6, hookpoint="mlp_out.1", model="tiny-llama"))
    sae.save(tmp_path / "sae")
    # Without --model the report has no logit lens, and the notebook computes it from the SAE and the model.
    report = build_report(tmp_path / "sae", acts=acts, out=tmp_path / "report", device="cpu", top_k=5,
                          model="tiny-llama" if with_model else None, ce_windows=1)
    monkeypatch.setenv("SAE_TOOLKIT_REPORT", str(report))
    monkeypatch.setenv("SAE_TOOLKIT_SAE", str(tmp_path / "sae"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook draws inline
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "topk SAE on mlp_out.1 of tiny-llama" in text
    assert "fires on" in text and "promotes" in text and "decoder cosine" in text
    html_tables = [o for o in outputs if "text/html" in o.get("data", {})]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(html_tables) >= 5 and len(images) >= 3
