"""What an SAE learned, computed from an activation file: one streaming pass for metrics and top activations,
weight-only per-feature statistics, the logit lens, and CE/KL with the SAE spliced into the model.

The pass reads whole context windows (sequence-aligned chunks), so memory stays bounded by the chunk size
whatever the file size, and each window's tokens are at hand for context and for excluding special positions.

    >>> res = scan(sae, "acts.h5")  # doctest: +SKIP
    >>> res.metrics.compute()["explained_variance"], res.top.examples(3, res.reader.tokens_of)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sae_toolkit.activations.outliers import DEFAULT_MULTIPLE
from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.analysis.metrics import ModelMetrics, ReconstructionMetrics
from sae_toolkit.analysis.sinks import MassiveTokens, median_token_norm, sink_shares
from sae_toolkit.analysis.top_activations import TopActivations
from sae_toolkit.errors import SAEToolkitError

# Latents x tokens of one chunk's dense latent matrix (float32): ~128 MiB, the bound on the pass's memory.
_CHUNK_ELEMENTS = 32 * 2**20


class Scan(NamedTuple):
    """Result of one pass of an SAE over an activation file."""

    metrics: ReconstructionMetrics
    """Reconstruction and sparsity sums over the evaluated (non-BOS) tokens."""
    top: TopActivations | None
    """Top and interval examples per latent (None when top_k=0)."""
    reader: ActsReader
    """The (closed) file reader: hookpoint, seq_range, tokenizer, `tokens_of` for the examples."""
    massive: MassiveTokens | None = None
    """The massive-activation tokens among the evaluated ones (analysis/sinks.py); None when not detected."""


@torch.no_grad()
def scan(sae, acts: str | Path | ActsReader, *, hookpoint: str | None = None,
         seq_range: tuple[int, int] | None = None, tokens: int | None = None, top_k: int = 20,
         batch_tokens: int = 4096, device: str = "cpu", tokenizer: object | None = "auto",
         exclude_special: bool = True, left: int = 12, right: int = 4, seed: int = 0,
         massive_multiple: float | None = DEFAULT_MULTIPLE) -> Scan:
    """Run `sae` over the file's windows once, accumulating metrics and (top_k > 0) top activations.

    Metrics and top activations skip the same tokens (`ActsReader.keep_mask`): BOS, the tokenizer's other special
    tokens unless exclude_special=False, and massive-activation positions. Memory: one chunk of ≤ batch_tokens
    tokens (fewer when d_sae is large) at a time. massive_multiple: tokens whose activation norm exceeds this
    multiple of the median are recorded as massive (analysis/sinks.py; they stay in the metrics), None or 0: off.
    """
    from tqdm.auto import tqdm

    reader = acts if isinstance(acts, ActsReader) else ActsReader(
        acts, hookpoint or sae.cfg.hookpoint or None, d_in=sae.cfg.d_in, seq_range=seq_range, tokens=tokens,
        tokenizer=tokenizer, exclude_special=exclude_special)
    if reader.d != sae.cfg.d_in:
        reader.close()
        raise SAEToolkitError(f"acts/{reader.hookpoint} has width {reader.d} but the SAE has d_in={sae.cfg.d_in}; "
                              "pass the activation file of the hookpoint the SAE was trained on")
    d_sae = sae.cfg.d_sae
    seqs_per_chunk = max(1, min(batch_tokens // reader.ctx, _CHUNK_ELEMENTS // (reader.ctx * d_sae)))
    sae = sae.to(device).eval()
    # A transcoder is scored on its target (read row-aligned from the same file); latents come from the input.
    targets = target_chunks(sae, reader, seqs_per_chunk)
    metrics = ReconstructionMetrics(sae.cfg.d_out, d_sae)
    top = TopActivations(d_sae, k=top_k, left=left, right=right, seed=seed, device=device) if top_k else None
    n_tok = (reader.seq_range[1] - reader.seq_range[0]) * reader.ctx
    owned = reader if not isinstance(acts, ActsReader) else contextlib.nullcontext()
    massive = None
    if massive_multiple:
        try:
            massive = MassiveTokens(massive_multiple, median_token_norm(reader), reader.ctx, sae.cfg.d_out)
        except BaseException:
            if owned is reader:
                reader.close()
            raise
    with owned, tqdm(total=n_tok, unit="tok", unit_scale=True, desc=f"analyze {reader.hookpoint}") as bar:
        for (seq_ids, toks, x), y in zip(reader.chunks(seqs_per_chunk), targets):
            _require_finite(x, reader, int(seq_ids[0]))
            x = x.to(device)
            out = sae(x)
            ref = x if y is None else y.to(device)  # [s*seq, d_out] what x̂ should be
            # one exclusion set for every number and example: special tokens and massive-activation positions
            valid = reader.keep_mask(toks).to(device)  # [s, seq]
            keep = valid.reshape(-1)  # [s*seq]
            metrics.update(ref[keep], out.x_hat[keep].float(), out.feature_acts[keep].float())
            if massive is not None:
                massive.update(seq_ids, x, ref, out.x_hat, keep)
            if top is not None:
                top.update(seq_ids, out.feature_acts.view(len(seq_ids), reader.ctx, d_sae), valid)
            bar.update(x.shape[0])
        if top is not None:
            top.to_cpu()
            if massive is not None:
                massive.shares = sink_shares(top.top.seq, top.top.pos, reader.ctx, massive.all_rows)
            reader.preload(top.top.seq[top.top.seq >= 0].tolist() + top.sample.seq[top.sample.seq >= 0].tolist())
    return Scan(metrics, top, reader, massive)


def _require_finite(x: torch.Tensor, reader: ActsReader, first_seq: int) -> None:
    """x [rows, d_in] of windows first_seq...: a NaN/Inf is an error, as in training (ActivationStore), raised
    during the pass and so before any report file is written."""
    finite = torch.isfinite(x).all(dim=1)
    if not finite.all():
        row = first_seq * reader.ctx + int((~finite).nonzero()[0])
        seq, pos = divmod(row, reader.ctx)
        raise SAEToolkitError(f"acts/{reader.hookpoint} in {reader.path} has a non-finite value in row {row} "
                              f"(sequence {seq}, position {pos}); re-cache the file (float16 overflow? use "
                              "--dtype bfloat16 or float32)")


def target_chunks(sae, reader: ActsReader, seqs_per_chunk: int):
    """For a transcoder: its target's activations [s*seq, d_out] for the same windows as
    `reader.chunks(seqs_per_chunk)`, read from the same file; for an SAE: None forever."""
    if not sae.cfg.target:
        yield from iter(lambda: None, 0)  # endless Nones, zipped with the input chunks
        return
    with ActsReader(reader.path, sae.cfg.target, seq_range=reader.seq_range, tokenizer=None) as target:
        if target.d != sae.cfg.d_out:
            raise SAEToolkitError(f"acts/{sae.cfg.target} has width {target.d} but the transcoder has d_out="
                                  f"{sae.cfg.d_out}; pass the activation file it was trained on")
        for _, _, y in target.chunks(seqs_per_chunk):
            yield y


def evaluate(sae, acts: str | Path, **kwargs) -> dict[str, float | int]:
    """Reconstruction and sparsity metrics of DESIGN §6 over the file (kwargs as for `scan`, without top_k)."""
    return scan(sae, acts, top_k=0, **kwargs).metrics.compute()


def top_activations(sae, acts: str | Path, *, top_k: int = 20, latents: list[int] | None = None,
                    **kwargs) -> list[dict]:
    """Top and interval examples per latent: [{feature, density, max_activation, examples, interval_examples}]."""
    res = scan(sae, acts, top_k=top_k, **kwargs)
    return [latent_record(res, i) for i in (range(sae.cfg.d_sae) if latents is None else latents)]


def latent_record(res: Scan, latent: int) -> dict:
    """One latent's line of top_activations.jsonl."""
    ex = res.top.examples(latent, res.reader.tokens_of)
    rec = {"feature": latent, "density": float(res.metrics.density[latent]),
           "max_activation": float(res.metrics.act_max[latent]), "examples": ex["top"],
           "interval_examples": ex["intervals"]}
    if res.massive is not None and res.massive.shares is not None:
        # same token set as every number above: a flag for the dashboard, nothing is taken out of the record
        rec["massive_share"] = float(res.massive.shares[latent])
        rec["sink"] = bool(res.massive.sinks[latent])
    return rec


