"""Sparse autograd kernels for k-sparse codes: decode and encoder backward touch only the active (token, latent) pairs.

A k-sparse code of a [batch, d_sae] activation matrix is held as COO triples sorted by row (`SparseActs`). With
nnz = batch·k entries:
- decode   x̂ = F W_dec            costs nnz·d_in  (dense: batch·d_sae·d_in),
- backward ∂W_dec = Fᵀ g          costs nnz·d_in and writes only the touched rows' sums,
- encoder backward ∂W_enc = xᵀ G, ∂x = G W_encᵀ cost nnz·d_in (dense: batch·d_sae·d_in each); ∂b_enc is a
  per-latent sum and ∂b_dec (through x − b_dec) the matvec −W_enc ∂b_enc.
The encoder forward stays dense (every pre-activation is needed to pick the top k). All sums run through
`F.embedding_bag(mode="sum", per_sample_weights=...)`, a fused gather-scale-sum on CPU and CUDA that never
materialises the [nnz, d_in] gather (one reduction per bag, no atomic adds). The codes themselves (which entries,
their column-sorted view) live in `codes`, re-exported here.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from sae_toolkit.sae.codes import (  # noqa: F401  (the public names re-exported: callers use kernels.<name>)
    SparseActs,
    Transposed,
    _eager_cpu,
    _offsets,
    _transpose_bags,
    argsort_keys,
    batch_topk_code,
    count_true,
    flat_nonzero,
    host_syncs_ok,
    max_true_per_row,
    positive_code,
    row_offsets,
    topk_code,
    transposed,
)

SPARSE_MAX_DENSITY = 0.05
"""The ReLU step and the adaptive kernels (`adaptive_decode`, `dense_pre_acts`' backward) switch to sparse bag
sums when at most this share of the [batch, d_sae] entries is non-zero: a fresh SAE fires on ~half of them (a GEMM
wins), a trained one on ~1-2 %."""


LOW_PRECISION_SUMS = os.environ.get("SAE_TOOLKIT_FP32_SUMS") != "1"
"""On eager CPU with native bf16 dot products (avx512_bf16 / amx_bf16), run two float32 sums in bf16 with float32
accumulation: AuxK's dead-block GEMMs (`sparse_*_with_block`; one thread at [1024, 460] × [460, 576]: 2.8-3.0 ms
against 6.0-6.2, four per step) and the JumpReLU threshold estimator's band sums (450k rows of g: 10.4 ms against
16.0; a wide band's GEMM 28 against 57). Inputs are rounded to bf16 (relative error ≤ 2⁻⁹ each), sums are float32.
On the benchmark's steps (d_in 576, 4608 latents, batch 1024) that moves the AuxK loss by 2·10⁻⁵ relative, the dead
latents' gradients by 6·10⁻⁴ (norm), b_dec's by 8·10⁻⁵ and the live latents' not at all; JumpReLU's θ gradient by
1.3·10⁻³ (1.7·10⁻³ with a wide band) and nothing else. float64, other devices and autocast are untouched. The
price: rounding a value that a reduction produced does not commute with splitting the batch, so DDP and one process
no longer agree to float32 noise on the dead latents (max |ΔW| 7·10⁻³ after 10 Adam steps in
tests/training/test_distributed.py, 6·10⁻⁸ in float32). False, or SAE_TOOLKIT_FP32_SUMS=1 in the environment:
float32 throughout."""


@functools.cache
def _cpu_bf16_native() -> bool:
    """Whether this CPU has native bf16 dot-product instructions (Linux /proc/cpuinfo flags); without them oneDNN
    emulates bf16 and is slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_ok(t: Tensor) -> bool:
    """Whether float32 tensor t's low-precision sums (`LOW_PRECISION_SUMS`) may run in bf16: eager CPU with native
    bf16, not under autocast (which picks dtypes itself)."""
    return (LOW_PRECISION_SUMS and t.dtype == torch.float32 and _eager_cpu(t)
            and not torch.is_autocast_enabled("cpu") and _cpu_bf16_native())


def _block_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for AuxK's dead block, in bf16 with float32 accumulation where `bf16_ok` (float32 result)."""
    if bf16_ok(a) and b.dtype == torch.float32:
        return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()
    return a @ b


