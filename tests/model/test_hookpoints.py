"""Hookpoint resolution per architecture, capture vs a plain hook, early stop, splice, hook removal."""

import pytest
import torch
from _cache_helpers import direct_capture, one_thread  # noqa: F401 (fixture)

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.model.hookpoints import capture, resolve, resolve_all, run_capture, splice
from sae_toolkit.model.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# (spec, alias) → (module path, io)
EXPECTED = {
    "tiny-llama": {
        "mlp_out.2": ("model.layers.2.mlp", "output"),
        "mlp_in.2": ("model.layers.2.mlp", "input"),
        "mlp_hidden.2": ("model.layers.2.mlp.down_proj", "input"),
        "resid_post.2": ("model.layers.2", "output"),
        "attn_out.2": ("model.layers.2.self_attn", "output"),
    },
    "tiny-gpt2": {
        "mlp_out.2": ("transformer.h.2.mlp", "output"),
        "mlp_in.2": ("transformer.h.2.mlp", "input"),
        "mlp_hidden.2": ("transformer.h.2.mlp.c_proj", "input"),
        "resid_post.2": ("transformer.h.2", "output"),
        "attn_out.2": ("transformer.h.2.attn", "output"),
    },
    "tiny-gptneox": {
        "mlp_out.2": ("gpt_neox.layers.2.mlp", "output"),
        "mlp_in.2": ("gpt_neox.layers.2.mlp", "input"),
        "mlp_hidden.2": ("gpt_neox.layers.2.mlp.dense_4h_to_h", "input"),
        "resid_post.2": ("gpt_neox.layers.2", "output"),
        "attn_out.2": ("gpt_neox.layers.2.attention", "output"),
    },
    "tiny-bert": {
        "mlp_out.2": ("bert.encoder.layer.2.output.dense", "output"),
        "mlp_in.2": ("bert.encoder.layer.2.intermediate", "input"),
        "mlp_hidden.2": ("bert.encoder.layer.2.output.dense", "input"),
        "resid_post.2": ("bert.encoder.layer.2", "output"),
        "attn_out.2": ("bert.encoder.layer.2.attention.output.dense", "output"),
    },
}
for _spec in ("tiny-qwen2", "tiny-mistral", "tiny-gemma"):
    EXPECTED[_spec] = EXPECTED["tiny-llama"]


@pytest.fixture(scope="module")
def models():
    return {spec: load_model(spec)[0] for spec in EXPECTED}


