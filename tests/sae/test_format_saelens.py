"""SAELens folders (cfg.json + sae_weights.safetensors, pre-6 flat and 6.x cfgs) load through SAE.load and encode /
decode as SAELens' own forward does (written out below from sae_lens/saes/*_sae.py, not imported)."""

import json

import pytest
import torch
from _formats_helpers import random_weights, write_saelens
from safetensors.torch import load_file

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE, load_sae

D_IN, D_SAE, K = 8, 32, 5


def saelens_forward(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor):
    """(feature_acts, x_hat) of SAELens' SAE.encode / SAE.decode for the cfg and weights as stored on disk."""
    w = {n: t.double() for n, t in w.items()}
    x = x.double()
    flat = "metadata" not in cfg
    if flat and cfg.get("activation_fn_str") == "topk":
        arch, k = "topk", cfg["activation_fn_kwargs"]["k"]
    else:
        arch, k = cfg.get("architecture", "standard"), cfg.get("k")
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    if arch == "gated":
        gate = sae_in @ w["W_enc"] + w["b_gate"]
        mag = sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
        f = (gate > 0).double() * mag.relu()
        return f, f @ w["W_dec"] + w["b_dec"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        f = pre.relu()
    elif arch == "topk":
        rescale = cfg.get("rescale_acts_by_decoder_norm", False)
        if rescale:
            pre = pre * w["W_dec"].norm(dim=-1)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        dec_in = f / w["W_dec"].norm(dim=-1) if rescale else f
        return f, dec_in @ w["W_dec"] + w["b_dec"]
    elif arch == "jumprelu":
        f = pre.relu() * (pre > w["threshold"]).double()
    elif arch == "batchtopk":  # SAELens saves it for inference as jumprelu with the threshold broadcast
        n = w["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones(w["W_dec"].shape[0])
        f = (pre * n).relu() * (pre * n > w["topk_threshold"]).double()
        return f, (f / n) @ w["W_dec"] + w["b_dec"]
    else:
        raise AssertionError(arch)
    if cfg.get("finetuning_scaling_factor"):
        f_dec = f * w["scaling_factor"]
        return f, f_dec @ w["W_dec"] + w["b_dec"]
    return f, f @ w["W_dec"] + w["b_dec"]


def check_matches(sae: SAE, path, x: torch.Tensor, atol: float = 1e-5) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    f_ref, x_hat_ref = saelens_forward(cfg, load_file(str(path / "sae_weights.safetensors")), x)
    with torch.no_grad():
        x_hat, f = sae(x)
    assert (f_ref > 0).any() and (f_ref == 0).any()
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=atol)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=1e-5, atol=atol)


CASES = [("standard", "v6"), ("topk", "v6"), ("jumprelu", "v6"), ("gated", "v6"), ("batchtopk", "v6"),
         ("standard", "flat"), ("topk", "flat"), ("jumprelu", "flat"), ("gated", "flat")]
OURS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "batchtopk"}


@pytest.mark.parametrize(("arch", "layout"), CASES)
def test_saelens_folder_matches_saelens_forward(arch, layout, tmp_path):
    path = write_saelens(tmp_path / "sl", arch, random_weights(D_IN, D_SAE, seed=1), layout=layout, k=K,
                         apply_b_dec_to_input=arch != "jumprelu")
    sae = SAE.load(path)
    assert sae.cfg.arch == OURS[arch] and (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.hookpoint == "mlp_out.1" and sae.cfg.model == "tiny-llama"
    assert sae.cfg.extra["source_format"] == "saelens" and not sae.training
    if arch in ("topk", "batchtopk"):
        assert sae.cfg.k == K
    check_matches(sae, path, torch.randn(64, D_IN) + 0.3)


def test_apply_b_dec_to_input_is_honoured(tmp_path):
    w = random_weights(D_IN, D_SAE, seed=2)
    on = SAE.load(write_saelens(tmp_path / "on", "standard", w, apply_b_dec_to_input=True))
    off = SAE.load(write_saelens(tmp_path / "off", "standard", w, apply_b_dec_to_input=False))
    x = torch.randn(16, D_IN)
    check_matches(on, tmp_path / "on", x)
    check_matches(off, tmp_path / "off", x)
    assert not torch.allclose(on.encode(x), off.encode(x))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_rescaled_by_decoder_norm_is_folded(arch, tmp_path):
    path = write_saelens(tmp_path / "sl", arch, random_weights(D_IN, D_SAE, seed=3), k=K,
                         extra_cfg={"rescale_acts_by_decoder_norm": True})
    sae = SAE.load(path)
    check_matches(sae, path, torch.randn(64, D_IN))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))  # folded: unit rows, plain TopK
    assert sae.cfg.normalize_decoder