def _sparse_support(t: Tensor) -> SparseActs | None:
    """The non-zero entries of a [batch, d_sae] matrix as a SparseActs, when it is sparse enough for the bag
    kernels to beat a GEMM; None otherwise, and always None off eager CPU (it reads a count on the host)."""
    if not _eager_cpu(t):
        return None
    mask = t != 0
    if count_true(mask) > SPARSE_MAX_DENSITY * t.numel():
        return None
    return positive_code(t, mask)


def _bag_sum(table: Tensor, idx: Tensor, offsets: Tensor, weights: Tensor | None) -> Tensor:
    """out[b] = Σ_{n in bag b} weights[n] · table[idx[n]]  → [n_bags, table.shape[1]] (weights None: all 1)."""
    return F.embedding_bag(idx, table, offsets, mode="sum",
                           per_sample_weights=None if weights is None else weights.to(table.dtype))


def in_layout(grad_t: Tensor, W: Tensor) -> Tensor:
    """W's gradient from its transpose grad_t [W.shape[1], W.shape[0]] (contiguous), in W's memory layout, which
    autograd accumulates as is (it would copy a gradient of another layout itself: 3.8 ms at 576 × 4608 on CPU
    against 2.3-3.0 for the transposed copy here). A free view when W.t() is contiguous, as for an SAE's W_enc,
    which is stored latent-major (`SAE.__init__`); the copy is for a W_enc a caller made contiguous."""
    if W.t().is_contiguous():
        return grad_t.t()
    return torch.empty_like(W, memory_format=torch.preserve_format).copy_(grad_t.t())


def encoder_grad(sae_in: Tensor, g: Tensor, W_enc: Tensor) -> Tensor:
    """Dense ∂W_enc = sae_inᵀ G [d_in, d_sae] in W_enc's memory layout (one GEMM either way), in g's dtype."""
    if W_enc.t().is_contiguous():
        return (g.t() @ sae_in.to(g.dtype)).t()
    return sae_in.to(g.dtype).t() @ g


def _fused_gather_dot(t: Tensor) -> bool:
    """Whether `_gather_dot` runs the fused embedding-bag kernel (True everywhere) or the chunked row gathers + bmm.

    The fused kernel is the per-sample-weights gradient of `F.embedding_bag` (the op autograd itself calls): one
    dot product per entry, reading g's row and W's row, no [nnz, d_in] intermediate. On this project's CPU
    (d_in 576, d_sae 4608, batch 1024, k 32) it takes 1.6 ms against 30 ms for the full g Wᵀ GEMM the CPU path
    used before and 35 ms for the chunked gathers. The chunked path stays as the fallback for dtypes the fused
    kernel does not take; tests monkeypatch this to run it.
    """
    return t.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _chunk_elements(device: torch.device) -> int:
    # CPU: gather blocks that stay in cache; GPU: big blocks (each chunk costs kernel launches) but bounded
    # memory: 2^24 fp32 elements = 64 MiB of gathered rows at a time.
    return 1 << 16 if device.type == "cpu" else 1 << 24


