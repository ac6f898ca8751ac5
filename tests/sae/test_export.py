"""SAELens export: the files follow SAELens' layout and its documented forward reproduces our outputs."""

import json

import pytest
import torch
from _sae_helpers import D_IN, D_SAE, randomized
from safetensors.torch import load_file

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import ARCHS, SAEConfig, export_saelens, make_sae
from sae_toolkit.sae.export import tl_hook_name

# What SAELens 6's loader needs per architecture (sae_lens/saes/*_sae.py): the parameter names of its SAE class.
SAELENS_TENSORS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
}
EXPECTED_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated",
                 "matryoshka": "jumprelu"}


def saelens_forward(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6's inference encode/decode for each architecture, written out from its source (not imported)."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg["architecture"]
    if arch == "gated":
        gate = sae_in @ w["W_enc"] + w["b_gate"]
        mag = sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
        f = (gate > 0).to(x.dtype) * mag.relu()
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            f = pre.relu()
        elif arch == "topk":
            vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
            f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        elif arch == "jumprelu":
            f = pre.relu() * (pre > w["threshold"]).to(x.dtype)
        else:
            raise AssertionError(arch)
    return f, f @ w["W_dec"] + w["b_dec"]


def _trained(arch: str, seed: int = 0):
    sae = randomized(arch, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        loss = sae.training_loss(torch.randn(32, D_IN, dtype=torch.float64)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    sae.cfg.hookpoint, sae.cfg.model = "mlp_out.3", "tiny-llama"
    return sae.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_reproduces_outputs_with_saelens_forward(arch, tmp_path):
    sae = _trained(arch)
    out = export_saelens(sae.save(tmp_path / "sae"), tmp_path / "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(str(out / "sae_weights.safetensors"))
    assert cfg["architecture"] == EXPECTED_ARCH[arch]
    assert set(w) == SAELENS_TENSORS[cfg["architecture"]]
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["dtype"] == "float64"
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_mlp_out" and cfg["metadata"]["hf_hook_name"] == "mlp_out.3"
    assert cfg["apply_b_dec_to_input"] is (arch != "jumprelu")
    if arch == "topk":
        assert cfg["k"] == sae.cfg.k
    x = torch.randn(20, D_IN, dtype=torch.float64)
    f_ref, x_hat_ref = saelens_forward(cfg, w, x)
    with torch.no_grad():
        x_hat, f = sae(x)
    assert (f > 0).any()
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-12, atol=1e-12)


def test_batchtopk_without_threshold_exports_as_topk(tmp_path):
    sae = make_sae(SAEConfig(arch="batchtopk", d_in=D_IN, d_sae=D_SAE, k=3)).eval()
    out = export_saelens(sae.save(tmp_path / "sae"), tmp_path / "x")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3
    x = torch.randn(5, D_IN)
    f_ref, _ = saelens_forward(cfg, load_file(str(out / "sae_weights.safetensors")), x)
    torch.testing.assert_close(sae.encode(x), f_ref)


def test_tl_hook_names():
    assert tl_hook_name("resid_post.2") == "blocks.2.hook_resid_post"
    assert tl_hook_name("mlp_hidden.0") == "blocks.0.mlp.hook_post"
    assert tl_hook_name("model.layers.6.mlp") == "blocks.6.hook_mlp_out"
    assert tl_hook_name("model.layers.6.self_attn") == "blocks.6.hook_attn_out"
    assert tl_hook_name("model.layers.6") == "blocks.6.hook_resid_post"
    assert tl_hook_name("model.layers.6.mlp.down_proj:input") == "blocks.6.mlp.hook_post"
    assert tl_hook_name("transformer.h.1.mlp") == "blocks.1.hook_mlp_out"
    assert tl_hook_name("model.norm") == "model.norm"


def test_export_errors(tmp_path):
    with pytest.raises(SAEToolkitError, match="does not exist"):
        export_saelens(tmp_path / "missing", tmp_path / "out")
    sae_dir = make_sae(SAEConfig(arch="relu", d_in=4, d_sae=8)).save(tmp_path / "sae")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SAEToolkitError, match="is a file"):
        export_saelens(sae_dir, tmp_path / "file")


def test_real_saelens_loads_export(tmp_path):
    """Runs where sae-lens is installed (it is not a dependency): SAE.load_from_disk accepts every arch's files."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed; the test above covers its forward")
    for arch in ARCHS:
        sae = _trained(arch)
        out = export_saelens(sae.save(tmp_path / arch), tmp_path / f"{arch}_saelens")
        theirs = sae_lens.SAE.load_from_disk(str(out))
        x = torch.randn(20, D_IN, dtype=torch.float64)
        with torch.no_grad():
            x_hat, f = sae(x)
            torch.testing.assert_close(theirs.encode(x), f, msg=f"{arch} encode")
            torch.testing.assert_close(theirs(x), x_hat, msg=f"{arch} forward")


def test_cli_export(tmp_path, capsys):
    from sae_toolkit.cli import main

    sae_dir = _trained("jumprelu").save(tmp_path / "run" / "sae")
    assert main(["export", str(tmp_path / "run"), "--format", "saelens", "--out", str(tmp_path / "out")]) == 0
    assert "saelens" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert main(["export", str(sae_dir / "missing"), "--format", "saelens", "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_reads_provenance_from_the_activation_file(tmp_path):
    import h5py

    acts = tmp_path / "acts.h5"
    with h5py.File(acts, "w") as f:
        f.attrs.update(format="sae_toolkit.activations", context_size=64, dataset="builtin:pydoc", bos_token_id=1)
    sae = _trained("topk")
    sae.cfg.extra = {"acts": str(acts)}
    out = export_saelens(sae.save(tmp_path / "sae"), tmp_path / "x")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert (meta["context_size"], meta["dataset_path"], meta["prepend_bos"]) == (64, "builtin:pydoc", True)
    acts.unlink()  # gone: export still works, without those fields
    meta = json.loads((export_saelens(tmp_path / "sae", tmp_path / "y") / "cfg.json").read_text())["metadata"]
    assert meta["context_size"] is None and meta["dataset_path"] is None


@pytest.mark.parametrize("arch", ARCHS)
def test_an_exported_saelens_directory_loads_back(arch, tmp_path):
    # issue 13: SAE.load used to refuse SAELens' format; now it reads it (sae/formats/saelens.py)
    from sae_toolkit.sae import load_sae

    sae = _trained(arch)
    back = load_sae(export_saelens(sae.save(tmp_path / "sae"), tmp_path / "sl"))
    assert back.cfg.hookpoint == "mlp_out.3" and back.cfg.model == "tiny-llama"
    x = torch.randn(20, D_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-9, atol=1e-9)


def test_export_never_overwrites_what_it_did_not_write(tmp_path, capsys):
    from sae_toolkit.cli import main
    from sae_toolkit.sae import SAE

    sae_dir = make_sae(SAEConfig(arch="relu", d_in=4, d_sae=8)).save(tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in sae_dir.iterdir()}
    # into the SAE's own folder: it used to overwrite cfg.json and make the SAE unloadable
    assert main(["export", str(sae_dir), "--format", "saelens", "--out", str(sae_dir)]) == 2
    assert main(["export", str(sae_dir), "--format", "saelens", "--out", str(sae_dir), "--force"]) == 2
    err = capsys.readouterr().err
    assert "not written by sae-toolkit" in err and err.count("\n") == 2
    assert {p.name: p.read_bytes() for p in sae_dir.iterdir()} == before
    SAE.load(sae_dir)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "cfg.json").write_text('{"mine": 1}')
    with pytest.raises(SAEToolkitError, match="not written by sae-toolkit"):
        export_saelens(sae_dir, theirs)
    assert (theirs / "cfg.json").read_text() == '{"mine": 1}'
    # our own export is replaced by a rerun; an unmarked one from an older version needs --force
    out = export_saelens(sae_dir, tmp_path / "out")
    (out / ".sae-toolkit-output.json").unlink()
    with pytest.raises(SAEToolkitError, match="older sae-toolkit saelens-export: pass --force"):
        export_saelens(sae_dir, out)
    export_saelens(sae_dir, out, force=True)
    export_saelens(sae_dir, out)
    assert sorted(p.name for p in out.iterdir()) == [".sae-toolkit-output.json", "cfg.json", "sae_weights.safetensors"]


def test_export_refuses_a_non_finite_sae(tmp_path):
    sae = make_sae(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2))
    with torch.no_grad():
        sae.b_dec[1] = float("inf")
    with pytest.raises(SAEToolkitError, match="non-finite values in b_dec .* lower --lr"):
        export_saelens(sae.save(tmp_path / "sae"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
