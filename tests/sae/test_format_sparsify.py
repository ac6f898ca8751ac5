"""EleutherAI sparsify folders (cfg.json + sae.safetensors per hookpoint) load and encode / decode as sparsify's
SparseCoder does (written out below from sparsify/sparse_coder.py and fused_encoder.py, not imported)."""

import json

import pytest
import torch
from _formats_helpers import random_weights, write_sparsify
from safetensors.torch import load_file

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE, load_sae

D_IN, D_SAE, K = 8, 32, 4


def sparsify_forward(path, x: torch.Tensor):
    """(dense latents, x_hat): top_acts, top_indices = topk(relu(encoder(x − b_dec)), k); x̂ = Σ acts·W_dec + b_dec."""
    w = {n: t.double() for n, t in load_file(str(path / "sae.safetensors")).items()}
    k = json.loads((path / "cfg.json").read_text())["k"]
    pre = torch.relu((x.double() - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top_acts, top_idx = pre.topk(k, dim=-1, sorted=False)
    x_hat = (top_acts[..., None] * w["W_dec"][top_idx]).sum(-2) + w["b_dec"]  # their decoder_impl, gathered
    return torch.zeros_like(pre).scatter(-1, top_idx, top_acts), x_hat


def test_sparsify_folder_matches_sparsify_forward(tmp_path):
    path = write_sparsify(tmp_path / "run" / "layers.2", random_weights(D_IN, D_SAE, seed=1), K)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "k": K}))
    sae = SAE.load(path)
    assert (sae.cfg.arch, sae.cfg.k, sae.cfg.d_in, sae.cfg.d_sae) == ("topk", K, D_IN, D_SAE)
    assert sae.cfg.hookpoint == "resid_post.2" and sae.cfg.model == "EleutherAI/pythia-70m"
    assert sae.cfg.apply_b_dec_to_input and sae.cfg.extra["sparsify_hookpoint"] == "layers.2"
    x = torch.randn(64, D_IN) + 0.5
    f_ref, x_hat_ref = sparsify_forward(path, x)
    with torch.no_grad():
        x_hat, f = sae(x)
    assert int((f_ref > 0).sum(-1).max()) == K
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=1e-5, atol=1e-5)
    # a bf16 SAE stays bf16 (sparsify loads in the file's dtype)
    w16 = {n: t.to(torch.bfloat16) for n, t in random_weights(D_IN, D_SAE).items()}
    assert SAE.load(write_sparsify(tmp_path / "bf16" / "layers.0", w16, K)).W_enc.dtype == torch.bfloat16


def test_run_folder_with_several_hookpoints(tmp_path):
    run = tmp_path / "run"
    for i, name in enumerate(["layers.0", "layers.1", "layers.10", "layers.1.mlp"]):
        write_sparsify(run / name, random_weights(D_IN, D_SAE, seed=i), K)
    with pytest.raises(SAEToolkitError, match=r"holds 4 SAEs: layers\.0 \(resid_post\.0\), layers\.1 \(resid_post"
                                              r"\.1\), layers\.1\.mlp \(mlp_out\.1\), layers\.10"):
        SAE.load(run)
    by_name = load_sae(run, hookpoint="layers.1")  # sparsify's folder name
    assert by_name.cfg.hookpoint == "resid_post.1"
    torch.testing.assert_close(by_name.b_dec, random_weights(D_IN, D_SAE, seed=1)["b_dec"])
    by_ours = load_sae(run, hookpoint="mlp_out.1")  # or our name for it
    assert by_ours.cfg.hookpoint == "mlp_out.1" and by_ours.cfg.extra["sparsify_hookpoint"] == "layers.1.mlp"
    with pytest.raises(SAEToolkitError, match="none of them matches hookpoint 'resid_post.7'"):
        load_sae(run, hookpoint="resid_post.7")
    # one folder given directly: --hookpoint renames it
    assert load_sae(run / "layers.10", hookpoint="model.layers.10").cfg.hookpoint == "model.layers.10"


@pytest.mark.parametrize(("extra", "match"), [({"transcode": True}, "transcoder"),
                                              ({"activation": "groupmax"}, "activation='groupmax'"),
                                              ({"skip_connection": True}, "skip connection")])
def test_unsupported_sparsify_variants_are_refused(extra, match, tmp_path):
    path = write_sparsify(tmp_path / "layers.0", random_weights(D_IN, D_SAE), K, **extra)
    with pytest.raises(SAEToolkitError, match=match):
        SAE.load(path)


def test_real_sparsify_save_to_disk_loads(tmp_path):
    """Runs where sparsify is installed (not a dependency): its save_to_disk folder loads with equal outputs."""
    sparsify = pytest.importorskip("sparsify", reason="sparsify not installed; the fixtures above follow its files")
    theirs = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(k=K, num_latents=D_SAE))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    theirs.save_to_disk(tmp_path / "layers.4.mlp")
    ours = SAE.load(tmp_path / "layers.4.mlp")
    assert ours.cfg.hookpoint == "mlp_out.4"
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        acts, idx, _ = theirs.encode(x)
        f = torch.zeros(64, D_SAE).scatter(-1, idx, acts)
        torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(acts, idx), rtol=1e-5, atol=1e-5)