class WeightStats(NamedTuple):
    """Per-latent statistics of the weights alone."""

    enc_dec_cos: torch.Tensor
    """[d_sae] cosine between encoder column W_enc[:, i] and decoder row W_dec[i] (NaN for transcoders)."""
    dec_norm: torch.Tensor
    """[d_sae] ‖W_dec[i]‖."""
    nearest: torch.Tensor
    """[d_sae] int64 index of the most similar other decoder direction."""
    nearest_cos: torch.Tensor
    """[d_sae] its cosine similarity."""


@torch.no_grad()
def weight_stats(sae, chunk: int = 1024) -> WeightStats:
    """Encoder/decoder agreement and nearest decoder neighbour of every latent (chunked: O(chunk · d_sae) memory)."""
    W_dec = sae.W_dec.detach().float()  # [d_sae, d_out]
    W_enc = sae.W_enc.detach().float()  # [d_in, d_sae]
    dec_n = torch.nn.functional.normalize(W_dec, dim=-1)
    enc_n = torch.nn.functional.normalize(W_enc.T, dim=-1)
    # a transcoder's encoder and decoder live in different spaces (mlp_in, mlp_out): their cosine means nothing
    transcoder = bool(getattr(getattr(sae, "cfg", None), "target", ""))
    enc_dec = torch.full((W_dec.shape[0],), float("nan")) if transcoder else (dec_n * enc_n).sum(-1)
    d_sae = W_dec.shape[0]
    nearest = torch.zeros(d_sae, dtype=torch.int64)
    nearest_cos = torch.zeros(d_sae)
    if d_sae > 1:
        for i in range(0, d_sae, chunk):
            sims = dec_n[i:i + chunk] @ dec_n.T  # [chunk, d_sae]
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + i] = float("-inf")  # a latent is not its own neighbour
            v, j = sims.max(-1)
            nearest[i:i + chunk], nearest_cos[i:i + chunk] = j.cpu(), v.cpu()
    return WeightStats(enc_dec.cpu(), W_dec.norm(dim=-1).cpu(), nearest, nearest_cos)


