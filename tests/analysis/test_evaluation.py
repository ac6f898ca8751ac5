"""The analysis pass against brute force: top activations, interval samples, metrics over the file, weight
statistics, logit lens and CE/KL splicing on a tiny model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _report_helpers import (
    BOS,
    ListTokenizer,
    brute_force_top,
    perfect_relu_sae,
    random_file,
    tiny_model_file,
    write_acts,
)

from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.analysis.evaluation import (
    evaluate,
    logit_lens,
    model_metrics,
    scan,
    top_activations,
    weight_stats,
)
from sae_toolkit.analysis.metrics import next_token_ce
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAEConfig, make_sae

VOCAB = [f"t{i}" for i in range(40)]


def _sae(d_in=16, d_sae=48, arch="relu", seed=0, **kw):
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, hookpoint="mlp_out.1", **kw))
    with torch.no_grad():
        sae.b_enc.normal_(-0.5, 0.3)  # some latents rare, some dead
    return sae


def _latents(sae, acts):
    with torch.no_grad():
        return sae(torch.from_numpy(acts).reshape(-1, acts.shape[-1])).feature_acts.view(*acts.shape[:2], -1)


@pytest.mark.parametrize("batch_tokens", [16, 4096])  # one window per chunk, and the whole file in one chunk
def test_top_activations_equal_brute_force(tmp_path, batch_tokens):
    path, acts, tokens = random_file(tmp_path / "a.h5", extra_rows=40)
    sae = _sae()
    res = scan(sae, path, top_k=5, left=3, right=2, batch_tokens=batch_tokens, tokenizer=ListTokenizer(VOCAB))
    f = _latents(sae, acts)
    valid = torch.from_numpy(~np.isin(tokens, [0, 1, 2]))
    ref = brute_force_top(f, valid, k=5, sep=3 + 2)
    fm = f.masked_fill(~valid[..., None], 0.0)
    assert sum(len(r) for r in ref) > 50  # the check below is not vacuous
    for j in range(sae.cfg.d_sae):
        got = res.top.examples(j, res.reader.tokens_of)["top"]
        assert [(e["seq"], e["position"]) for e in got] == [(s, p) for s, p, _ in ref[j]]
        for e, (s, p, v) in zip(got, ref[j]):
            assert e["activation"] == pytest.approx(v, rel=1e-5)
            lo, hi = max(0, p - 3), min(16, p + 3)
            assert e["tokens"] == [VOCAB[t] for t in tokens[s, lo:hi]]
            np.testing.assert_allclose(e["values"], fm[s, lo:hi, j].numpy(), rtol=1e-5, atol=1e-7)
            assert e["tokens"][e["peak"]] == VOCAB[tokens[s, p]] and tokens[s, p] not in (0, 1, 2)
        for a in got:  # no two context windows overlap
            assert all(a is b or a["seq"] != b["seq"] or abs(a["position"] - b["position"]) > 5 for b in got)
    # several examples come from one stored window when their context windows do not overlap
    assert any(len({s for s, _, _ in r}) < len(r) for r in ref)


def test_interval_samples_lie_in_their_interval_and_repeat_no_top_window(tmp_path):
    path, acts, tokens = random_file(tmp_path / "a.h5", n_seqs=30)
    sae = _sae()
    res = scan(sae, path, top_k=3, tokenizer=None)
    f = _latents(sae, acts)
    n_checked = 0
    for j in range(sae.cfg.d_sae):
        ex = res.top.examples(j, res.reader.tokens_of)
        for e in ex["intervals"]:
            lo, hi = e["interval"]
            assert lo <= e["activation"] <= hi + 1e-6
            assert all(t["seq"] != e["seq"] or abs(t["position"] - e["position"]) > 16 for t in ex["top"])
            assert e["activation"] == pytest.approx(float(f[e["seq"], e["position"], j]), rel=1e-5)
            assert e["tokens"][e["peak"]] == f"<{tokens[e['seq'], e['position']]}>"  # no tokenizer: ids
            n_checked += 1
    assert n_checked > 20


def test_scan_metrics_equal_a_direct_computation_without_bos(tmp_path):
    path, acts, tokens = random_file(tmp_path / "a.h5")
    sae = _sae()
    m = evaluate(sae, path, batch_tokens=32, tokenizer=None)
    keep = tokens.reshape(-1) != BOS
    x = torch.from_numpy(acts.reshape(-1, 16)[keep]).double()
    with torch.no_grad():
        out = sae(x.float())
    x_hat, f = out.x_hat.double(), out.feature_acts.double()
    assert m["tokens"] == keep.sum()
    ev = 1 - (((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()
    assert m["explained_variance"] == pytest.approx(ev,
                                                    rel=1e-6)
    assert m["l0"] == pytest.approx((f > 0).sum(-1).double().mean().item(), rel=1e-9)
    assert m["dead_fraction"] == pytest.approx(((f > 0).sum(0) == 0).double().mean().item())
    assert m["cosine_sim"] == pytest.approx(F.cosine_similarity(x, x_hat, dim=-1).mean().item(), rel=1e-6)


def test_bfloat16_files_and_token_limits(tmp_path):
    path32, acts, _ = random_file(tmp_path / "a32.h5")
    path16, _, _ = random_file(tmp_path / "a16.h5", dtype="bfloat16")
    sae = _sae()
    m16 = evaluate(sae, path16, tokenizer=None)
    rounded = torch.from_numpy(acts).to(torch.bfloat16).float().numpy()
    with ActsReader(path32, tokenizer=None) as r:
        tokens = r.tokens().numpy()
    ref = evaluate(sae, write_acts(tmp_path / "r.h5", rounded, tokens), tokenizer=None)
    assert m16["fvu"] == pytest.approx(ref["fvu"], rel=1e-9)
    part = evaluate(sae, path32, tokens=40, tokenizer=None)  # rounded up to whole windows: 3 of 16 tokens
    assert part["tokens"] == 3 * 15
    ranged = evaluate(sae, path32, seq_range=(10, 12), tokenizer=None)
    assert ranged["tokens"] == 2 * 15


def test_bad_inputs_are_one_line_errors(tmp_path):
    path, _, _ = random_file(tmp_path / "a.h5")
    with pytest.raises(SAEToolkitError, match="holds mlp_out.1"):
        evaluate(_sae(), path, hookpoint="resid_post.3")
    with pytest.raises(SAEToolkitError, match="d_in=8"):
        evaluate(_sae(d_in=8), path, hookpoint="mlp_out.1")
    with pytest.raises(SAEToolkitError, match="seq_range"):
        evaluate(_sae(), path, seq_range=(5, 50))
    with pytest.raises(SAEToolkitError, match="does not exist"):
        evaluate(_sae(), tmp_path / "missing.h5")


def test_top_activations_api_records(tmp_path):
    path, _, _ = random_file(tmp_path / "a.h5")
    # Only BOS special: the best example is then the latent's max over all evaluated tokens.
    recs = top_activations(_sae(), path, top_k=4, latents=[0, 5, 7], tokenizer=ListTokenizer(VOCAB, special=(0,)))
    assert [r["feature"] for r in recs] == [0, 5, 7]
    assert any(r["examples"] for r in recs)
    for r in recs:
        assert set(r) == {"feature", "density", "max_activation", "examples", "interval_examples", "massive_share",
                          "sink"}
        assert r["sink"] is False  # random rows: no massive-activation tokens (tests/analysis/test_sinks.py)
        if r["examples"]:
            assert r["examples"][0]["activation"] == pytest.approx(r["max_activation"], rel=1e-6)
            assert r["density"] > 0


def test_weight_stats_match_direct_computation():
    sae = _sae(d_sae=40)
    ws = weight_stats(sae, chunk=7)
    dec = F.normalize(sae.W_dec.detach(), dim=-1)
    enc = F.normalize(sae.W_enc.detach().T, dim=-1)
    torch.testing.assert_close(ws.enc_dec_cos, (dec * enc).sum(-1))
    sims = dec @ dec.T
    sims.fill_diagonal_(-2)
    torch.testing.assert_close(ws.nearest_cos, sims.max(-1).values)
    # the chosen neighbour is a best one (argmax itself may pick another of two cosines equal up to rounding)
    torch.testing.assert_close(sims.gather(1, ws.nearest[:, None]).squeeze(1), sims.max(-1).values)
    assert (ws.nearest != torch.arange(40)).all()


@pytest.fixture(scope="module")
def tiny_llama():
    from sae_toolkit.model.loading import load_model

    return load_model("tiny-llama")


def test_logit_lens_matches_decoder_times_unembedding(tiny_llama):
    model, tok = tiny_llama
    sae = _sae(d_in=64, d_sae=32)
    lens = logit_lens(sae, model, tok, k=5)
    W_U = model.get_output_embeddings().weight.detach() * model.model.norm.weight.detach()
    logits = sae.W_dec.detach() @ W_U.T
    torch.testing.assert_close(lens.top_values, logits.topk(5, dim=-1).values)
    torch.testing.assert_close(lens.bottom_values, logits.topk(5, dim=-1, largest=False).values)
    best = logits.argmax(-1)
    assert [row[0] for row in lens.top_tokens] == [tok.decode([int(t)]) for t in best]
    # MLP hidden neurons (d_mlp = 128) go through down_proj first
    hidden = _sae(d_in=128, d_sae=16)
    hidden.cfg.hookpoint = "mlp_hidden.1"
    lens_h = logit_lens(hidden, model, tok, k=3)
    ref = hidden.W_dec.detach() @ model.model.layers[1].mlp.down_proj.weight.detach().T @ W_U.T
    torch.testing.assert_close(lens_h.top_values, ref.topk(3, dim=-1).values, rtol=1e-4, atol=1e-5)
    with pytest.raises(SAEToolkitError, match="cannot read latents of width 128"):
        bad = _sae(d_in=128, d_sae=16)
        bad.cfg.hookpoint = "attn_out.1"
        logit_lens(bad, model, tok)


def test_model_metrics_perfect_sae_and_zero_ablation(tiny_llama, tmp_path):
    model, tok = tiny_llama
    path = tiny_model_file(tmp_path / "t.h5", n_seqs=3, ctx=24)
    ids = ActsReader(path, tokenizer=None).tokens()
    ids[1, 10] = tok.bos_token_id  # a BOS mid-window: its position keeps the clean activation
    acc = model_metrics(perfect_relu_sae(64), model, ids, hookpoint="mlp_out.1", bos_token_id=tok.bos_token_id)
    m = acc.compute()
    is_bos = ids == tok.bos_token_id
    mask = ~is_bos[:, :-1] & ~is_bos[:, 1:]
    assert m["model_tokens"] == int(mask.sum()) and m["model_seqs"] == 3
    with torch.no_grad():
        clean = model(ids).logits
    assert m["ce_clean"] == pytest.approx(next_token_ce(clean, ids)[mask].double().mean().item(), rel=1e-5)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], rel=1e-5) and m["kl_sae"] < 1e-5
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    # zero ablation by hand: a forward hook that zeroes the MLP output at non-BOS positions
    mlp = model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda mod, args, out: out * is_bos[..., None])
    try:
        with torch.no_grad():
            zero = model(ids).logits
    finally:
        handle.remove()
    assert m["ce_zero_ablation"] == pytest.approx(next_token_ce(zero, ids)[mask].double().mean().item(), rel=1e-5)


def test_model_metrics_mean_ablation_baseline(tiny_llama, tmp_path):
    model, tok = tiny_llama
    path = tiny_model_file(tmp_path / "t.h5", n_seqs=3, ctx=24)
    ids = ActsReader(path, tokenizer=None).tokens()
    mean_act = torch.randn(64)
    excluded = torch.zeros(24, dtype=torch.bool)
    excluded[3] = True  # a massive-activation position keeps its clean activation and is not scored
    m = model_metrics(perfect_relu_sae(64), model, ids, hookpoint="mlp_out.1", bos_token_id=tok.bos_token_id,
                      mean_act=mean_act, excluded_positions=excluded).compute()
    keep = (ids != tok.bos_token_id) & ~excluded[None, :]
    mask = keep[:, :-1] & keep[:, 1:]
    assert m["model_tokens"] == int(mask.sum())
    mlp = model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda mod, args, out: torch.where(keep[..., None], mean_act, out))
    try:
        with torch.no_grad():
            mean_logits = model(ids).logits
    finally:
        handle.remove()
    want = next_token_ce(mean_logits, ids)[mask].double().mean().item()
    assert m["ce_mean_ablation"] == pytest.approx(want, rel=1e-5)
    assert m["ce_loss_recovered_mean"] == pytest.approx(1.0, abs=1e-3)  # a perfect SAE recovers it all
