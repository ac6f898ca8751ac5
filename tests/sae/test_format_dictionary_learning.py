"""dictionary_learning folders (ae.pt + config.json) load with torch.load(weights_only=True) and encode / decode
as their classes do (written out below from dictionary_learning/dictionary.py and trainers/, not imported)."""

import datetime
import json

import pytest
import torch
from _formats_helpers import random_weights, write_dictionary_learning

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE

D_IN, D_SAE, K = 8, 32, 4
relu = torch.nn.functional.relu


def their_forward(cls: str, sd: dict[str, torch.Tensor], x: torch.Tensor):
    """(f, x_hat) of their class `cls` from its state dict, after their from_pretrained (AutoEncoder normalizes the
    decoder columns and rescales the encoder by the same norms)."""
    sd = {n: t.double() if t.is_floating_point() else t for n, t in sd.items()}
    x = x.double()
    if cls == "AutoEncoder":
        norms = sd["decoder.weight"].norm(dim=0)
        enc_w, enc_b = sd["encoder.weight"] * norms[:, None], sd["encoder.bias"] * norms
        dec_w = sd["decoder.weight"] / norms
        f = relu((x - sd["bias"]) @ enc_w.T + enc_b)
        return f, f @ dec_w.T + sd["bias"]
    if cls == "AutoEncoderNew":
        f = relu(x @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f, f @ sd["decoder.weight"].T + sd["decoder.bias"]
    if cls == "GatedAutoEncoder":
        x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
        f = (x_enc + sd["gate_bias"] > 0).double() * relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        return f, f @ sd["decoder.weight"].T + sd["decoder_bias"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = relu(pre * (pre > sd["threshold"]))
        return f, f @ sd["W_dec"] + sd["b_dec"]
    if cls == "AutoEncoderTopK":
        post_relu = relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        top = post_relu.topk(int(sd["k"]), sorted=False, dim=-1)
        f = torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)
        return f, f @ sd["decoder.weight"].T + sd["b_dec"]
    if cls == "BatchTopKSAE":
        post_relu = relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        f = post_relu * (post_relu > sd["threshold"])
        return f, f @ sd["decoder.weight"].T + sd["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post_relu = relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        f = post_relu * (post_relu > sd["threshold"])
        return f, f @ sd["W_dec"] + sd["b_dec"]
    raise AssertionError(cls)


CLASSES = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated",
           "JumpReluAutoEncoder": "jumprelu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
           "MatryoshkaBatchTopKSAE": "batchtopk"}


def check(sae, cls, sd, x, scale: float = 1.0):
    """Compare with their forward; scale ≠ 1: their model trained on x/scale with biases still in those units."""
    f_ref, x_hat_ref = their_forward(cls, sd, x / scale)
    f_ref, x_hat_ref = f_ref * scale, x_hat_ref * scale
    with torch.no_grad():
        x_hat, f = sae(x)
    assert (f_ref > 0).any() and (f_ref == 0).any()
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_dictionary_learning_folder_matches_their_forward(cls, tmp_path):
    path = write_dictionary_learning(tmp_path / "trainer_0", cls, random_weights(D_IN, D_SAE, seed=1), k=K)
    sae = SAE.load(path)
    assert (sae.cfg.arch, sae.cfg.d_in, sae.cfg.d_sae) == (CLASSES[cls], D_IN, D_SAE)
    assert sae.cfg.hookpoint == "mlp_out.1" and sae.cfg.model == "tiny-llama"
    assert sae.cfg.extra["dictionary_learning_class"] == cls
    if CLASSES[cls] in ("topk", "batchtopk"):
        assert sae.cfg.k == K
    sd = torch.load(path / "ae.pt", weights_only=True)
    check(sae, cls, sd, torch.randn(64, D_IN) + 0.3)


@pytest.mark.parametrize("cls", ["AutoEncoder", "JumpReluAutoEncoder", "BatchTopKSAE", "GatedAutoEncoder"])
def test_training_backup_with_norm_factor_is_rescaled(cls, tmp_path):
    nf = 3.0
    path = write_dictionary_learning(tmp_path / "t", cls, random_weights(D_IN, D_SAE, seed=2), k=K,
                                     backup_norm_factor=nf)
    sae = SAE.load(path)
    sd = torch.load(path / "ae.pt", weights_only=True)["ae"]
    check(sae, cls, sd, 3 * torch.randn(64, D_IN), scale=nf)


def test_batchtopk_before_its_threshold_is_a_relu(tmp_path):
    path = write_dictionary_learning(tmp_path / "t", "BatchTopKSAE", random_weights(D_IN, D_SAE), threshold=-1.0)
    sae = SAE.load(path)
    assert sae.cfg.arch == "relu"
    check(sae, "BatchTopKSAE", torch.load(path / "ae.pt", weights_only=True), torch.randn(32, D_IN))


def test_hookpoint_from_their_config(tmp_path):
    w = random_weights(D_IN, D_SAE)
    for sub, layer, ours in [("resid_post_layer_12", 12, "resid_post.12"), ("attn_out_layer_2", 2, "attn_out.2"),
                             (None, 5, "resid_post.5"), ("gpt_neox.layers.3.mlp", 3, "gpt_neox.layers.3.mlp")]:
        path = write_dictionary_learning(tmp_path / str(sub), "AutoEncoder", w, layer=layer, submodule_name=sub)
        assert SAE.load(path).cfg.hookpoint == ours


def test_pickled_objects_are_never_loaded(tmp_path):
    path = write_dictionary_learning(tmp_path / "t", "AutoEncoder", random_weights(D_IN, D_SAE))
    torch.save({"ae": datetime.date(2024, 1, 1)}, path / "ae.pt")  # an object only a full unpickle would build
    with pytest.raises(SAEToolkitError, match=r"weights_only=True"):
        SAE.load(path)
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder"}}))
    torch.save({"x": torch.zeros(2)}, path / "ae.pt")
    with pytest.raises(SAEToolkitError, match="dict_class 'CrossCoder'"):
        SAE.load(path)


def test_real_dictionary_learning_files_load(tmp_path):
    """Runs where dictionary_learning is installed (not a dependency): their classes' ae.pt give equal outputs."""
    pytest.importorskip("dictionary_learning", reason="dictionary_learning not installed; fixtures follow its files")
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    torch.manual_seed(0)
    x = torch.randn(64, D_IN)
    for cls in (AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE):
        ae = cls(D_IN, D_SAE, K) if cls in (AutoEncoderTopK, BatchTopKSAE) else cls(D_IN, D_SAE)
        with torch.no_grad():
            for n, p in ae.named_parameters():
                p.copy_(torch.rand_like(p) * 0.5 if n == "threshold" else torch.randn_like(p) * 0.3)
            if cls is BatchTopKSAE:
                ae.threshold.fill_(0.4)
        path = tmp_path / cls.__name__
        path.mkdir()
        torch.save(ae.state_dict(), path / "ae.pt")
        (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls.__name__, "layer": 2}}))
        theirs = cls.from_pretrained(path / "ae.pt")
        with torch.no_grad():
            x_hat, f = theirs(x, output_features=True)
            ours = SAE.load(path)
            torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-5, msg=cls.__name__)
            torch.testing.assert_close(ours(x).x_hat, x_hat, rtol=1e-5, atol=1e-5, msg=cls.__name__)