def feature_table(res: Scan, weights: WeightStats, lens: LogitLens | None = None):
    """One row per latent: density, activation statistics, weight statistics, peak token, logit lens head."""
    import pandas as pd

    m = res.metrics
    d_sae = m.d_sae
    table = {
        "feature": np.arange(d_sae),
        "density": m.density.numpy(),
        "log10_density": np.log10(m.density.numpy() + 1e-10),
        "fire_count": m.fire_count.numpy(),
        "mean_activation": m.mean_activation.numpy(),
        "max_activation": m.act_max.numpy(),
        "enc_dec_cos": weights.enc_dec_cos.numpy(),
        "dec_norm": weights.dec_norm.numpy(),
        "nearest_feature": weights.nearest.numpy(),
        "nearest_cos": weights.nearest_cos.numpy(),
    }
    if res.top is not None:
        peak = []
        for i in range(d_sae):
            order = res.top.top.order(i)
            if order:
                j = order[0]
                seq, pos = int(res.top.top.seq[i, j]), int(res.top.top.pos[i, j])
                peak.append(res.reader.tokens_of(seq, pos, pos + 1)[0])
            else:
                peak.append("")
        table["max_token"] = peak
        if res.massive is not None and res.massive.shares is not None:
            table["massive_share"] = res.massive.shares.numpy()
            table["sink"] = res.massive.sinks.numpy()
    if lens is not None:
        table["top_logit"] = [lens.top_tokens[i][0] if lens.top_tokens[i] else "" for i in range(d_sae)]
        table["top_logit_value"] = lens.top_values[:, 0].numpy()
        table["bottom_logit"] = [lens.bottom_tokens[i][0] if lens.bottom_tokens[i] else "" for i in range(d_sae)]
        table["bottom_logit_value"] = lens.bottom_values[:, 0].numpy()
    return pd.DataFrame(table)


