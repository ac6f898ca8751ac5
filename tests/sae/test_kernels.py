"""Sparse kernels vs dense references: values and gradients (decode, encoder backward, TopK/BatchTopK/AuxK losses)."""

import pytest
import torch
from _sae_helpers import D_SAE, grads_of, randomized, topk_loss_ref

from sae_toolkit.sae import codes, gated, jumprelu, kernels
from sae_toolkit.sae.kernels import (
    SparseActs,
    batch_topk_code,
    sparse_decode,
    sparse_pre_acts,
    topk_code,
    transposed,
)


@pytest.fixture(autouse=True)
def _float64():
    # parity checks in float64 so reference and kernels agree to rounding
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _random_problem(n=7, d_in=5, d_sae=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, requires_grad=True)
    W_enc = torch.randn(d_in, d_sae, generator=g, requires_grad=True)
    b_enc = torch.randn(d_sae, generator=g, requires_grad=True)
    W_dec = torch.randn(d_sae, d_in, generator=g, requires_grad=True)
    return x, W_enc, b_enc, W_dec


@pytest.mark.parametrize("select", ["topk", "batchtopk"])
@pytest.mark.parametrize("shift", [False, True])
def test_sparse_encode_decode_match_dense(select, shift):
    x, W_enc, b_enc, W_dec = _random_problem()
    b_dec = torch.randn(x.shape[1], requires_grad=True)
    if shift:  # b_dec's gradient through the kernel's matvec shortcut, x without grad
        x = x.detach()
        sae_in = x - b_dec.detach()
    else:  # the general path: gradient to the encoder input itself
        sae_in = x
    with torch.no_grad():
        pre = sae_in @ W_enc + b_enc
    code = topk_code(pre, 3) if select == "topk" else batch_topk_code(pre, 3)
    assert code.vals.numel() == 3 * x.shape[0]
    assert torch.all(code.rows[1:] >= code.rows[:-1])  # sorted by row, as the kernels require
    assert code.k == (3 if select == "topk" else None)

    z = sparse_pre_acts(code, sae_in, W_enc, b_enc, b_dec if shift else None)
    x_hat = sparse_decode(code._replace(vals=z), W_dec)
    probe = torch.randn_like(x_hat)
    wrt = [b_dec if shift else x, W_enc, b_enc, W_dec]
    got = torch.autograd.grad((x_hat * probe).sum(), wrt)

    # dense reference: same entries, full matrices
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[code.rows, code.cols] = True
    f = ((x - b_dec if shift else x) @ W_enc + b_enc) * mask
    x_hat_ref = f @ W_dec
    ref = torch.autograd.grad((x_hat_ref * probe).sum(), wrt)

    torch.testing.assert_close(x_hat, x_hat_ref)
    for name, a, b in zip(["b_dec" if shift else "x", "W_enc", "b_enc", "W_dec"], got, ref):
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")


