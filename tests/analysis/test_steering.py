"""steer(): bit-exact when nothing changes, x + W_decᵀ(f′ − f) otherwise, positions respected; the steer command;
and on the real SmolLM2 a clamped token feature makes the model say that token more often."""

from __future__ import annotations

import pytest
import torch

from sae_toolkit import steer
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.model.hookpoints import forward_kwargs, resolve, run_capture
from sae_toolkit.model.loading import load_model
from sae_toolkit.sae import SAEConfig, make_sae


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-llama")
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=64, d_sae=128, k=8, hookpoint="mlp_out.1", model="tiny-llama"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    ids = torch.tensor([tok("def f(x): return x + 1\nThe quick brown fox", add_special_tokens=False)["input_ids"]])
    return model, tok, sae.eval(), ids


def _logits(model, ids):
    with torch.no_grad():
        return model(**forward_kwargs(model, ids)).logits


def _hooked(model, sae, ids, hp="mlp_out.1", **kw):
    """The activation at the hookpoint as the next module sees it (the downstream input) under steer."""
    seen = {}
    with steer(model, sae, **kw), torch.no_grad():
        # registered after steer's hook, so it runs after it and sees the edited output
        hook = resolve(model, hp).module.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
        try:
            model(**forward_kwargs(model, ids))
        finally:
            hook.remove()
    return seen["x"]


def test_no_change_is_bit_identical(tiny):
    model, _, sae, ids = tiny
    clean = _logits(model, ids)
    x = run_capture(model, [resolve(model, "mlp_out.1")], ids)["mlp_out.1"]
    with torch.no_grad():
        f = sae.encode(x)
    silent = int((f > 0).sum((0, 1)).argmin())  # a latent that fires nowhere in this prompt
    assert float(f[..., silent].abs().max()) == 0
    for kw in ({"features": {}}, {"features": {silent: 0.0}}, {"scale": {silent: 3.0}},
               {"features": {silent: 5.0}, "positions": [10_000]}):
        with steer(model, sae, **kw):
            steered = _logits(model, ids)
        assert torch.equal(steered, clean), kw
    with steer(model, sae, {silent: 5.0}):
        assert not torch.equal(_logits(model, ids), clean)  # the check above could fail
    assert torch.equal(_logits(model, ids), clean)  # hooks are gone after the block


def test_hooked_output_is_x_plus_decoder_delta(tiny):
    model, _, sae, ids = tiny
    x = run_capture(model, [resolve(model, "mlp_out.1")], ids)["mlp_out.1"][0]  # [seq, d_in]
    with torch.no_grad():
        f = sae.encode(x)
    on = int((f > 0).sum(0).argmax())  # a latent that fires somewhere: ablate it
    also = int((f > 0).sum(0).argsort()[-2])  # and scale another one
    f2 = f.clone()
    f2[:, on] = 0.0
    f2[:, 7] = 4.0
    f2[:, also] *= 2.5
    expected = x + (f2 - f) @ sae.W_dec  # independent: dense latents, full decoder
    got = _hooked(model, sae, ids, features={on: 0.0, 7: 4.0}, scale={also: 2.5})[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - x).abs().max() > 0.1


def test_positions_are_respected(tiny):
    model, _, sae, ids = tiny
    x = run_capture(model, [resolve(model, "mlp_out.1")], ids)["mlp_out.1"][0]
    got = _hooked(model, sae, ids, features={3: 6.0}, positions=[2, 5])[0]
    moved = (got != x).any(-1).nonzero().flatten().tolist()
    assert moved == [2, 5]
    torch.testing.assert_close(got[2] - x[2], (6.0 - sae.encode(x[2])[3]) * sae.W_dec[3], rtol=1e-5, atol=1e-5)
    # An edit at a late position leaves every earlier logit bit-identical (causal model).
    clean = _logits(model, ids)
    with steer(model, sae, {3: 6.0}, positions=[8]):
        logits = _logits(model, ids)
    assert torch.equal(logits[0, :8], clean[0, :8]) and not torch.equal(logits[0, 8:], clean[0, 8:])