class LogitLens(NamedTuple):
    """Top/bottom tokens of W_dec[f] @ W_U for every latent."""

    top_tokens: list[list[str]]
    """[d_sae][k] tokens a latent promotes most."""
    top_values: torch.Tensor
    """[d_sae, k] their logit contributions."""
    bottom_tokens: list[list[str]]
    """[d_sae][k] tokens it suppresses most."""
    bottom_values: torch.Tensor
    """[d_sae, k] their (most negative) contributions."""
    note: str
    """How the directions reached the unembedding (e.g. through the MLP down projection, final norm folded)."""


@torch.no_grad()
def logit_lens(sae, model, tokenizer=None, *, k: int = 10, hookpoint: str | None = None,
               chunk: int = 512) -> LogitLens:
    """Top/bottom tokens of each decoder direction read through the unembedding.

    W_U = model.get_output_embeddings().weight (tied or not, it is the matrix the logits use), with the final
    norm's gain folded in when found. A direction of width d_model is used as is (resid, mlp_out, attn_out
    hookpoints); a wider one (MLP hidden neurons, `…down_proj:input`) is first mapped through the layer the
    hookpoint feeds. Other widths raise SAEToolkitError.
    """
    W_U = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    d_model = W_U.shape[1]
    dirs = sae.W_dec.detach().float().to(W_U.device)  # [d_sae, d_in]
    notes = []
    if dirs.shape[1] != d_model:
        dirs = _through_module(dirs, model, hookpoint or sae.cfg.hookpoint, d_model)
        notes.append("mapped through the hookpoint's module")
    gain = _final_norm_gain(model, d_model)
    if gain is not None:
        W_U = W_U * gain.to(W_U)
        notes.append("final norm gain folded into W_U")
    d_sae = dirs.shape[0]
    k = min(k, W_U.shape[0])
    top_v, top_i, bot_v, bot_i = [], [], [], []
    for i in range(0, d_sae, chunk):
        logits = dirs[i:i + chunk] @ W_U.T  # [chunk, vocab]
        t = logits.topk(k, dim=-1)
        b = logits.topk(k, dim=-1, largest=False)
        top_v.append(t.values.cpu())
        top_i.append(t.indices.cpu())
        bot_v.append(b.values.cpu())
        bot_i.append(b.indices.cpu())
    top_i, bot_i = torch.cat(top_i), torch.cat(bot_i)
    strings: dict[int, str] = {}

    def dec(t: int) -> str:
        if t not in strings:
            strings[t] = tokenizer.decode([t]) if tokenizer is not None else f"<{t}>"
        return strings[t]

    return LogitLens([[dec(t) for t in row] for row in top_i.tolist()], torch.cat(top_v),
                     [[dec(t) for t in row] for row in bot_i.tolist()], torch.cat(bot_v),
                     "; ".join(notes) or "W_dec @ W_U")


def _through_module(dirs: torch.Tensor, model, hookpoint: str, d_model: int) -> torch.Tensor:
    """[d_sae, d_in] directions at a module's input → [d_sae, d_model] through that (linear) module's weight."""
    from sae_toolkit.model.hookpoints import resolve

    hp = resolve(model, hookpoint)
    W = getattr(hp.module, "weight", None)
    if hp.io == "input" and W is not None and W.ndim == 2:
        if isinstance(hp.module, torch.nn.Linear) and tuple(W.shape) == (d_model, dirs.shape[1]):
            return dirs @ W.detach().float().T.to(dirs.device)
        if tuple(W.shape) == (dirs.shape[1], d_model):  # GPT-2 Conv1D stores [in, out]
            return dirs @ W.detach().float().to(dirs.device)
    raise SAEToolkitError(f"cannot read latents of width {dirs.shape[1]} at {hookpoint!r} through the unembedding "
                          f"(d_model={d_model}): the hookpoint is not the input of a linear layer to d_model")