def ids(batch=2, seq=12, seed=0):
    return torch.randint(3, 259, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_aliases_resolve_per_architecture(models, spec):
    for alias, (module_name, io) in EXPECTED[spec].items():
        hp = resolve(models[spec], alias)
        assert (hp.name, hp.module_name, hp.io) == (alias, module_name, io)
        assert hp.module is dict(models[spec].named_modules())[module_name]


# The norm whose output the MLP reads (what `mlp_in.N` must equal), per family.
MLP_IN_NORM = {**dict.fromkeys(["tiny-llama", "tiny-qwen2", "tiny-mistral"], "model.layers.2.post_attention_layernorm"),
               "tiny-gpt2": "transformer.h.2.ln_2",
               "tiny-gptneox": "gpt_neox.layers.2.post_attention_layernorm",
               "tiny-bert": "bert.encoder.layer.2.attention.output.LayerNorm"}


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_mlp_in_is_the_normalized_residual_the_mlp_reads(models, spec):
    model, x = models[spec], ids()
    modules = dict(model.named_modules())
    norm = MLP_IN_NORM.get(spec)
    if norm is None:  # gemma: gemma2/3 put a pre_feedforward_layernorm before the MLP, gemma1 reuses post_attention
        norm = next(n for n in ("model.layers.2.pre_feedforward_layernorm", "model.layers.2.post_attention_layernorm")
                    if n in modules)
    got = run_capture(model, resolve_all(model, ["mlp_in.2", "mlp_out.2"]), x)
    torch.testing.assert_close(got["mlp_in.2"], direct_capture(model, norm, "output", x), rtol=0, atol=0)
    mlp = modules[resolve(model, "mlp_in.2").module_name]
    with torch.no_grad():  # mlp_in through the MLP gives mlp_out, the pair a transcoder learns
        pred = mlp(got["mlp_in.2"])
        if spec == "tiny-bert":  # BERT's MLP is `intermediate` (dense + GELU), then `output.dense`
            pred = modules["bert.encoder.layer.2.output.dense"](pred)
    torch.testing.assert_close(pred, got["mlp_out.2"])


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_capture_equals_plain_hook_with_and_without_early_stop(models, spec):
    """Every alias (tuple-returning attention included) against a plain hook on a full forward."""
    model, x = models[spec], ids()
    block_input = resolve(model, "resid_post.1").module_name + ":input"  # the residual stream before block 1
    hps = resolve_all(model, [*EXPECTED[spec], block_input])
    early = run_capture(model, hps, x, stop_early=True)
    full = run_capture(model, hps, x, stop_early=False)
    for hp in hps:
        ref = direct_capture(model, hp.module_name, hp.io, x)
        assert early[hp.name].shape == ref.shape and ref.shape[:2] == x.shape
        torch.testing.assert_close(early[hp.name], ref, rtol=0, atol=0)
        torch.testing.assert_close(full[hp.name], ref, rtol=0, atol=0)


def test_early_stop_skips_later_layers_and_the_head(models):
    model = models["tiny-llama"]
    calls = []
    handles = [
        model.model.layers[3].register_forward_hook(lambda *a: calls.append("layer3")),
        model.lm_head.register_forward_hook(lambda *a: calls.append("head")),
    ]
    try:
        run_capture(model, [resolve(model, "mlp_out.1")], ids(), stop_early=True)
        assert calls == []
        run_capture(model, [resolve(model, "mlp_out.1")], ids(), stop_early=False)
        assert calls == ["layer3", "head"]
    finally:
        for h in handles:
            h.remove()


def test_hooks_are_removed_even_on_error(models):
    model = models["tiny-gpt2"]
    hp = resolve(model, "mlp_out.1")
    with pytest.raises(RuntimeError), capture(model, [hp]):
        raise RuntimeError("boom")
    with splice(model, hp, torch.zeros_like):
        pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # A second forward after an early-stopped one starts fresh (every hookpoint pending again).
    with capture(model, [hp, resolve(model, "mlp_out.3")]) as acts:
        model(input_ids=ids())
    assert set(acts) == {"mlp_out.1", "mlp_out.3"}


@pytest.mark.parametrize("name", ["mlp_out.1", "mlp_hidden.1", "resid_post.1", "attn_out.1"])
def test_splice_identity_keeps_logits_and_zero_changes_them(models, name):
    model, x = models["tiny-llama"], ids()
    hp = resolve(model, name)
    with torch.no_grad():
        clean = model(input_ids=x).logits
        with splice(model, hp, lambda a: a.clone()):
            same = model(input_ids=x).logits
        with splice(model, hp, torch.zeros_like):
            ablated = model(input_ids=x).logits
            inner = run_capture(model, [hp, resolve(model, "resid_post.3")], x)
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert not torch.allclose(ablated, clean)
    if hp.io == "output":  # what later hooks see is the replaced activation
        assert torch.count_nonzero(inner[name]) == 0
    after = model(input_ids=x).logits
    torch.testing.assert_close(after, clean, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, message",
    [
        ("mlp_out.4", "layer 4 is out of range, the model has 4 layers"),
        ("mlp_outt.1", "did you mean 'mlp_out.1'"),
        ("model.layers.1.mlpp", "did you mean 'model.layers.1.mlp'"),
        ("model.layers.1.mlpp:input", "'model.layers.1.mlp:input'"),
        ("mlp_hidden.1:input", "already a module input"),
        ("zzz", "aliases are mlp_out.N"),
    ],
)
def test_bad_names_fail_with_suggestions(models, name, message):
    with pytest.raises(SAEToolkitError) as err:
        resolve(models["tiny-llama"], name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resolve_all_refuses_duplicates_and_empty(models):
    with pytest.raises(SAEToolkitError, match="given twice"):
        resolve_all(models["tiny-llama"], ["mlp_out.1", "mlp_out.1"])
    with pytest.raises(SAEToolkitError, match="no hookpoint"):
        resolve_all(models["tiny-llama"], [])
