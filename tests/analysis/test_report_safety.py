"""analyze refuses silently wrong results and writes its report all at once: SAE/activation mismatches, non-finite
activations or weights, bad flags, someone else's --out, and a kill in the middle of rewriting a report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _report_helpers import perfect_relu_sae, random_file, write_acts

import sae_toolkit.analysis.exports as exports
from sae_toolkit.analysis.report import build_report, load_report
from sae_toolkit.cli import main
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import MARKER, read_marker
from sae_toolkit.sae import SAEConfig, make_sae


def _tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sae(tmp_path, name: str, d_sae: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return make_sae(SAEConfig(arch="relu", d_in=16, d_sae=d_sae, hookpoint="mlp_out.1", **kw)).save(tmp_path / name)


# ---- all at once ----

def test_kill_mid_rewrite_keeps_the_old_report_and_a_rewrite_leaves_no_stale_files(tmp_path, monkeypatch):
    acts, _, _ = random_file(tmp_path / "a.h5")
    big, small = _sae(tmp_path, "big", 48), _sae(tmp_path, "small", 24, seed=1)
    rep = tmp_path / "rep"
    monkeypatch.setattr(exports, "NEURONPEDIA_BATCH", 8)
    build_report(big, acts=acts, out=rep, device="cpu", top_k=2)
    old = _tree(rep)
    assert sum(k.startswith("exports/neuronpedia/batch-") for k in old) == 6

    # A fault once two Neuronpedia batches of the rewrite are on disk: the point where the old code left the new
    # metrics.json beside the old page and 2 of its batches. (tests/test_files.py kills a real process with
    # SIGKILL inside the same atomic_dir block.)
    real, seen = exports.neuronpedia_feature, []

    def failing(rec):
        seen.append(rec["feature"])
        if len(seen) > 2 * exports.NEURONPEDIA_BATCH:
            raise OSError(28, "No space left on device")
        return real(rec)

    monkeypatch.setattr(exports, "neuronpedia_feature", failing)
    with pytest.raises(OSError, match="No space left"):
        build_report(small, acts=acts, out=rep, device="cpu", top_k=2)
    assert _tree(rep) == old  # byte for byte the old, complete report
    assert load_report(rep).metrics["d_sae"] == 48
    monkeypatch.setattr(exports, "neuronpedia_feature", real)

    build_report(small, acts=acts, out=rep, device="cpu", top_k=2)
    new = _tree(rep)
    batches = sorted(k for k in new if k.startswith("exports/neuronpedia/"))
    assert batches == [f"exports/neuronpedia/batch-{i}.json" for i in range(3)]  # batch-3..5 of the old SAE gone
    assert json.loads(new["metrics.json"])["d_sae"] == 24
    assert sorted(read_marker(rep)["files"]) == sorted(k for k in new if k != MARKER)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".rep")) == []  # no temporary left


def test_someone_elses_out_is_refused_and_untouched(tmp_path, capsys):
    acts, _, _ = random_file(tmp_path / "a.h5")
    sae = _sae(tmp_path, "sae", 24)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my page")
    rc = main(["analyze", str(sae), "--acts", str(acts), "--out", str(mine), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "was not written by sae-toolkit" in err
    assert _tree(mine) == {"report.html": b"my page"}
    # --force only replaces an older sae-toolkit report; this one is not
    assert main(["analyze", str(sae), "--acts", str(acts), "--out", str(mine), "--device", "cpu", "--force"]) == 2
    assert _tree(mine) == {"report.html": b"my page"}


def test_flags_are_validated(tmp_path, capsys):
    acts, _, _ = random_file(tmp_path / "a.h5")
    sae = _sae(tmp_path, "sae", 24)
    base = ["analyze", str(sae), "--acts", str(acts), "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert main([*base, "--ce-windows", "-5"]) == 2
    assert "--ce-windows -5 must be at least 1" in capsys.readouterr().err
    assert main([*base, "--top-k", "5000"]) == 2
    assert "--top-k 5000 is outside 0..1000" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---- mismatches ----

def test_sae_of_another_model_is_refused_unless_allowed(tmp_path, capsys):
    # The case: a tiny-llama SAE on tiny-gpt2 activations of the same hookpoint name and width exited 0.
    # (the file's `model` attr is what the check reads; the cacher writes it, here it is set directly)
    acts, _, _ = random_file(tmp_path / "gpt2.h5", model="tiny-gpt2")
    _sae(tmp_path, "sae", 24, model="tiny-llama")
    base = ["analyze", str(tmp_path / "sae"), "--acts", str(acts), "--device", "cpu", "--top-k", "2"]
    assert main([*base, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'tiny-llama'" in err and "'tiny-gpt2'" in err and "--allow-mismatch" in err
    assert not (tmp_path / "r").exists()  # (--allow-mismatch: see the hookpoint test below)


def test_model_flag_must_be_the_saes_model(tmp_path):
    acts, _, _ = random_file(tmp_path / "a.h5")
    sae = _sae(tmp_path, "sae", 24, model="tiny-llama")
    with pytest.raises(SAEToolkitError, match="--model 'tiny-gpt2' is not the SAE's model 'tiny-llama'"):
        build_report(sae, acts=acts, out=tmp_path / "r", model="tiny-gpt2", device="cpu")


def test_other_hookpoint_is_refused_unless_allowed(tmp_path):
    acts, _, _ = random_file(tmp_path / "a.h5", hookpoint="mlp_out.2")
    sae = _sae(tmp_path, "sae", 24)
    with pytest.raises(SAEToolkitError, match="'mlp_out.1' is not in"):
        build_report(sae, acts=acts, out=tmp_path / "r", device="cpu")
    build_report(sae, acts=acts, out=tmp_path / "r", device="cpu", allow_mismatch=True)
    notes = load_report(tmp_path / "r").metrics["notes"]
    assert any("hookpoint 'mlp_out.1'" in n and "'mlp_out.2'" in n for n in notes)


def test_reconstruction_worse_than_the_mean_is_refused(tmp_path):
    acts, _, _ = random_file(tmp_path / "a.h5")
    sae = perfect_relu_sae(16, hookpoint="mlp_out.1")
    sae.cfg.extra["train_steps"] = 100  # checked only for SAEs the trainer saved
    sae.save(tmp_path / "good")
    build_report(tmp_path / "good", acts=acts, out=tmp_path / "ok", device="cpu", top_k=0)
    with torch.no_grad():
        sae.W_dec.neg_()  # x̂ = -x: FVU ≈ 5 on these activations (mean 0.5), error 4x that of zeros
    sae.save(tmp_path / "bad")
    with pytest.raises(SAEToolkitError, match=r"reconstructs .* with FVU \d.* far worse than predicting the mean"):
        build_report(tmp_path / "bad", acts=acts, out=tmp_path / "r", device="cpu")
    assert not (tmp_path / "r").exists()


# ---- non-finite inputs ----

@pytest.mark.parametrize("case", ["one_nan", "one_inf", "all_nan"])
def test_non_finite_activations_error_before_any_file_is_written(tmp_path, case):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(6, 16, 16)).astype(np.float32)
    if case == "all_nan":
        acts[:] = np.nan
    else:
        acts[4, 5, 3] = np.nan if case == "one_nan" else np.inf
    tokens = rng.integers(3, 40, size=(6, 16))
    tokens[:, 0] = 0
    path = write_acts(tmp_path / "a.h5", acts, tokens)
    sae = _sae(tmp_path, "sae", 24)
    row = 0 if case == "all_nan" else 4 * 16 + 5
    with pytest.raises(SAEToolkitError, match=rf"non-finite value in row {row} .*re-cache the file"):
        build_report(sae, acts=path, out=tmp_path / "r", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "sae"]


def test_non_finite_sae_is_refused(tmp_path):
    acts, _, _ = random_file(tmp_path / "a.h5")
    sae = make_sae(SAEConfig(arch="relu", d_in=16, d_sae=24, hookpoint="mlp_out.1"))
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    sae.save(tmp_path / "sae")
    with pytest.raises(SAEToolkitError, match="1 non-finite values in W_enc .* retrain it with a lower --lr"):
        build_report(tmp_path / "sae", acts=acts, out=tmp_path / "r", device="cpu")
    assert not (tmp_path / "r").exists()