def _final_norm_gain(model, d_model: int) -> torch.Tensor | None:
    """The elementwise weight of the norm applied before the unembedding, if the architecture has a known one."""
    for name in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                 "model.final_layernorm"):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        w = getattr(mod, "weight", None)
        if w is not None and w.ndim == 1 and w.shape[0] == d_model:
            # Gemma-style norms multiply by (1 + weight); their configs say so with this flag name.
            return w.detach().float() + (1.0 if "gemma" in type(model).__name__.lower() else 0.0)
    return None


@torch.no_grad()
def model_metrics(sae, model, input_ids: torch.Tensor, *, hookpoint: str, bos_token_id: int | None,
                  batch_size: int = 4, device: str = "cpu", mean_act: torch.Tensor | None = None,
                  excluded_positions: torch.Tensor | None = None) -> ModelMetrics:
    """CE/KL of the model with the SAE reconstruction (and zeros, and `mean_act` [d_out], the mean of the replaced
    activation, when given) spliced in place of the hooked activation.

    input_ids [n, seq]: the windows to run. Positions holding BOS, and `excluded_positions` [seq] bool (massive
    activations), keep their clean activation (the SAE never saw them) and no prediction made at, or of, such a
    position counts. A transcoder (sae.cfg.target) replaces its target instead — e.g. the MLP's output by the
    prediction from the MLP's input (`hookpoint`), captured in the same forward — and zero (or mean) ablation
    replaces that target.
    """
    from tqdm.auto import tqdm

    from sae_toolkit.activations.format import check_token_ids
    from sae_toolkit.model.hookpoints import capture, forward_kwargs, resolve, splice

    embedding = model.get_input_embeddings()
    if embedding is not None and hasattr(embedding, "num_embeddings"):  # ids past it: IndexError / CUDA assert
        check_token_ids(input_ids.cpu().numpy(), embedding.num_embeddings, "the activation file")
    hp = resolve(model, sae.cfg.target or hookpoint)  # where the output goes
    source = [resolve(model, hookpoint)] if sae.cfg.target else []  # a transcoder's input, read in the same pass
    sae = sae.to(device).eval()
    acc = ModelMetrics()
    keep_pos: torch.Tensor | None = None  # [batch, seq] bool, set per batch before the forwards
    seen: dict[str, dict[str, torch.Tensor]] = {}  # "acts": the dict `capture` fills during the running forward

    def with_sae(act: torch.Tensor) -> torch.Tensor:
        x = seen["acts"][hookpoint] if source else act  # the input runs before the target in the same forward
        x_hat = sae(x.float()).x_hat.to(act.dtype)
        return torch.where(keep_pos[..., None], x_hat, act)

    def with_zero(act: torch.Tensor) -> torch.Tensor:
        return torch.where(keep_pos[..., None], torch.zeros_like(act), act)

    def with_mean(act: torch.Tensor) -> torch.Tensor:
        return torch.where(keep_pos[..., None], mean_act.to(act.device, act.dtype).expand_as(act), act)

    for i in tqdm(range(0, input_ids.shape[0], batch_size), desc="CE/KL splice", unit="batch"):
        ids = input_ids[i:i + batch_size].to(device)
        is_bos = ids == bos_token_id if bos_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        keep_pos = ~is_bos
        if excluded_positions is not None:
            keep_pos = keep_pos & ~excluded_positions.to(keep_pos.device)[None, :]
        kw = forward_kwargs(model, ids)
        clean = model(**kw).logits
        with capture(model, source, stop_early=False) as captured, splice(model, hp, with_sae):
            seen["acts"] = captured
            logits_sae = model(**kw).logits
        with splice(model, hp, with_zero):
            logits_zero = model(**kw).logits
        logits_mean = None
        if mean_act is not None:
            with splice(model, hp, with_mean):
                logits_mean = model(**kw).logits
        mask = keep_pos[:, :-1] & keep_pos[:, 1:]  # prediction made at p of token p+1
        acc.update(ids, clean, logits_sae, logits_zero, mask, logits_mean)
    return acc
