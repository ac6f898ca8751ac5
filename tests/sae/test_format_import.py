"""Every foreign format analyzes like our own SAEs (metrics equal to its toolkit's formulas on real tiny-model
activations, at the mapped hookpoint) and `sae-toolkit import` writes our format with equal outputs."""

import json

import h5py
import numpy as np
import pytest
import torch
from _formats_helpers import (
    random_weights,
    write_dictionary_learning,
    write_gemma_scope,
    write_saelens,
    write_sparsify,
)
from _report_helpers import tiny_model_file

from sae_toolkit.cli import main
from sae_toolkit.sae import SAE, load_sae

D_SAE, K = 128, 8
relu = torch.relu


@pytest.fixture(scope="module")
def acts_file(tmp_path_factory):
    """tiny-llama's mlp_out.1 over 6 windows of 32 tokens (BOS first), as the cacher writes it."""
    path = tiny_model_file(tmp_path_factory.mktemp("acts") / "acts.h5", hookpoint="mlp_out.1")
    with h5py.File(path) as f:
        x = torch.from_numpy(f["acts/mlp_out.1"][:]).double()
        keep = torch.from_numpy(f["tokens"][:].reshape(-1) != int(f.attrs["bos_token_id"]))
    return path, x[keep]


def scaled_weights(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """random_weights sized to the activations: pre-activations O(1), decoder rows O(activation scale)."""
    w = random_weights(x.shape[1], D_SAE, seed=seed)
    s = float(x.std())
    w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"] / s, w["W_dec"] * s, x.mean(0).float()
    return w


# Each format's own forward over its files, (f, x_hat) in float64 — the formulas of the per-format tests.
def ref_saelens_topk(path, x):
    from safetensors.torch import load_file

    w = {n: t.double() for n, t in load_file(str(path / "sae_weights.safetensors")).items()}
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return f, f @ w["W_dec"] + w["b_dec"]


def ref_sparsify(path, x):
    from safetensors.torch import load_file

    w = {n: t.double() for n, t in load_file(str(path / "sae.safetensors")).items()}
    pre = relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    return f, f @ w["W_dec"] + w["b_dec"]


def ref_gemma_scope(path, x):
    p = {n: torch.from_numpy(v).double() for n, v in np.load(path / "params.npz").items()}
    pre = x @ p["W_enc"] + p["b_enc"]
    f = (pre > p["threshold"]) * relu(pre)
    return f, f @ p["W_dec"] + p["b_dec"]


def ref_dictionary_learning_gated(path, x):
    sd = {n: t.double() for n, t in torch.load(path / "ae.pt", weights_only=True).items()}
    x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
    f = (x_enc + sd["gate_bias"] > 0).double() * relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
    return f, f @ sd["decoder.weight"].T + sd["decoder_bias"]


def make(fmt: str, root, x):
    w = scaled_weights(x, seed=len(fmt))
    if fmt == "saelens":
        return write_saelens(root / "sl", "topk", w, k=K, hook_name="blocks.1.hook_mlp_out"), ref_saelens_topk
    if fmt == "sparsify":
        write_sparsify(root / "run" / "layers.0", scaled_weights(x, 7), k=K)
        write_sparsify(root / "run" / "layers.1.mlp", w, k=K)
        return root / "run", ref_sparsify  # a run folder: analyze picks layers.1.mlp by the file's hookpoint
    if fmt == "gemma_scope":
        path = root / "gemma-scope-2b-pt-mlp" / "layer_1" / "width_16k" / "average_l0_40"
        return write_gemma_scope(path, w), ref_gemma_scope
    return write_dictionary_learning(root / "trainer_0", "GatedAutoEncoder", w,
                                     submodule_name="mlp_out_layer_1"), ref_dictionary_learning_gated


@pytest.mark.parametrize("fmt", ["saelens", "sparsify", "gemma_scope", "dictionary_learning"])
def test_analyze_and_import_every_format(fmt, acts_file, tmp_path, capsys):
    from sae_toolkit.analysis.report import build_report

    acts, x = acts_file
    src, ref = make(fmt, tmp_path, x)
    sae_path = src / "layers.1.mlp" if fmt == "sparsify" else src
    f_ref, x_hat_ref = ref(sae_path, x)

    if fmt == "sparsify":  # several SAEs: analyze needs the folder; import picks one with --hookpoint
        src = sae_path
    # Gemma Scope's model comes from its repository name (google/gemma-2-2b), not the tiny model these
    # activations are from: analyze refuses that mismatch unless it is allowed, and then notes it
    mismatch = fmt == "gemma_scope"
    out = build_report(src, acts=acts, out=tmp_path / "report", device="cpu", allow_mismatch=mismatch)
    m = json.loads((out / "metrics.json").read_text())
    assert any("gemma-2-2b" in n for n in m.get("notes", [])) == mismatch
    assert m["hookpoint"] == "mlp_out.1" and m["tokens"] == x.shape[0]
    l0_ref = float((f_ref > 0).sum(-1).double().mean())
    fvu_ref = float((x - x_hat_ref).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert 0 < l0_ref < D_SAE
    assert m["l0"] == pytest.approx(l0_ref, rel=1e-6)
    assert m["fvu"] == pytest.approx(fvu_ref, rel=1e-4)

    args = ["import", str(tmp_path / "run" if fmt == "sparsify" else src), "--out", str(tmp_path / "ours")]
    assert main(args + (["--hookpoint", "layers.1.mlp"] if fmt == "sparsify" else [])) == 0
    assert "imported from" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert cfg["hookpoint"] == "mlp_out.1" and cfg["extra"]["source_format"] == fmt
    theirs, ours = load_sae(sae_path), SAE.load(tmp_path / "ours")
    with torch.no_grad():
        xf = x.float()
        torch.testing.assert_close(ours(xf).x_hat, theirs(xf).x_hat, rtol=0, atol=0)
        torch.testing.assert_close(ours.encode(xf), theirs.encode(xf), rtol=0, atol=0)
        torch.testing.assert_close(ours.encode(xf).double(), f_ref, rtol=1e-5, atol=1e-5)
    # never over an existing folder
    assert main(args + ["--hookpoint", "layers.1.mlp"] if fmt == "sparsify" else args) == 2
    assert "already exists" in capsys.readouterr().err


def test_import_cli_hookpoint_and_errors(tmp_path, capsys):
    src = write_gemma_scope(tmp_path / "gs", random_weights(8, 32))
    assert main(["import", str(src), "--out", str(tmp_path / "a"), "--hookpoint", "resid_post.3"]) == 0
    assert SAE.load(tmp_path / "a").cfg.hookpoint == "resid_post.3"
    assert main(["import", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    assert "not an SAE directory" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
