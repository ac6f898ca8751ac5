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


# ---- the demo's --out folder: its own files are replaced on a rerun, nobody else's are touched ----

def _tiny_demo(monkeypatch, tmp_path):
    """The quick demo on tiny-llama and a local corpus (no SmolLM2 needed): the same code path, ~seconds."""
    import dataclasses

    from sae_toolkit import demo

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. def f(x): return x + 1\n" * 200)
    real = demo.DemoConfig.make
    monkeypatch.setattr(demo.DemoConfig, "make", classmethod(lambda cls, quick: dataclasses.replace(
        real(quick), model="tiny-llama", dataset=str(corpus), hookpoint="mlp_out.1", context_size=32, tokens=1024,
        train_tokens=2048, ce_windows=1)))


def test_demo_rerun_replaces_only_its_own_output(tmp_path, monkeypatch, capsys):
    _tiny_demo(monkeypatch, tmp_path)
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    first = (out / "report" / "metrics.json").stat().st_ino
    assert main(args) == 0  # a rerun replaces run/ and report/ (they are the demo's own)
    # rewritten: a new file swapped in while the old one still existed, so a different inode (the content may be
    # identical, `created` has one-second resolution)
    assert (out / "report" / "metrics.json").stat().st_ino != first
    (out / "run" / "my_notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run/my_notes.txt" in err
    assert (out / "run" / "my_notes.txt").read_text() == "mine" and (out / "run" / "sae" / "cfg.json").is_file()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "run").mkdir(parents=True)
    (out / "run" / "thesis.tex").write_text("mine")
    (out / "report").mkdir()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 2
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--force"]) == 2
    err = capsys.readouterr().err
    assert "was not written by sae-toolkit" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["report", "run", "run/thesis.tex"]