def _gather_dot(g: Tensor, W: Tensor, rows: Tensor, cols: Tensor, k: int | None) -> Tensor:
    """out[n] = g[rows[n]] · W[cols[n]] → [nnz], without a [nnz, d_in] intermediate.

    Static shapes and no host syncs on every branch (chunk bounds are Python ints), so it traces under
    torch.compile(fullgraph=True).
    """
    n, d = g.shape[0], g.shape[1]
    dtype = torch.promote_types(g.dtype, W.dtype)
    if _fused_gather_dot(g):
        offsets = torch.arange(n, device=g.device) * k if k is not None else _offsets(rows, n)
        # mode 0 = sum; padding_idx −1 = none
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g.to(dtype), W.to(dtype), cols, offsets, rows, 0, -1)
    out = torch.empty(cols.shape[0], device=g.device, dtype=dtype)
    if k is not None:  # k entries per row: gather W rows only, batch the dot products per token
        step = max(1, _chunk_elements(g.device) // (k * d))
        for s in range(0, n, step):
            e = min(n, s + step)
            Wg = W[cols[s * k : e * k]].view(e - s, k, d)  # [chunk, k, d_in] in W's dtype (bf16 stays bf16)
            out[s * k : e * k] = torch.bmm(Wg.to(dtype), g[s:e, :, None].to(dtype)).view(-1)
        return out
    return _gather_dot_chunked(g, W, rows, cols, out)


def _gather_dot_chunked(g: Tensor, W: Tensor, rows: Tensor, cols: Tensor, out: Tensor) -> Tensor:
    """out[n] = g[rows[n]] · W[cols[n]] by blocks of gathered rows, entries in any order."""
    step = max(1, _chunk_elements(g.device) // g.shape[1])
    for s in range(0, cols.shape[0], step):
        out[s : s + step] = (g[rows[s : s + step]].to(out.dtype) * W[cols[s : s + step]]).sum(-1)
    return out


def gather_dot_by_column(g: Tensor, W: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """[nnz] dot products g[rows[n]] · W[cols[n]] for entries sorted by column (`transposed` order), where W's row
    stays in cache across a latent's entries: 7.6 ms against 13.4 ms in row order for 99k entries of a [1024, 576]
    g and a [4608, 576] W on one CPU thread. Eager CPU: the fused kernel, which finds each entry's row through its
    offset2bag argument (= rows), so the entries need not be grouped by row; elsewhere the chunked gathers."""
    dtype = torch.promote_types(g.dtype, W.dtype)
    if _eager_cpu(g) and _fused_gather_dot(g):
        # mode 0 = sum; padding_idx −1 = none; with offset2bag given the kernel reads no bag offsets
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g.to(dtype), W.to(dtype), cols, rows.new_zeros(1), rows, 0, -1)
    return _gather_dot_chunked(g, W, rows, cols, torch.empty(cols.shape[0], device=g.device, dtype=dtype))


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """[n] row-wise dot products a[i] · b[i] of two [n, d] matrices of one dtype, without autograd. Eager CPU: the
    fused gather-dot kernel with the identity as both index lists (0.8 ms at [4608, 576] on one thread against 1.3
    for `torch.linalg.vecdot` and 1.6 for a product and a sum); elsewhere vecdot."""
    if _eager_cpu(a) and a.dtype == b.dtype and _fused_gather_dot(a) and a.ndim == 2 and not a.requires_grad \
            and not b.requires_grad:
        idx = torch.arange(a.shape[0], device=a.device)
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            a.contiguous(), b.contiguous(), idx, idx.new_zeros(1), idx, 0, -1)
    return torch.linalg.vecdot(a, b)


class _SparseDecode(Function):
    """F W_dec for a sparse F; with `dead` [n_dead] and a dense block f_aux [n_rows, n_dead] on those latents (AuxK's
    compact path) also f_aux W_dec[dead], whose ∂W_dec rows are added into the same gradient (no full-size zero
    gradient of an indexing op for autograd to add to the main one)."""

    @staticmethod
    def forward(ctx, vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, order: Tensor | None,
                rows_t: Tensor | None, offsets_t: Tensor | None, n_rows: int, k: int | None,
                dead: Tensor | None = None, f_aux: Tensor | None = None):
        ctx.save_for_backward(vals, rows, cols, W_dec, order, rows_t, offsets_t, dead, f_aux)
        ctx.k = k
        offsets = torch.arange(n_rows, device=rows.device) * k if k is not None else _offsets(rows, n_rows)
        out = _bag_sum(W_dec, cols, offsets, vals)  # [n_rows, d_in]
        if dead is None:
            return out
        return out, _block_mm(f_aux.to(W_dec.dtype), W_dec.index_select(0, dead))

    @staticmethod
    def backward(ctx, g: Tensor, g_aux: Tensor | None = None):
        vals, rows, cols, W_dec, order, rows_t, offsets_t, dead, f_aux = ctx.saved_tensors
        g = g.contiguous()
        grad_vals = grad_W = grad_aux = None
        if order is None and (ctx.needs_input_grad[3] or _eager_cpu(g)):
            order, rows_t, offsets_t = _transpose_bags(rows, cols, W_dec.shape[0])
        if ctx.needs_input_grad[0]:  # g[row] · W_dec[col]
            if _eager_cpu(g):  # in column order (W_dec's row stays in cache), then back to the code's order
                dots = gather_dot_by_column(g, W_dec, rows_t, cols.index_select(0, order))
                grad_vals = torch.empty_like(dots).index_copy_(0, order, dots).to(vals.dtype)
            else:
                grad_vals = _gather_dot(g, W_dec, rows, cols, ctx.k).to(vals.dtype)
        if dead is not None and ctx.needs_input_grad[10]:
            grad_aux = _block_mm(g_aux.to(W_dec.dtype), W_dec.index_select(0, dead).t()).to(f_aux.dtype)
        if ctx.needs_input_grad[3]:
            grad_W = _bag_sum(g.to(W_dec.dtype), rows_t, offsets_t, vals[order])  # Fᵀ g, [d_sae, d_in]
            if dead is not None:
                grad_W.index_add_(0, dead, _block_mm(f_aux.to(W_dec.dtype).t(), g_aux.to(W_dec.dtype)))
        return grad_vals, None, None, grad_W, None, None, None, None, None, None, grad_aux


class _SparsePreActs(Function):
    """Attaches the sparse encoder backward to pre-activation values at a code's entries; with `dead` [n_dead] and
    their dense pre-activations aux_pre [n_rows, n_dead] (AuxK's compact path) also to that block, whose ∂W_enc
    columns and ∂b_enc entries are added into the same gradients."""

    @staticmethod
    def forward(ctx, pre_vals, sae_in, W_enc, b_enc, b_dec, rows, cols, order, rows_t, offsets_t, k,
                dead=None, aux_pre=None):
        ctx.save_for_backward(sae_in, W_enc, rows, cols, order, rows_t, offsets_t, dead)
        ctx.k = k
        return pre_vals.clone() if dead is None else (pre_vals.clone(), aux_pre.clone())

    @staticmethod
    def backward(ctx, g: Tensor, g_aux: Tensor | None = None):
        sae_in, W_enc, rows, cols, order, rows_t, offsets_t, dead = ctx.saved_tensors
        n_rows, d_sae = sae_in.shape[0], W_enc.shape[1]
        g = g.to(W_enc.dtype)
        g_aux = g_aux.to(W_enc.dtype) if dead is not None else None
        grad_in = grad_W = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            # G W_encᵀ: each token sums its active latents' encoder columns
            W_t = W_enc.t().contiguous()  # [d_sae, d_in] (free when latent-major); cheaper than gathering nnz columns
            offsets = torch.arange(n_rows, device=g.device) * ctx.k if ctx.k is not None else _offsets(rows, n_rows)
            grad_in = _bag_sum(W_t, cols, offsets, g)
            if dead is not None:
                grad_in = grad_in + _block_mm(g_aux, W_t.index_select(0, dead))
            grad_in = grad_in.to(sae_in.dtype)
        if any(ctx.needs_input_grad[2:5]):
            if order is None:
                order, rows_t, offsets_t = _transpose_bags(rows, cols, d_sae)
            g_t = g[order]
        if ctx.needs_input_grad[2]:
            grad_W = _bag_sum(sae_in.to(W_enc.dtype), rows_t, offsets_t, g_t)  # Gᵀ x, [d_sae, d_in]
            if dead is not None:
                grad_W.index_add_(0, dead, _block_mm(g_aux.t(), sae_in.to(W_enc.dtype)))
            grad_W = in_layout(grad_W, W_enc)  # [d_in, d_sae]
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # per-latent sums of g as bags over a ones column: deterministic on CUDA, unlike index_add_'s atomics
            ones = torch.ones(n_rows, 1, device=g.device, dtype=W_enc.dtype)
            grad_b = _bag_sum(ones, rows_t, offsets_t, g_t).view(d_sae)
            if dead is not None:
                grad_b.index_add_(0, dead, g_aux.sum(0))
        if ctx.needs_input_grad[4]:
            # sae_in = x − b_dec, so ∂b_dec = −Σ_tokens G W_encᵀ = −W_enc (Σ_tokens G) = −W_enc ∂b_enc: one matvec
            grad_b_dec = -(grad_b @ W_enc.t())  # [d_in]; a row-major matvec when W_enc is latent-major
        grad_b = grad_b if ctx.needs_input_grad[3] else None
        return None, grad_in, grad_W, grad_b, grad_b_dec, None, None, None, None, None, None, None, None


class _DensePreActs(Function):
    @staticmethod
    def forward(ctx, pre, sae_in, W_enc, b_enc, b_dec, adaptive):
        ctx.save_for_backward(sae_in, W_enc)
        ctx.adaptive = adaptive
        return pre.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        sae_in, W_enc = ctx.saved_tensors
        grad_in = grad_W = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            grad_in = (g @ W_enc.t().to(g.dtype)).to(sae_in.dtype)
        if ctx.needs_input_grad[2]:
            code = _sparse_support(g) if ctx.adaptive else None  # JumpReLU/Gated: G lives on the open gates
            if code is not None:
                t = transposed(code, g.shape[1])
                grad_W = in_layout(_bag_sum(sae_in.to(W_enc.dtype), t.rows, t.offsets, code.vals[t.order]), W_enc)
            else:
                grad_W = encoder_grad(sae_in, g, W_enc).to(W_enc.dtype)  # [d_in, d_sae], GEMM in g's (autocast) dtype
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_b = g.sum(0, dtype=W_enc.dtype)
        if ctx.needs_input_grad[4]:
            grad_b_dec = -(grad_b @ W_enc.t())  # sae_in = x − b_dec: one matvec instead of G W_encᵀ summed
        return None, grad_in, grad_W, grad_b if ctx.needs_input_grad[3] else None, grad_b_dec, None


class _SelectDistinct(Function):
    @staticmethod
    def forward(ctx, W: Tensor, idx: Tensor, dim: int) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.shape, ctx.stride, ctx.dim = W.shape, W.stride(), dim
        return W.index_select(dim, idx)

    @staticmethod
    def backward(ctx, g: Tensor):
        (idx,) = ctx.saved_tensors
        # in W's memory layout (latent-major W_enc), which autograd then accumulates without a transposed copy
        return g.new_empty_strided(ctx.shape, ctx.stride).zero_().index_copy_(ctx.dim, idx, g), None, None


def select_distinct(W: Tensor, idx: Tensor, dim: int) -> Tensor:
    """W.index_select(dim, idx) for distinct indices idx, with a backward that copies instead of accumulating:
    autograd's index_select backward is a scatter-add — 47 ms against 0.3 ms along dim 1 of a [576, 4608] W for 460
    columns on CPU, and along dim 0 it stalls under load (76 ms for 460 rows of W_dec on the busy 2-core machine)."""
    return _SelectDistinct.apply(W, idx, dim)


def dense_pre_acts(pre: Tensor, sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None = None,
                   adaptive: bool = True) -> Tensor:
    """[batch, d_sae] pre-activations `pre` = sae_in W_enc + b_enc (computed without grad) with their gradients.

    The dense counterpart of `sparse_pre_acts`: with b_dec given (sae_in = x − b_dec, neither with grad), ∂b_dec
    is the matvec −W_enc Σ_tokens G instead of autograd's [batch, d_sae] × [d_sae, d_in] GEMM. adaptive: on eager
    CPU, form ∂W_enc = sae_inᵀ G from G's non-zero entries when at most SPARSE_MAX_DENSITY of them are non-zero
    (False when the caller knows G is dense: saves the count).
    """
    return _DensePreActs.apply(pre, sae_in, W_enc, b_enc, b_dec, adaptive)


class _AdaptiveDecode(Function):
    @staticmethod
    def forward(ctx, f: Tensor, W_dec: Tensor) -> Tensor:
        f = f.to(W_dec.dtype)
        code = _sparse_support(f)
        ctx.save_for_backward(f, W_dec)
        ctx.code = code
        if code is None:
            return f @ W_dec
        return _bag_sum(W_dec, code.cols, _offsets(code.rows, code.n_rows), code.vals)

    @staticmethod
    def backward(ctx, g: Tensor):
        f, W_dec = ctx.saved_tensors
        code, g = ctx.code, g.contiguous()
        grad_f = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_f = g @ W_dec.t()  # dense: JumpReLU's threshold estimator needs it just below the open gates too
        if ctx.needs_input_grad[1]:
            if code is None:
                grad_W = f.t() @ g
            else:
                t = transposed(code, W_dec.shape[0])
                grad_W = _bag_sum(g, t.rows, t.offsets, code.vals[t.order])  # Fᵀ g on the non-zero rows
        return grad_f, grad_W


def adaptive_decode(f: Tensor, W_dec: Tensor) -> Tensor:
    """[batch, d_sae] dense latents f → f W_dec [batch, d_in] (no bias), with a dense gradient to f.

    On eager CPU, when at most SPARSE_MAX_DENSITY of f is non-zero (a trained JumpReLU or Gated SAE), the forward
    and ∂W_dec run as bag sums over the non-zero entries instead of two GEMMs; elsewhere (GPU, compile, autocast,
    dense f) it is the plain matmul."""
    if not _eager_cpu(f) or torch.is_autocast_enabled(f.device.type) or f.ndim != 2:
        return f @ W_dec
    return _AdaptiveDecode.apply(f, W_dec)


def gather_dot(g: Tensor, W: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """[nnz] dot products g[rows[n]] · W[cols[n]] for row-sorted entries (no [nnz, d] intermediate)."""
    return _gather_dot(g, W, rows, cols, None)


def bag_sum(table: Tensor, idx: Tensor, offsets: Tensor, weights: Tensor | None) -> Tensor:
    """[n_bags, table.shape[1]]: out[b] = Σ_{n in bag b} weights[n]·table[idx[n]], bag b starting at offsets[b]
    (weights None: plain sums of the rows)."""
    return _bag_sum(table, idx, offsets, weights)


def sparse_decode(acts: SparseActs, W_dec: Tensor, t: Transposed | None = None) -> Tensor:
    """[n_rows, d_in] = F W_dec for the sparse F in `acts` (no bias); gradients to acts.vals and W_dec are sparse.

    t: `transposed(acts, d_sae)` when the caller has it (saves a sort in the backward)."""
    t = t or (None, None, None)
    return _SparseDecode.apply(acts.vals, acts.rows, acts.cols, W_dec, *t, acts.n_rows, acts.k)


def sparse_decode_with_block(acts: SparseActs, W_dec: Tensor, t: Transposed | None, dead: Tensor,
                             f_aux: Tensor) -> tuple[Tensor, Tensor]:
    """(`sparse_decode(acts, W_dec, t)`, f_aux W_dec[dead]) for distinct latents dead [n_dead] and a dense block
    f_aux [n_rows, n_dead]: one Function, so both ∂W_dec contributions land in one gradient (AuxK, eager CPU)."""
    t = t or (None, None, None)
    return _SparseDecode.apply(acts.vals, acts.rows, acts.cols, W_dec, *t, acts.n_rows, acts.k, dead, f_aux)


def sparse_pre_acts(
    code: SparseActs, sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None = None,
    t: Transposed | None = None,
) -> Tensor:
    """[nnz] pre-activations (sae_in W_enc + b_enc)[rows, cols], gradients only at those entries.

    code.vals must already hold those values (computed densely without grad to choose the entries); this attaches
    the sparse backward. sae_in: [n_rows, d_in] encoder input, W_enc: [d_in, d_sae], b_enc: [d_sae]. Pass the
    b_dec [d_in] that was subtracted to form sae_in (sae_in = x − b_dec, x and sae_in without grad) to get its
    gradient as one matvec instead of a per-token [n_rows, d_in] backward. t: `transposed(code, d_sae)`, shared
    with `sparse_decode` of the same entries.
    """
    t = t or (None, None, None)
    return _SparsePreActs.apply(code.vals.detach(), sae_in, W_enc, b_enc, b_dec, code.rows, code.cols, *t, code.k)


def sparse_pre_acts_with_block(
    code: SparseActs, sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, t: Transposed | None,
    dead: Tensor, aux_pre: Tensor,
) -> tuple[Tensor, Tensor]:
    """(`sparse_pre_acts(...)`, the dense block aux_pre [n_rows, n_dead] = pre-activations of the distinct latents
    dead [n_dead], computed without grad) with gradients for both from one Function: the block's ∂W_enc columns
    and ∂b_enc entries are added into the sparse ones instead of autograd adding two full-size gradients."""
    t = t or (None, None, None)
    return _SparsePreActs.apply(code.vals.detach(), sae_in, W_enc, b_enc, b_dec, code.rows, code.cols, *t, code.k,
                                dead, aux_pre)
