"""Other toolkits' hookpoint names map to ours, and the names we map to resolve on real model layouts."""

import pytest

from sae_toolkit.model.hookpoints import resolve
from sae_toolkit.model.loading import load_model
from sae_toolkit.sae.formats.hookpoints import EMBEDDINGS, from_sparsify, from_transformerlens


@pytest.mark.parametrize(("tl", "ours"), [
    ("blocks.9.hook_resid_post", "resid_post.9"), ("blocks.9.hook_mlp_out", "mlp_out.9"),
    ("blocks.9.hook_attn_out", "attn_out.9"), ("blocks.9.mlp.hook_post", "mlp_hidden.9"),
    ("blocks.9.hook_resid_pre", "resid_post.8"), ("blocks.0.hook_resid_pre", EMBEDDINGS),
    ("hook_embed", EMBEDDINGS), ("blocks.3.attn.hook_z", "blocks.3.attn.hook_z"),
])
def test_transformerlens_names(tl, ours):
    assert from_transformerlens(tl) == ours


@pytest.mark.parametrize(("name", "ours"), [
    ("layers.9", "resid_post.9"), ("layers.9.mlp", "mlp_out.9"), ("layers.9.self_attn", "attn_out.9"),
    ("h.2", "resid_post.2"), ("h.2.attn", "attn_out.2"), ("h.2.mlp.act", "mlp_hidden.2"),
    ("embed_tokens", EMBEDDINGS), ("layers.9.mlp.act_fn", "layers.9.mlp.act_fn"),
])
def test_sparsify_names(name, ours):
    assert from_sparsify(name) == ours


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_mapped_names_resolve(spec):
    model, _ = load_model(spec)
    emb = resolve(model, EMBEDDINGS)  # the input of block 0: the residual stream before layer 0
    assert emb.io == "input" and emb.module_name.endswith(".0")
    modules = dict(model.named_modules())
    for tl in ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out",
               "blocks.1.mlp.hook_post", "blocks.2.hook_resid_pre", "layers.1.mlp"):
        hp = resolve(model, from_sparsify(tl) if tl.startswith("layers") else from_transformerlens(tl))
        assert hp.module_name in modules
