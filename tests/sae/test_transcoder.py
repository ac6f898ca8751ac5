"""Transcoders as SAEs: shapes, the loss against the target, the skip path, scale folding, save/load, and the
SAELens transcoder format (export reproduces SAELens' forward; loading it back gives the same outputs)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import ARCHS, SAE, SAEConfig, export_saelens, fold_scales_, load_saelens_transcoder, make_sae
from sae_toolkit.sae.config import TOPK_FAMILY

D_IN, D_OUT, D_SAE, K = 8, 6, 32, 4


def transcoder(arch: str, skip: bool = True, seed: int = 0, **kw) -> SAE:
    """A float64 transcoder of `arch` (mlp_in.1 → mlp_out.1, d_out ≠ d_in) with every parameter randomised."""
    torch.manual_seed(seed)
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=K if arch in TOPK_FAMILY else None,
                    hookpoint="mlp_in.1", target="mlp_out.1", skip=skip, dtype="float64", model="tiny-llama", **kw)
    sae = make_sae(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.log(torch.rand(D_SAE, dtype=torch.float64) * 0.3 + 0.05))
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_the_forward_formula(arch):
    sae = transcoder(arch)
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_OUT)
    assert sae.b_dec.shape == (D_OUT,) and sae.W_skip.shape == (D_IN, D_OUT)
    assert sae.cfg.apply_b_dec_to_input is False  # b_dec is an output-space bias
    x = torch.randn(10, D_IN, dtype=torch.float64)
    out = sae.eval()(x)
    f = sae.encode(x)
    assert torch.allclose(out.x_hat, f @ sae.W_dec + sae.b_dec + x @ sae.W_skip)
    assert torch.equal(out.feature_acts, f)
    fresh = make_sae(sae.cfg)
    assert torch.count_nonzero(fresh.W_skip) == 0  # the skip path starts at zero


@pytest.mark.parametrize("arch", ARCHS)
def test_training_loss_compares_with_the_target_and_trains_w_skip(arch):
    sae = transcoder(arch).train()
    x = torch.randn(16, D_IN, dtype=torch.float64)
    y = torch.randn(16, D_OUT, dtype=torch.float64)
    out = sae.training_loss(x, target=y)
    assert out.x_hat.shape == (16, D_OUT)
    assert torch.allclose(out.parts["mse"], (y - out.x_hat).pow(2).sum(-1).mean())
    if arch not in ("batchtopk",):  # batchtopk trains on batch-level selection; the others equal forward()
        assert torch.allclose(out.x_hat, sae(x).x_hat)
    out.loss.backward()
    assert sae.W_skip.grad is not None and sae.W_skip.grad.abs().sum() > 0
    assert sae.W_enc.grad.abs().sum() > 0
    with pytest.raises(SAEToolkitError, match="pass its batch as target"):
        sae.training_loss(x)
    with pytest.raises(SAEToolkitError, match="expected"):
        sae.training_loss(x, target=torch.randn(16, D_IN, dtype=torch.float64))


def test_config_validation():
    with pytest.raises(SAEToolkitError, match="skip=True needs a transcoder"):
        SAEConfig(arch="topk", d_in=8, d_sae=32, k=4, skip=True)
    with pytest.raises(SAEToolkitError, match="only a transcoder"):
        SAEConfig(arch="topk", d_in=8, d_sae=32, k=4, d_out=6)
    with pytest.raises(SAEToolkitError, match="apply_b_dec_to_input=True for a transcoder"):
        SAEConfig(arch="relu", d_in=8, d_sae=32, target="mlp_out.1", apply_b_dec_to_input=True)
    assert SAEConfig(arch="relu", d_in=8, d_sae=32).d_out == 8  # SAEs: d_out = d_in, recorded


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_scales_makes_it_work_on_raw_activations(arch):
    sae = transcoder(arch).eval()
    if arch == "batchtopk":
        sae.threshold.fill_(0.1)
    s_in, s_out = 3.0, 0.25
    x = torch.randn(12, D_IN, dtype=torch.float64)
    trained = sae(x * s_in).x_hat / s_out  # what the trained model predicts, in raw target units
    fold_scales_(sae, s_in, s_out)
    assert torch.allclose(sae(x).x_hat, trained, atol=1e-10)
    assert sae.cfg.act_scale == s_out and sae.cfg.extra["act_scale_in"] == s_in


@pytest.mark.parametrize("skip", [False, True])
def test_save_load_round_trip(tmp_path, skip):
    sae = transcoder("topk", skip=skip)
    sae.save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert (cfg["hookpoint"], cfg["target"], cfg["d_out"], cfg["skip"]) == ("mlp_in.1", "mlp_out.1", D_OUT, skip)
    assert ("W_skip" in load_file(tmp_path / "t" / "sae.safetensors")) == skip
    back = SAE.load(tmp_path / "t")
    x = torch.randn(5, D_IN, dtype=torch.float64)
    assert torch.equal(back(x).x_hat, sae.eval()(x).x_hat)


def saelens_transcoder_forward(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens 6's transcoder inference (sae_lens/saes/transcoder.py), written out from its source, not imported:
    no b_dec pre-subtraction, ReLU or JumpReLU, x @ W_skip.T for the skip classes."""
    pre = x @ w["W_enc"] + w["b_enc"]
    f = pre.relu()
    if cfg["architecture"].startswith("jumprelu"):
        f = f * (pre > w["threshold"]).to(x.dtype)
    out = f @ w["W_dec"] + w["b_dec"]
    if "skip" in cfg["architecture"]:
        out = out + x @ w["W_skip"].T
    return out


