"""The fraud notebook and the fraud demo script run offline end to end (executed, outputs checked)."""

import re
import runpy
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def test_fraud_notebook_executes_and_reports_a_good_detector(tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "02_fraud_baseline.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    m = re.search(r"RESULT auc_roc=([\d.]+) auc_pr=([\d.]+) calibrated_f1=([\d.]+)", text)
    assert m, text[-2000:]
    auc_roc, auc_pr, f1 = map(float, m.groups())
    assert auc_roc > 0.95 and auc_pr > 0.3 and f1 > 0.5
    assert "isolation_forest" in text and "latent+score" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the ROC figure was not displayed"


def test_fraud_demo_script_prints_the_comparison_table(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    # in-process (runpy) to spare a second import of torch and sklearn; same code path as `python scripts/...`
    argv = ["fraud_demo.py", "--out", str(out), "--transactions", "10000", "--train-rows", "1000", "--epochs", "20",
            "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "scripts" / "fraud_demo.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    for detector in ("autoencoder", "seed_autoencoder", "isolation_forest", "local_outlier_factor", "one_class_svm"):
        assert re.search(rf"synthetic_fraud\s+{detector}\s+0\.\d{{4}} ±", stdout), detector
    assert "threshold calibrated (best F1)" in stdout
    assert (out / "fraud_roc.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(sys, "argv", ["fraud_demo.py", "--out", str(out), "--transactions", "500", "--quiet"])
    with pytest.raises(SystemExit, match="error: 500 transactions hold .* ask for more transactions"):
        runpy.run_path(str(ROOT / "scripts" / "fraud_demo.py"), run_name="__main__")
