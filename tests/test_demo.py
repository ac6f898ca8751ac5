"""`sae-toolkit demo --quick`: the demo's own code path, end to end on the real SmolLM2, in seconds."""

import json

import pytest

from sae_toolkit.cli import main


@pytest.mark.realmodel
def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for name in ("l0", "explained_variance", "dead_fraction", "ce_loss_recovered", "fvu"):
        assert name in metrics and metrics[name] == metrics[name], name  # present and not NaN
    assert 0 < metrics["l0"] <= 16  # quick demo trains TopK with k=16
    assert (out / "run" / "sae" / "sae.safetensors").exists()
    assert (out / "report" / "report.html").stat().st_size > 10_000
    assert "explained variance" in printed and "CE loss recovered" in printed
    assert str(out / "report" / "report.html") in printed
    assert printed.count("feature ") >= 1
