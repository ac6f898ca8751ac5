"""Gemma Scope folders (params.npz) load and encode / decode as the Gemma Scope tutorial's JumpReLUSAE does."""

import numpy as np
import pytest
import torch
from _formats_helpers import random_weights, write_gemma_scope

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE
from sae_toolkit.sae.formats.hookpoints import gemma_scope_info

D_IN, D_SAE = 8, 32


def gemma_scope_forward(path, x: torch.Tensor):
    """The tutorial: pre = x @ W_enc + b_enc; acts = (pre > threshold) * relu(pre); recon = acts @ W_dec + b_dec."""
    p = {n: torch.from_numpy(v).double() for n, v in np.load(path / "params.npz").items()}
    pre = x.double() @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * torch.nn.functional.relu(pre)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def test_gemma_scope_folder_matches_the_tutorial(tmp_path):
    path = write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71",
                             random_weights(D_IN, D_SAE, seed=1))
    sae = SAE.load(path / "params.npz")  # the weight file itself also names the SAE
    assert (sae.cfg.arch, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.dtype) == ("jumprelu", D_IN, D_SAE, "float32")
    assert sae.cfg.hookpoint == "resid_post.20" and sae.cfg.model == "google/gemma-2-2b"
    assert sae.cfg.apply_b_dec_to_input is False
    x = torch.randn(64, D_IN) + 0.3
    f_ref, x_hat_ref = gemma_scope_forward(path, x)
    with torch.no_grad():
        x_hat, f = sae(x)
    assert (f_ref > 0).any() and (f_ref == 0).any()
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=1e-5, atol=1e-5)


def test_gemma_scope_hookpoints_come_from_the_repository_name():
    assert gemma_scope_info("google/gemma-scope-9b-pt-mlp/layer_3/width_16k/average_l0_5") == (
        "mlp_out.3", "google/gemma-2-9b")
    assert gemma_scope_info("hub/models--google--gemma-scope-9b-it-res/snapshots/ab12/layer_9/width_131k/x") == (
        "resid_post.9", "google/gemma-2-9b-it")
    assert gemma_scope_info("gemma-scope-2b-pt-att/layer_1/width_16k/average_l0_8")[0] == (
        "model.layers.1.self_attn.o_proj:input")  # hook_z = the heads' concatenated outputs = o_proj's input
    assert gemma_scope_info("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6")[0] == "resid_post.0:input"
    assert gemma_scope_info("my_saes/layer_20/params") == ("", "")


def test_params_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "sae"
    path.mkdir()
    w = {n: v.numpy() for n, v in random_weights(D_IN, D_SAE).items()}
    np.savez(path / "params.npz", **{**w, "threshold": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(SAEToolkitError, match="cannot read .*params.npz"):
        SAE.load(path)
    np.savez(path / "params.npz", W_enc=w["W_enc"])
    with pytest.raises(SAEToolkitError, match="lacks tensor 'b_enc'"):
        SAE.load(path)
