"""Measured feature effects: which next tokens a latent makes more or less likely, found by ablating it.

For latent i and each of its top examples (sequence s, peak position p) the model runs on the window's tokens up
to p twice: plainly, and with latent i ablated at p (x + W_decᵀ(f′ − f) with f′_i = 0, the steering edit of
`steering.py`, error term kept). The effect on token v is the mean over the examples of

    Δ_v = log p_ablated(v | tokens ≤ p) − log p_clean(v | tokens ≤ p),

and the report lists the tokens with the most negative Δ (the latent promotes them: removing it lowers them) and
the most positive (it suppresses them). Unlike the logit lens this goes through every later layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError


class AblationEffects(NamedTuple):
    """Per measured latent, the next tokens whose log-probability falls / rises most when it is ablated."""

    falls: dict[int, list[tuple[str, float]]]
    """latent → [(token, mean Δ log-prob < 0)], most negative first: what the latent promotes."""
    rises: dict[int, list[tuple[str, float]]]
    """latent → [(token, mean Δ log-prob > 0)], most positive first: what the latent suppresses."""
    examples: dict[int, int]
    """latent → number of top examples averaged over."""
    note: str
    """How the effects were measured (for metrics.json and the dashboard)."""


@torch.no_grad()
def ablation_effects(sae, model, tokenizer, sites: dict[int, list[tuple[int, int]]], windows: dict[int, Tensor], *,
                     hookpoint: str, k: int = 10, batch_size: int = 16, device: str = "cpu") -> AblationEffects:
    """Ablate each latent at its sites and measure the next-token log-probability change there.

    sites: latent → [(seq, peak position)] (its top examples). windows: seq → token ids [ctx] of that window.
    Cost: two forwards of the model per `batch_size` sites, each only as long as the batch's latest peak.
    """
    from tqdm.auto import tqdm

    from sae_toolkit.model.hookpoints import forward_kwargs, resolve, splice

    hp = resolve(model, hookpoint)
    sae = sae.to(device).eval()
    jobs = [(i, s, p) for i, lst in sites.items() for s, p in lst]
    sums: dict[int, Tensor] = {}
    rows_latent: Tensor | None = None  # [batch] latent to ablate per row
    rows_pos: Tensor | None = None  # [batch] position to ablate per row

    def ablate(x: Tensor) -> Tensor:  # x [batch, seq, d_in]
        b = torch.arange(x.shape[0], device=x.device)
        at = x[b, rows_pos].to(sae.W_dec.dtype)  # [batch, d_in]
        f_i = sae.encode(at)[b, rows_latent]  # [batch]
        delta = -f_i[:, None] * sae.W_dec[rows_latent]  # W_decᵀ(f′ − f) with only f′_i = 0 differing
        out = x.clone()
        out[b, rows_pos] = (at + delta).to(x.dtype)
        return out

    for j in tqdm(range(0, len(jobs), batch_size), desc="ablation effects", unit="batch"):
        batch = jobs[j:j + batch_size]
        length = max(p for _, _, p in batch) + 1
        # Right-padding with a copy of the window is harmless: the model is causal and only position p is read.
        ids = torch.stack([windows[s][:length] for _, s, _ in batch]).to(device)  # [batch, length]
        rows_latent = torch.tensor([i for i, _, _ in batch], device=device)
        rows_pos = torch.tensor([p for _, _, p in batch], device=device)
        kw = forward_kwargs(model, ids)
        b = torch.arange(len(batch), device=device)
        clean = model(**kw).logits[b, rows_pos].float().log_softmax(-1)  # [batch, vocab]
        with splice(model, hp, ablate):
            ablated = model(**kw).logits[b, rows_pos].float().log_softmax(-1)
        for (i, _, _), d in zip(batch, (ablated - clean).cpu()):
            sums[i] = sums[i] + d if i in sums else d
    falls, rises, counts = {}, {}, {}
    for i, total in sums.items():
        n = len(sites[i])
        mean = total / n  # [vocab]
        kk = min(k, mean.shape[0])
        lo, hi = mean.topk(kk, largest=False), mean.topk(kk)
        falls[i] = [(tokenizer.decode([int(t)]), float(v)) for v, t in zip(lo.values, lo.indices) if v < 0]
        rises[i] = [(tokenizer.decode([int(t)]), float(v)) for v, t in zip(hi.values, hi.indices) if v > 0]
        counts[i] = n
    note = (f"ablated at up to {max(counts.values(), default=0)} top examples per feature, next-token log-prob "
            "change measured with the model")
    return AblationEffects(falls, rises, counts, note)


def pick_sites(res, n_latents: int, per_latent: int, latents: list[int] | None = None
               ) -> dict[int, list[tuple[int, int]]]:
    """latent → its first `per_latent` top examples as (seq, position), for `latents` or else the `n_latents`
    latents whose top examples most agree on their peak token (ties: larger max activation) — the ones the
    dashboard opens on and a reader names first."""
    if per_latent < 1:
        raise SAEToolkitError(f"effect_examples={per_latent}; use at least 1 example per feature")
    slots, reader = res.top.top, res.reader
    if latents is None:
        tokens = reader.tokens(sorted({int(s) for s in slots.seq[slots.seq >= 0].tolist()}))
        row_of = {int(s): r for r, s in enumerate(sorted({int(s) for s in slots.seq[slots.seq >= 0].tolist()}))}
        keys = []
        for i in range(slots.seq.shape[0]):
            order = slots.order(i)
            if not order:
                continue
            peaks = [int(tokens[row_of[int(slots.seq[i, j])], int(slots.pos[i, j])]) for j in order]
            share = max(peaks.count(t) for t in set(peaks)) / len(peaks)
            keys.append((share * min(1.0, len(peaks) / 3), float(res.metrics.act_max[i]), i))
        latents = [i for *_, i in sorted(keys, reverse=True)[:n_latents]]
    out = {}
    for i in latents:
        ex = res.top.examples(i, reader.tokens_of)["top"][:per_latent]
        if ex:
            out[i] = [(int(e["seq"]), int(e["position"])) for e in ex]
    return out