def test_uniform_rows_fast_path_matches_general_path():
    x, W_enc, b_enc, W_dec = _random_problem(n=9, d_sae=30, seed=2)
    with torch.no_grad():
        code = topk_code(x @ W_enc + b_enc, 4)
    results = []
    for k in (4, None):  # None forces the any-entries-per-row kernels
        c = code._replace(k=k)
        z = sparse_pre_acts(c, x, W_enc, b_enc)
        x_hat = sparse_decode(c._replace(vals=z), W_dec)
        results.append([x_hat, *torch.autograd.grad(x_hat.pow(2).sum(), [x, W_enc, b_enc, W_dec])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_kernels_pass_gradcheck_with_uneven_rows():
    x, W_enc, b_enc, W_dec = _random_problem(n=5, d_sae=12, seed=1)
    # rows with 0, 1 and many entries, repeated columns across rows
    rows = torch.tensor([0, 0, 0, 2, 3, 3, 3, 3, 3])
    cols = torch.tensor([1, 5, 11, 5, 0, 1, 2, 5, 11])
    vals = torch.randn(9, requires_grad=True)
    code = SparseActs(vals, rows, cols, 5)
    assert torch.autograd.gradcheck(lambda v, W: sparse_decode(code._replace(vals=v), W), (vals, W_dec))

    def enc(x, W, b):
        pre = (x @ W + b).detach()[rows, cols]
        return sparse_pre_acts(SparseActs(pre, rows, cols, 5), x, W, b)

    assert torch.autograd.gradcheck(enc, (x, W_enc, b_enc))

    def enc_shifted(b_dec, W, b):
        sae_in = (x - b_dec).detach()
        pre = (sae_in @ W + b).detach()[rows, cols]
        return sparse_pre_acts(SparseActs(pre, rows, cols, 5), sae_in, W, b, b_dec)

    b_dec = torch.randn(x.shape[1], requires_grad=True)
    assert torch.autograd.gradcheck(enc_shifted, (b_dec, W_enc, b_enc))
    # a token without active latents decodes to exactly zero
    assert torch.equal(sparse_decode(code, W_dec)[1], torch.zeros(W_dec.shape[1]))


def test_decoder_grad_touches_only_active_rows():
    x, W_enc, b_enc, W_dec = _random_problem(d_sae=40)
    with torch.no_grad():
        pre = x @ W_enc + b_enc
    code = topk_code(pre, 2)
    z = sparse_pre_acts(code, x, W_enc, b_enc)
    sparse_decode(code._replace(vals=z), W_dec).sum().backward()
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[code.cols] = False
    assert untouched.any()
    assert torch.all(W_dec.grad[untouched] == 0) and torch.all(W_enc.grad[:, untouched] == 0)
    assert torch.all(W_dec.grad[~untouched].abs().sum(-1) > 0)


@pytest.mark.parametrize(
    "arch,kw",
    [("topk", {}), ("topk", {"multi_topk": True}), ("batchtopk", {})],
    ids=["topk", "multi_topk", "batchtopk"],
)
def test_training_loss_matches_dense_reference(arch, kw):
    sae = randomized(arch, **kw)
    x = torch.randn(16, sae.cfg.d_in)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_loss(x, dead_mask=dead)
    ref = topk_loss_ref(sae, x, dead)
    assert set(out.parts) == set(ref)
    for name in ref:
        torch.testing.assert_close(out.parts[name], ref[name], msg=f"loss part {name}")
    torch.testing.assert_close(out.loss, sum(ref.values()))
    got, want = grads_of(sae, out.loss), grads_of(sae, sum(ref.values()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=f"gradient of {name}")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_gradient_reaches_dead_encoder_columns(arch):
    sae = randomized(arch, seed=3)
    x = torch.randn(32, sae.cfg.d_in)
    with torch.no_grad():
        alive = sae.encode(x).gt(0).any(0) if arch == "topk" else sae.training_loss(x).fired
    dead = ~alive  # latents that do not fire on this batch: only AuxK can train them
    assert dead.sum() >= 4
    out = sae.training_loss(x, dead_mask=dead)
    assert out.parts["auxk"] > 0
    got = grads_of(sae, out.parts["auxk"])
    want = grads_of(sae, topk_loss_ref(sae, x, dead)["auxk"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=f"AuxK gradient of {name}")
    # the point of AuxK: dead latents' encoder columns, biases and decoder rows move
    assert got["W_enc"][:, dead].abs().sum(0).gt(0).sum() >= 4
    assert got["b_enc"][dead].abs().gt(0).sum() >= 4
    assert got["W_dec"][dead].abs().sum(-1).gt(0).sum() >= 4
    # and nothing reaches alive latents through AuxK
    assert torch.all(got["W_enc"][:, alive] == 0) and torch.all(got["W_dec"][alive] == 0)


@pytest.mark.parametrize("k_aux", [2, 40], ids=["top_k_aux_chosen", "all_positives_kept"])
def test_auxk_keeps_the_top_k_aux_or_every_positive(k_aux, monkeypatch):
    """AuxK's dead block matches the reference whether a token has more positive dead pre-activations than k_aux
    (its top k_aux are chosen) or at most k_aux (every positive one is kept, and the top-k is skipped)."""
    sae = randomized("topk", seed=4, k_aux=k_aux)
    x = torch.randn(24, sae.cfg.d_in)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    positives = int((sae.pre_acts(x).detach()[:, dead] > 0).sum(-1).max())
    assert (positives > k_aux) == (k_aux == 2)
    calls = []
    monkeypatch.setattr(torch.Tensor, "topk", _counting(torch.Tensor.topk, calls))
    out = sae.training_loss(x, dead_mask=dead)
    assert len(calls) == (2 if k_aux == 2 else 1)  # the main TopK, then AuxK's unless skipped
    ref = topk_loss_ref(sae, x, dead)
    torch.testing.assert_close(out.parts["auxk"], ref["auxk"])
    got, want = grads_of(sae, out.loss), grads_of(sae, sum(ref.values()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=f"gradient of {name}")


def test_auxk_is_zero_without_dead_latents():
    sae = randomized("topk")
    x = torch.randn(8, sae.cfg.d_in)
    assert sae.training_loss(x).parts["auxk"] == 0
    assert sae.training_loss(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool)).parts["auxk"] == 0


@pytest.fixture(params=["cpu_branches", "gpu_branches"])
def branches(request, monkeypatch):
    """Run a test with the kernels' and the AuxK loss's CPU choices, then with the ones a GPU takes (forced)."""
    if request.param == "gpu_branches":
        monkeypatch.setattr(kernels, "_fused_gather_dot", lambda t: False)  # chunked row gathers + bmm
        for module in (kernels, codes):  # static masked AuxK, no early exit, no host-side shortcuts
            monkeypatch.setattr(module, "host_syncs_ok", lambda t: False)
    return request.param


@pytest.mark.parametrize(
    "arch,kw",
    [("topk", {}), ("topk", {"multi_topk": True}), ("batchtopk", {}), ("topk", {"apply_b_dec_to_input": False})],
    ids=["topk", "multi_topk", "batchtopk", "topk_no_b_dec_in"],
)
def test_both_branches_match_dense_reference(arch, kw, branches):
    sae = randomized(arch, seed=7, **kw)
    x = torch.randn(24, sae.cfg.d_in)
    for dead in (torch.arange(D_SAE) % 3 == 0, torch.arange(D_SAE) < 2):  # k_aux = 4 > 2 dead: −inf picks
        out = sae.training_loss(x, dead_mask=dead)
        ref = topk_loss_ref(sae, x, dead)
        for name in ref:
            torch.testing.assert_close(out.parts[name], ref[name], msg=f"loss part {name} ({branches})")
        assert out.parts["auxk"] > 0
        got, want = grads_of(sae, out.loss), grads_of(sae, sum(ref.values()))
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=f"gradient of {name} ({branches})")
        # AuxK's gradient reaches the dead latents' encoder columns (DESIGN §5)
        aux = grads_of(sae, out.parts["auxk"])
        assert aux["W_enc"][:, dead].abs().sum() > 0 and torch.all(aux["W_enc"][:, ~dead] == 0)
    none_dead = torch.zeros(D_SAE, dtype=torch.bool)
    assert sae.training_loss(x, dead_mask=none_dead).parts["auxk"] == 0


@pytest.mark.parametrize("k", [3, None])
def test_gather_dot_branches_and_row_blocks_agree(k, monkeypatch):
    g_ = torch.Generator().manual_seed(4)
    n, d, n_cols = 37, 6, 50
    g, W = torch.randn(n, d, generator=g_), torch.randn(n_cols, d, generator=g_)
    code = topk_code(torch.randn(n, n_cols, generator=g_), 3)
    if k is None:  # uneven rows, one token without entries
        keep = code.rows != 5
        code = SparseActs(code.vals[keep], code.rows[keep], code.cols[keep], n)
    want = (g @ W.t())[code.rows, code.cols]
    results = {"fused": kernels._gather_dot(g, W, code.rows, code.cols, k)}
    results["fused_bf16_W"] = kernels._gather_dot(g, W.bfloat16(), code.rows, code.cols, k)
    want_bf16 = (g @ W.bfloat16().to(W.dtype).t())[code.rows, code.cols]
    monkeypatch.setattr(kernels, "_fused_gather_dot", lambda t: False)
    monkeypatch.setattr(kernels, "_chunk_elements", lambda device: 5 * d * 3)  # several gather chunks
    results["gather_chunks"] = kernels._gather_dot(g, W, code.rows, code.cols, k)
    for name, got in results.items():
        torch.testing.assert_close(got, want_bf16 if name == "fused_bf16_W" else want, msg=name)


@pytest.mark.parametrize("fused", [True, False])
def test_gather_dot_by_column_matches_dense_products(fused, monkeypatch):
    """Dot products of entries in column order (rows then out of order) equal the dense g Wᵀ at those entries, on
    the fused kernel and on the chunked gathers."""
    monkeypatch.setattr(kernels, "_fused_gather_dot", lambda t: fused)
    g_ = torch.Generator().manual_seed(5)
    g, W = torch.randn(13, 7, generator=g_, dtype=torch.float64), torch.randn(20, 7, generator=g_, dtype=torch.float64)
    flat = torch.randperm(13 * 20, generator=g_)[:60].sort().values
    code = kernels.SparseActs(torch.ones(60, dtype=torch.float64), flat // 20, flat % 20, 13)
    t = kernels.transposed(code, 20)
    cols_t = code.cols[t.order]
    assert bool((cols_t[1:] >= cols_t[:-1]).all()) and not bool((t.rows[1:] >= t.rows[:-1]).all())
    got = kernels.gather_dot_by_column(g, W, t.rows, cols_t)
    torch.testing.assert_close(got, (g @ W.T)[t.rows, cols_t])


def test_shared_transpose_gives_the_same_gradients():
    x, W_enc, b_enc, W_dec = _random_problem(n=11, d_sae=20, seed=6)
    with torch.no_grad():
        code = batch_topk_code(x @ W_enc + b_enc, 3)
    grads = []
    for t in (None, transposed(code, 20)):
        z = sparse_pre_acts(code, x, W_enc, b_enc, t=t)
        x_hat = sparse_decode(code._replace(vals=z), W_dec, t)
        grads.append(torch.autograd.grad(x_hat.pow(3).sum(), [x, W_enc, b_enc, W_dec]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cuda_kernels_match_dense_reference(arch):
    sae = randomized(arch, seed=5).cuda()
    x = torch.randn(64, sae.cfg.d_in, device="cuda")
    dead = torch.zeros(D_SAE, dtype=torch.bool, device="cuda")
    dead[1::4] = True
    out = sae.training_loss(x, dead_mask=dead)
    ref = topk_loss_ref(sae, x, dead)
    got, want = grads_of(sae, out.loss), grads_of(sae, sum(ref.values()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=f"gradient of {name}")
    # bf16 autocast (the trainer's GPU default) runs and keeps float32 gradients
    sae32 = randomized(arch, seed=5, dtype="float32").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sae32.training_loss(x.float(), dead_mask=dead)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad.dtype == torch.float32 for p in sae32.parameters())


@pytest.mark.parametrize("path", ["dense", "sparse", "gpu"])
@pytest.mark.parametrize("kw", [{}, {"decoder_norm_penalty": True}, {"apply_b_dec_to_input": False}],
                         ids=["unit_norm", "april", "no_b_dec_in"])
def test_relu_step_paths_match_dense_reference(path, kw, monkeypatch):
    # forced: "dense" never takes the sparse kernels, "sparse" always does, "gpu" may not sync to decide
    monkeypatch.setattr(kernels, "SPARSE_MAX_DENSITY", {"dense": -1.0, "sparse": 1.0, "gpu": 1.0}[path])
    if path == "gpu":
        for module in (kernels, codes):
            monkeypatch.setattr(module, "host_syncs_ok", lambda t: False)
    taken = []
    monkeypatch.setattr(kernels, "positive_code", lambda *a, f=kernels.positive_code: taken.append(1) or f(*a))
    sae = randomized("relu", seed=9, **kw)
    x = torch.randn(20, sae.cfg.d_in)
    out = sae.training_loss(x, sparsity_scale=0.7)
    assert bool(taken) == (path == "sparse")
    # the formulas written out (autograd through every dense matmul)
    sae_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    f = (sae_in @ sae.W_enc + sae.b_enc).relu()
    weights = sae.W_dec.norm(dim=-1) if sae.cfg.decoder_norm_penalty else torch.ones(D_SAE)
    x_hat = f @ sae.W_dec + sae.b_dec
    ref = {"mse": (x - x_hat).pow(2).sum(-1).mean(), "l1": sae.cfg.l1_coefficient * 0.7 * (f * weights).sum(-1).mean()}
    for name in ref:
        torch.testing.assert_close(out.parts[name], ref[name], msg=f"loss part {name}")
    torch.testing.assert_close(out.x_hat, x_hat)
    assert torch.equal(out.fired, (f > 0).any(0))
    torch.testing.assert_close(out.l0, (f > 0).sum(-1).double().mean().to(out.l0.dtype))
    got, want = grads_of(sae, out.loss), grads_of(sae, sum(ref.values()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=f"gradient of {name} ({path})")


def test_relu_takes_the_sparse_path_only_at_low_density(monkeypatch):
    taken = []
    monkeypatch.setattr(kernels, "positive_code", lambda *a, f=kernels.positive_code: taken.append(1) or f(*a))
    sae = randomized("relu", seed=2)
    x = torch.randn(64, sae.cfg.d_in)
    sae.training_loss(x)  # random biases: roughly half the pairs fire
    assert not taken
    with torch.no_grad():  # ~2 % of the pairs fire, as in a trained ReLU SAE
        sae.b_enc.copy_(-((x - sae.b_dec) @ sae.W_enc).quantile(0.98, dim=0))
    out = sae.training_loss(x)
    assert taken and out.l0 <= 0.05 * D_SAE


def test_decode_of_bf16_latents_under_autocast_matches_float32():
    sae = randomized("relu", seed=4, dtype="float32")
    f = torch.rand(6, D_SAE, dtype=torch.float32).to(torch.bfloat16)
    want = sae.decode(f)  # outside autocast: f is cast to W_dec's float32
    assert want.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sae.decode(f)
    assert got.dtype == torch.float32  # bf16 matmul + float32 b_dec
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n_keys", [50, 1 << 16, 1 << 20])  # uint16 radix path, its edge, int64 path
def test_cpu_sorts_match_torch_stable_sort(n_keys):
    keys = torch.randint(0, n_keys, (5000,), generator=torch.Generator().manual_seed(n_keys))
    keys[:50] = n_keys - 1
    assert torch.equal(codes._argsort_stable(keys, n_keys), keys.argsort(stable=True))
    assert torch.equal(codes._sorted(keys), keys.sort().values)


def test_batch_topk_shortcut_is_exact_and_falls_back(monkeypatch):
    """The sampled lower bound picks exactly the entries of the plain flat top-k, and gives up (None) when the
    bound would keep fewer than k·batch entries."""
    monkeypatch.setattr(codes, "_SAMPLE", 256)
    g_ = torch.Generator().manual_seed(11)
    pre = torch.randn(64, 300, generator=g_) * torch.rand(64, 1, generator=g_) * 3  # uneven row scales
    n_keep = 5 * 64
    want = set(pre.view(-1).topk(n_keep).indices.tolist())
    got = codes._flat_topk_candidates(pre.view(-1), n_keep)
    assert got is not None and set(got.tolist()) == want
    code = batch_topk_code(pre, 5)
    assert set((code.rows * 300 + code.cols).tolist()) == want and torch.all(code.rows.diff() >= 0)
    assert torch.equal(code.vals, pre[code.rows, code.cols])
    # adversarial: the sampled positions hold the largest values, so the bound keeps only the sample
    flat = torch.rand(64 * 300, generator=g_)
    step = flat.numel() // 256
    flat[::step] += 10
    assert codes._flat_topk_candidates(flat, n_keep) is None
    code = batch_topk_code(flat.view(64, 300), 5)  # the fallback still gives the exact answer
    assert set((code.rows * 300 + code.cols).tolist()) == set(flat.topk(n_keep).indices.tolist())


@pytest.mark.parametrize("dim", [0, 1])
def test_select_distinct_matches_indexing_with_gradients(dim):
    g_ = torch.Generator().manual_seed(12)
    W = torch.randn(5, 9, generator=g_, requires_grad=True)
    idx = torch.tensor([3, 0, 4])
    up = torch.randn(3, 9, generator=g_) if dim == 0 else torch.randn(5, 3, generator=g_)
    got = torch.autograd.grad((kernels.select_distinct(W, idx, dim) * up).sum(), W)[0]
    want = torch.autograd.grad((W.index_select(dim, idx) * up).sum(), W)[0]
    torch.testing.assert_close(kernels.select_distinct(W, idx, dim), W.index_select(dim, idx))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("density", [0.02, 0.5], ids=["sparse", "dense"])
def test_adaptive_kernels_match_dense_reference(density, monkeypatch):
    """adaptive_decode and dense_pre_acts' backward take the bag-sum path on sparse inputs (forced off by a
    zero density limit) and give the dense formulas' values and gradients either way."""
    g_ = torch.Generator().manual_seed(13)
    n, d_in, d_sae = 40, 7, 60
    x = torch.randn(n, d_in, generator=g_)
    W_enc = torch.randn(d_in, d_sae, generator=g_, requires_grad=True)
    b_enc = torch.randn(d_sae, generator=g_, requires_grad=True)
    b_dec = torch.randn(d_in, generator=g_, requires_grad=True)
    W_dec = torch.randn(d_sae, d_in, generator=g_, requires_grad=True)
    theta = torch.randn(n, d_sae, generator=g_).quantile(1 - density)  # gates open on ~density of entries
    up = torch.randn(n, d_in, generator=g_)
    params = [W_enc, b_enc, b_dec, W_dec]

    def loss(kernel: bool) -> torch.Tensor:
        sae_in = x - b_dec.detach()
        if kernel:
            pre = kernels.dense_pre_acts((sae_in @ W_enc + b_enc).detach(), sae_in, W_enc, b_enc, b_dec)
        else:
            pre = (x - b_dec) @ W_enc + b_enc
        f = pre * (pre > theta)
        return ((kernels.adaptive_decode(f, W_dec) if kernel else f @ W_dec) * up).sum()

    want = torch.autograd.grad(loss(False), params)
    for limit in (kernels.SPARSE_MAX_DENSITY, -1.0):  # the adaptive choice, then dense forced
        monkeypatch.setattr(kernels, "SPARSE_MAX_DENSITY", limit)
        got = torch.autograd.grad(loss(True), params)
        for name, a, b in zip(["W_enc", "b_enc", "b_dec", "W_dec"], got, want):
            torch.testing.assert_close(a, b, msg=f"{name} (limit {limit})")
    monkeypatch.setattr(kernels, "SPARSE_MAX_DENSITY", 0.05)
    f = torch.randn(n, d_sae, generator=g_) * (torch.rand(n, d_sae, generator=g_) < density)
    assert (kernels._sparse_support(f) is not None) == (density < 0.05)


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_sparse_gates_step_matches_dense_step(arch, monkeypatch):
    """JumpReLU and Gated training losses give the same values and gradients whether their decode and ∂W_enc
    run on the open gates (bag sums) or as dense GEMMs."""
    sae = randomized(arch, seed=8)
    x = torch.randn(30, sae.cfg.d_in, dtype=torch.float64)
    with torch.no_grad():  # open few gates, so the sparse path is what the density check picks
        if arch == "jumprelu":
            sae.log_threshold.add_(1.5)
        else:
            sae.b_enc.sub_(1.0)
    monkeypatch.setattr(jumprelu, "FUSED_MAX_DENSITY", -1.0)  # the composed graph (the fused step: test below)
    results = {}
    for limit in (1.0, -1.0):  # every input counts as sparse / as dense
        monkeypatch.setattr(kernels, "SPARSE_MAX_DENSITY", limit)
        out = sae.training_loss(x, dead_mask=torch.arange(sae.cfg.d_sae) % 5 == 0)
        results[limit] = (out.parts, grads_of(sae, out.loss))
    (parts_s, grads_s), (parts_d, grads_d) = results[1.0], results[-1.0]
    assert float(parts_s["mse"].detach()) > 0
    for name in parts_d:
        torch.testing.assert_close(parts_s[name], parts_d[name], msg=name)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], msg=name)


def _sparse_gates(arch: str, kw: dict):
    """A randomised JumpReLU or Gated SAE with few gates open and a band below them (JumpReLU: decoder rows off unit
    norm; Gated: magnitudes positive and negative around the gate; "gated_open": most gates open and the
    magnitudes selecting, as a trained tanh-recipe Gated SAE)."""
    if arch == "jumprelu":
        sae = randomized("jumprelu", seed=9, jumprelu_bandwidth=0.6, **kw)
        with torch.no_grad():
            sae.log_threshold.add_(1.6)
            sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1) + 0.5)
    else:
        sae = randomized("gated", seed=11, jumprelu_bandwidth=0.6, **kw)
        with torch.no_grad():
            if arch == "gated_open":  # τ = b_gate − b_mag·e^{−r} > 0 for about half the latents, < −ε/2 for the rest
                sae.b_enc.fill_(0.3)
                sae.b_mag.copy_(torch.where(torch.rand(sae.cfg.d_sae) < 0.5, -1.0, 0.9))
            else:
                sae.b_enc.sub_(2.0)
                sae.b_mag.normal_(0.0, 0.5)
    if kw.get("skip"):
        with torch.no_grad():
            sae.W_skip.normal_()
    return sae


@pytest.mark.parametrize("arch,step", [("jumprelu", jumprelu._TanhStep), ("gated", gated._GatedTanhStep),
                                       ("gated_open", gated._GatedTanhStep)],
                         ids=["jumprelu", "gated", "gated_open"])
@pytest.mark.parametrize("kw", [{}, {"apply_b_dec_to_input": True},
                                {"target": "mlp_out.0", "d_out": 11, "skip": True}],
                         ids=["plain", "b_dec_in", "skip_transcoder"])
@pytest.mark.parametrize("wide", [False, True], ids=["band_sparse", "band_gemm"])
def test_fused_tanh_step_matches_composed_graph(arch, step, kw, wide, monkeypatch):
    """The tanh-recipe step written as one Function (JumpReLU's `_TanhStep`, Gated's `_GatedTanhStep`: dot products
    on the entries at or above the gate, the estimator's band below it as bag sums or, when the band is wide, one
    GEMM, the pre-activation term on the thresholds only; Gated without the entries whose magnitude is ≤ 0) gives the
    same loss parts, L0, fired latents and gradients (every parameter, W_skip too) as the composed autograd graph it
    replaces."""
    sae = _sparse_gates(arch, kw)
    x = 2 * torch.randn(40, sae.cfg.d_in)
    target = torch.randn(40, sae.cfg.d_out) if kw.get("target") else None
    with torch.no_grad():  # shares of the entries the fused step needs at/above the gate and above the band's edge
        pre = sae._encoder_pass(x.to(sae.W_enc.dtype))[0]
        if arch == "jumprelu":
            at_or_above, upper = pre >= sae.threshold, pre > sae.threshold - sae.cfg.jumprelu_bandwidth / 2
        else:  # the magnitude path π_mag > 0 where π > τ = b_gate − b_mag·e^{−r}
            live = pre > sae.b_enc - sae.b_mag * (-sae.r_mag).exp()
            at_or_above, upper = (pre >= 0) & live, (pre > -sae.cfg.jumprelu_bandwidth / 2) & live
            assert ((pre >= 0) & ~live).any() == (arch == "gated_open")  # open gates left out: the partial sums
        at_or_above, upper = float(at_or_above.double().mean()), float(upper.double().mean())
    assert 0 < at_or_above < upper  # some entries lie in the band below the gate
    # between the two shares, the band is too wide for bag sums but the open gates are few: the GEMM branch
    monkeypatch.setattr(jumprelu, "BAND_BAG_MAX_DENSITY", (at_or_above + upper) / 2 if wide else 1.0)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(jumprelu, "FUSED_MAX_DENSITY", (at_or_above + upper) / 2 if fused else -1.0)
        calls = []
        monkeypatch.setattr(step, "apply", _counting(step.apply, calls))
        out = sae.training_loss(x, sparsity_scale=0.7, target=target)
        assert len(calls) == int(fused)  # the path under test really ran
        if fused:  # ... on the branch under test
            assert calls[0][10 if arch == "jumprelu" else 11] is wide
            if arch != "jumprelu":
                assert calls[0][12] is (arch == "gated_open")
        results[fused] = out, grads_of(sae, out.loss)
    (out_f, grads_f), (out_c, grads_c) = results[True], results[False]
    assert 0 < float(out_c.l0) < sae.cfg.d_sae / 2
    torch.testing.assert_close(out_f.l0, out_c.l0)
    assert torch.equal(out_f.fired, out_c.fired)
    torch.testing.assert_close(out_f.x_hat, out_c.x_hat)
    for name in out_c.parts:
        torch.testing.assert_close(out_f.parts[name], out_c.parts[name], msg=name)
    assert set(grads_f) == set(grads_c)
    for name in grads_c:
        assert grads_c[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grads_c[name], msg=name)


@pytest.mark.parametrize("arch,step,param,dense,sparse", [
    ("jumprelu", jumprelu._TanhStep, "log_threshold", -2.3, 2.0),  # θ = 0.1 / 7.4
    ("gated", gated._GatedTanhStep, "b_enc", -0.1, -4.0),  # the gate opens where W_encᵀx̃ > −b_gate
], ids=["jumprelu", "gated"])
def test_fused_step_only_when_few_pre_acts_reach_the_band(arch, step, param, dense, sparse, monkeypatch):
    """With ~half the gates open (a fresh SAE) the composed graph runs; with few, the fused step."""
    sae = randomized(arch, seed=10)
    x = torch.randn(32, sae.cfg.d_in)
    calls = []
    monkeypatch.setattr(step, "apply", _counting(step.apply, calls))
    for value, want in ((dense, 0), (sparse, 1)):
        with torch.no_grad():
            getattr(sae, param).fill_(value)
        sae.training_loss(x)
        assert len(calls) == want
        calls.clear()


def test_fused_entries_picks_the_band_branch_by_density():
    """Bag sums while the band is narrow, the band's GEMM once it is wide, the composed graph once many gates open."""
    pre = torch.linspace(-1, 1, 1000).repeat(4, 1)  # the share above t is (1 − t) / 2
    for theta, eps, want in ((0.9, 0.1, (False, 0.075)),  # 7.5 % above θ − ε/2: bag sums
                             (0.9, 0.6, (False, 0.2)),  # 20 % above θ − ε/2, 5 % at or above θ: still bag sums
                             (0.9, 1.0, (True, 0.05)),  # 30 % above θ − ε/2: the GEMM, on the 5 % at or above θ
                             (0.5, 1.0, None)):  # 25 % at or above θ: the composed graph
        got = jumprelu.fused_entries(pre, theta, eps)
        if want is None:
            assert got is None
        else:
            assert got[1] is want[0] and got[0].numel() == pytest.approx(want[1] * pre.numel(), abs=8)


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)
    return wrapped


def test_flat_nonzero_matches_torch_nonzero():
    """numpy's flatnonzero on eager CPU (contiguous masks) and torch's nonzero elsewhere give the same indices."""
    mask = torch.rand(37, 53, generator=torch.Generator().manual_seed(5)) < 0.1
    want = mask.reshape(-1).nonzero().squeeze(1)
    got = kernels.flat_nonzero(mask)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(kernels.flat_nonzero(mask.t()), mask.t().reshape(-1).nonzero().squeeze(1))  # strided
    assert kernels.flat_nonzero(torch.zeros(4, 5, dtype=torch.bool)).numel() == 0