def test_positions_count_on_during_cached_generation(tiny):
    model, tok, sae, ids = tiny
    n = ids.shape[1]
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        base = model.generate(input_ids=ids, **gen)
        # Steering only a position past the end of the generation changes nothing ...
        with steer(model, sae, {3: 50.0}, positions=[n + 10]):
            same = model.generate(input_ids=ids, **gen)
        # ... and steering the last generated position cannot change the generated tokens before it.
        with steer(model, sae, {3: 50.0}, positions=[n + 5]):
            late = model.generate(input_ids=ids, **gen)
        with steer(model, sae, {3: 50.0}, positions=[n]):  # the first generated token's own position
            early = model.generate(input_ids=ids, **gen)
    assert torch.equal(same, base) and torch.equal(late[0, :n + 6], base[0, :n + 6])
    assert not torch.equal(early, base)


def test_bad_arguments_are_one_line_errors(tiny):
    model, _, sae, _ = tiny
    for kw, match in [({"features": {128: 1.0}}, "not a latent"), ({"features": {1: float("nan")}}, "finite"),
                      ({"features": {1: 1.0}, "scale": {1: 2.0}}, "both set and scaled"),
                      ({"features": {1: 1.0}, "positions": [-1]}, "negative"),
                      ({"features": {1: 1.0}, "hookpoint": "mlp_out.99"}, "out of range")]:
        with pytest.raises(SAEToolkitError, match=match), steer(model, sae, **kw):
            pass


def test_steer_cli_prints_both_continuations(tiny, tmp_path, capsys):
    from sae_toolkit.cli import main

    _, _, sae, _ = tiny
    sae.save(tmp_path / "sae")
    argv = ["steer", str(tmp_path / "sae"), "--model", "tiny-llama", "--prompt", "def f(x):", "--feature", "3=40",
            "--scale", "5=0", "--max-new-tokens", "8", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "baseline" in first and "steered" in first and "3=40" in first and "5*=0" in first
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # greedy: reproducible
    assert main(argv[:6] + ["--max-new-tokens", "2"]) == 2
    assert "nothing to steer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv[:6] + ["--feature", "3:40"])


@pytest.mark.realmodel
def test_clamping_a_token_feature_on_smollm2_raises_that_token():
    """On the real SmolLM2-135M, a clamped ' if' feature at mlp_out.9 makes greedy continuations say ' if'.

    The SAE is built, not trained: its latents are token features whose decoder rows are the unit unembedding
    directions of ' if', ' file', ' list', ' return' (encoder = decoder transpose, bias far negative, so every
    latent is 0 on real text and the steering edit is exactly value · W_dec[i]). Training one in the test would cost
    minutes on two CPU cores; measured once: value 60 gave 1 ' if' in 12 tokens, 150 gave 5, the baseline 0.
    """
    from sae_toolkit.analysis.steering import generate

    model, tok = load_model("smollm2-135m")
    words = [" if", " file", " list", " return"]
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(i) == 1 for i in ids)
    W_U = model.get_output_embeddings().weight.detach()[[i[0] for i in ids]]  # [4, d_model]
    sae = make_sae(SAEConfig(arch="relu", d_in=576, d_sae=4, hookpoint="mlp_out.9", model="smollm2-135m"))
    with torch.no_grad():
        sae.W_dec.copy_(W_U / W_U.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.fill_(-1e4)
        sae.b_dec.zero_()
    out = generate(model, tok, sae.eval(), "The function returns", {0: 150.0}, max_new_tokens=12)
    count = lambda text: tok(text, add_special_tokens=False)["input_ids"].count(ids[0][0])  # noqa: E731
    assert count(out.steered) >= count(out.baseline) + 3, out
    again = generate(model, tok, sae, "The function returns", {0: 150.0}, max_new_tokens=12)
    assert again == out  # greedy: reproducible