@pytest.mark.parametrize("arch,expected", [("relu", "transcoder"), ("jumprelu", "jumprelu_transcoder"),
                                           ("batchtopk", "jumprelu_transcoder")])
@pytest.mark.parametrize("skip", [False, True])
def test_saelens_export_reproduces_outputs_and_loads_back(tmp_path, arch, expected, skip):
    sae = transcoder(arch, skip=skip).eval()
    if arch == "batchtopk":
        sae.threshold.fill_(0.2)  # BatchTopK exports as a JumpReLU with one shared threshold
    sae.save(tmp_path / "ours")
    out = export_saelens(tmp_path / "ours", tmp_path / "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(out / "sae_weights.safetensors")
    assert cfg["architecture"] == (expected.replace("transcoder", "skip_transcoder") if skip else expected)
    assert cfg["d_in"] == D_IN and cfg["d_out"] == D_OUT and cfg["d_sae"] == D_SAE
    assert cfg["apply_b_dec_to_input"] is False  # SAELens' TranscoderConfig refuses True
    assert cfg["hook_name_out"] == "blocks.1.hook_mlp_out" and cfg["hook_layer_out"] == 1
    assert cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert cfg["metadata"]["hf_hook_name"] == "mlp_in.1" and cfg["metadata"]["hf_hook_name_out"] == "mlp_out.1"
    if skip:
        assert w["W_skip"].shape == (D_OUT, D_IN)  # SAELens' layout
    x = torch.randn(20, D_IN, dtype=torch.float64)
    assert torch.allclose(saelens_transcoder_forward(cfg, w, x), sae(x).x_hat, atol=1e-10)
    for back in (SAE.load(out), load_saelens_transcoder(out)):
        assert back.cfg.target == "mlp_out.1" and back.cfg.hookpoint == "mlp_in.1" and back.cfg.skip == skip
        assert torch.allclose(back(x).x_hat, sae(x).x_hat, atol=1e-10)


def test_topk_transcoder_export_is_refused_clearly(tmp_path):
    transcoder("topk").save(tmp_path / "t")
    with pytest.raises(SAEToolkitError, match="SAELens has no transcoder class computing arch 'topk'"):
        export_saelens(tmp_path / "t", tmp_path / "out")
    with pytest.raises(SAEToolkitError, match="not a SAELens transcoder"):
        load_saelens_transcoder(tmp_path / "t")