@pytest.mark.parametrize("layout", ["v6", "flat"])
def test_expected_average_only_in_scale_is_folded(layout, tmp_path):
    w = random_weights(D_IN, D_SAE, seed=4)
    path = write_saelens(tmp_path / "sl", "jumprelu", w, layout=layout, apply_b_dec_to_input=True,
                         normalize_activations="expected_average_only_in" if layout == "v6" else True)
    with pytest.raises(SAEToolkitError, match="expected_average_only_in.*activation_scaler.json"):
        SAE.load(path)
    s = 2.5
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))  # SAELens' ActivationScaler
    sae = SAE.load(path)
    assert sae.cfg.act_scale == s
    # trained on x·s: SAELens scales the input, runs the SAE, and unscales the output
    x = torch.randn(64, D_IN)
    cfg = json.loads((path / "cfg.json").read_text())
    f_ref, x_hat_ref = saelens_forward(cfg, load_file(str(path / "sae_weights.safetensors")), x * s)
    with torch.no_grad():
        x_hat, f = sae(x)
    assert (f_ref > 0).any()
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref / s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm", "covariance_whitening"])
def test_unfoldable_normalization_is_refused(mode, tmp_path):
    path = write_saelens(tmp_path / "sl", "standard", random_weights(D_IN, D_SAE), normalize_activations=mode)
    with pytest.raises(SAEToolkitError, match=f"normalize_activations='{mode}'.*(cannot be folded|cannot fold)"):
        SAE.load(path)


def test_old_finetuning_scaling_factor_is_folded(tmp_path):
    from safetensors.torch import save_file

    w = random_weights(D_IN, D_SAE, seed=5)
    path = write_saelens(tmp_path / "sl", "standard", w, layout="flat", extra_cfg={"finetuning_scaling_factor": True})
    tensors = load_file(str(path / "sae_weights.safetensors"))
    tensors["scaling_factor"] = 0.5 + torch.rand(D_SAE)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    check_matches(SAE.load(path), path, torch.randn(32, D_IN))


def test_hook_names_map_to_ours(tmp_path):
    w = random_weights(D_IN, D_SAE)
    for hook, ours in [("blocks.9.hook_resid_post", "resid_post.9"), ("blocks.3.hook_resid_pre", "resid_post.2"),
                       ("blocks.0.hook_resid_pre", "resid_post.0:input"), ("blocks.2.mlp.hook_post", "mlp_hidden.2"),
                       ("blocks.4.hook_attn_out", "attn_out.4"), ("model.layers.3.mlp", "model.layers.3.mlp")]:
        path = write_saelens(tmp_path / hook, "standard", w, hook_name=hook)
        assert SAE.load(path).cfg.hookpoint == ours
        assert load_sae(path, hookpoint="mlp_out.0").cfg.hookpoint == "mlp_out.0"  # --hookpoint always wins


def test_unsupported_saelens_files_are_clear_errors(tmp_path):
    w = random_weights(D_IN, D_SAE)
    path = write_saelens(tmp_path / "a", "standard", w, extra_cfg={"architecture": "magic"})
    with pytest.raises(SAEToolkitError, match="architecture 'magic'"):
        SAE.load(path)
    path = write_saelens(tmp_path / "b", "standard", w, extra_cfg={"metadata": {"hook_head_index": 3}})
    with pytest.raises(SAEToolkitError, match="one attention head"):
        SAE.load(path)
    path = write_saelens(tmp_path / "c", "jumprelu", w)
    (path / "sae_weights.safetensors").unlink()
    (path / "sae.safetensors").write_bytes(b"")
    with pytest.raises(SAEToolkitError, match="lacks sae_weights.safetensors"):
        SAE.load(path)
    path = write_saelens(tmp_path / "d", "gated", w)
    from safetensors.torch import save_file

    save_file({"W_enc": w["W_enc"]}, str(path / "sae_weights.safetensors"))
    with pytest.raises(SAEToolkitError, match="lacks tensor 'W_dec'"):
        SAE.load(path)


def test_real_saelens_save_model_loads(tmp_path):
    """Runs where sae-lens is installed (not a dependency): folders its save_model writes load with equal outputs."""
    pytest.importorskip("sae_lens", reason="sae-lens not installed; the fixtures above follow its save_model")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    saes = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
        "gated": GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "batchtopk": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)),
    }
    torch.manual_seed(0)
    x = torch.randn(64, D_IN)
    for name, theirs in saes.items():
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                p.copy_(torch.rand_like(p) * 0.5 if "threshold" in n else torch.randn_like(p) * 0.3)
        theirs.cfg.metadata["hook_name"] = "blocks.2.hook_resid_post"
        theirs.save_model(tmp_path / name)
        if name == "batchtopk":  # their inference model is a jumprelu built from the training save
            theirs.topk_threshold = torch.tensor(0.3, dtype=torch.double)
            theirs.save_model(tmp_path / name)
            theirs.save_inference_model(tmp_path / "bt_inference")
            from sae_lens import SAE as LensSAE

            theirs = LensSAE.load_from_disk(str(tmp_path / "bt_inference"))
        ours = SAE.load(tmp_path / name)
        assert ours.cfg.hookpoint == "resid_post.2", name
        with torch.no_grad():
            f = theirs.encode(x)
            torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(ours(x).x_hat, theirs.decode(f), rtol=1e-5, atol=1e-5, msg=name)
