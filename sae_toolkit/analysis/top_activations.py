"""Top-activating examples per latent: a streaming top-k over non-overlapping context windows, plus
activation-interval samples.

The top-k is the greedy one: repeatedly take a latent's largest remaining activation, then drop every position
whose context window would overlap the taken one (same sequence, |Δposition| ≤ left + right). Suppression never
crosses sequences, and each chunk holds whole sequences, so a chunk's greedy picks merge with the kept ones by a
plain top-k; and only activations above the latent's current k-th best can matter, so after the first chunks
very few positions are looked at. Everything is vectorised over latents — no Python loop over d_sae.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sae_toolkit.errors import SAEToolkitError


@dataclass
class TopActivations:
    """Running top-k non-overlapping activations of every latent, and a uniform sample of per-sequence peaks.

    The sample (reservoir of `n_samples` per latent, by random keys) is grouped at the end into `n_intervals`
    equal-width activation intervals of (0, max]; it shows what weaker activations of a latent look like.
    """

    d_sae: int
    """Number of latents."""
    k: int = 20
    """Top examples kept per latent."""
    left: int = 12
    """Tokens of context before the peak token in each example."""
    right: int = 4
    """Tokens of context after the peak token."""
    n_samples: int = 32
    """Peaks sampled uniformly per latent for the interval examples (0 disables them)."""
    n_intervals: int = 4
    """Activation intervals the samples are grouped into."""
    per_interval: int = 2
    """Examples shown per interval."""
    seed: int = 0
    """Seed of the sampling keys (the top-k itself is deterministic)."""
    device: str = "cpu"
    """Where the running state lives (the device the latents are computed on)."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "k"):
            if getattr(self, name) < 1:
                raise SAEToolkitError(f"{name}={getattr(self, name)!r} must be at least 1")
        for name in ("left", "right", "n_samples", "n_intervals", "per_interval"):
            if getattr(self, name) < 0:
                raise SAEToolkitError(f"{name}={getattr(self, name)!r} must not be negative")
        w = self.left + 1 + self.right
        self._gen = torch.Generator(device=self.device).manual_seed(self.seed)
        self.top = _Slots(self.d_sae, self.k, w, self.device)
        self.sample = _Slots(self.d_sae, self.n_samples, w, self.device)

    @property
    def width(self) -> int:
        return self.left + 1 + self.right

    @torch.no_grad()
    def update(self, seq_ids: torch.Tensor, f: torch.Tensor, valid: torch.Tensor) -> None:
        """Add whole sequences: seq_ids [seqs] (their index in the file), f [seqs, seq, d_sae] latents,
        valid [seqs, seq] bool (False at special tokens: never a peak, shown with value 0)."""
        n, ctx, d = f.shape
        if d != self.d_sae or valid.shape != (n, ctx) or seq_ids.shape != (n,):
            raise SAEToolkitError(f"top-activation batch shapes disagree: f {tuple(f.shape)}, valid "
                                  f"{tuple(valid.shape)}, seq_ids {tuple(seq_ids.shape)}")
        f = f.float().masked_fill(~valid[..., None], 0.0)
        seq_ids = seq_ids.to(f.device)
        # Top-k: greedy non-overlapping picks among positions above each latent's current k-th best.
        floor = self.top.key[:, -1].clamp_min(0.0)  # [d_sae]; -inf while fewer than k are kept
        s_i, p_i, j_i = (f > floor).nonzero(as_tuple=True)
        v = f[s_i, p_i, j_i]
        keep = _greedy_non_overlapping(s_i * d + j_i, p_i, v, self.left + self.right, self.k)
        s_i, p_i, j_i, v = s_i[keep], p_i[keep], j_i[keep], v[keep]
        # Best k new picks per latent as dense [d_sae, k] slots (-inf where a latent has fewer).
        order = torch.argsort(-v, stable=True)
        order = order[torch.argsort(j_i[order], stable=True)]  # by latent, then by value descending
        j_sorted = j_i[order]
        first = torch.searchsorted(j_sorted, j_sorted, right=False)
        rank = torch.arange(len(order), device=f.device) - first
        sel = order[rank < self.k]
        slot_j, slot_r = j_i[sel], rank[rank < self.k]
        new_v = torch.full((d, self.k), float("-inf"), device=f.device)
        new_seq = torch.full((d, self.k), -1, dtype=torch.int64, device=f.device)
        new_pos = torch.zeros(d, self.k, dtype=torch.int64, device=f.device)
        new_win = torch.zeros(d, self.k, self.width, device=f.device)
        new_v[slot_j, slot_r] = v[sel]
        new_seq[slot_j, slot_r] = seq_ids[s_i[sel]]
        new_pos[slot_j, slot_r] = p_i[sel]
        new_win[slot_j, slot_r] = self._windows(f, s_i[sel], p_i[sel], slot_j)
        self.top.offer(new_v, new_v, new_seq, new_pos, new_win)
        if self.n_samples:
            # Interval samples: a uniform sample of the per-sequence peaks (random keys, kept by a top-k).
            peak, pos = f.max(dim=1)  # [seqs, d_sae]
            fired = peak.T > 0  # [d_sae, seqs]
            value = peak.T.masked_fill(~fired, float("-inf"))
            keys = torch.rand(d, n, generator=self._gen, device=f.device).masked_fill(~fired, float("-inf"))
            best = keys.topk(min(n, self.n_samples), dim=1).indices  # only these can enter the reservoir
            b_seq, b_j = best.reshape(-1), torch.arange(d, device=f.device).repeat_interleave(best.shape[1])
            b_pos = pos.T.gather(1, best).reshape(-1)
            win = self._windows(f, b_seq, b_pos, b_j).view(d, best.shape[1], self.width)
            self.sample.offer(keys.gather(1, best), value.gather(1, best), seq_ids[best], pos.T.gather(1, best),
                              win)

    def _windows(self, f: torch.Tensor, s: torch.Tensor, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Values of latent j around position p of chunk sequence s: [n, width], NaN past the sequence edges."""
        ctx = f.shape[1]
        idx = p[:, None] + torch.arange(-self.left, self.right + 1, device=f.device)  # [n, width]
        inside = (idx >= 0) & (idx < ctx)
        vals = f[s[:, None], idx.clamp(0, ctx - 1), j[:, None]]
        return vals.masked_fill(~inside, float("nan"))

    def examples(self, latent: int, tokens_of: Callable[[int, int, int], list[str]]) -> dict:
        """Top and interval examples of one latent as JSON-ready dicts.

        tokens_of(seq, start, stop) returns the token strings of positions start..stop-1 of sequence seq.
        Each example: {seq, position, activation, tokens, values, peak} where tokens[i]/values[i] are the context
        window and `peak` indexes the peak token inside it; interval examples also carry `interval` [lo, hi].
        """
        top = [self._example(self.top, latent, j, tokens_of) for j in self.top.order(latent)]
        max_act = top[0]["activation"] if top else 0.0
        intervals: list[dict] = []
        if top and self.n_samples and self.n_intervals:
            shown = [(e["seq"], e["position"]) for e in top]
            sep = self.left + self.right
            width = max_act / self.n_intervals
            taken = [0] * self.n_intervals
            sample = self.sample.rows(latent)
            for j in self.sample.order(latent):
                v, seq, pos = sample.value[j], sample.seq[j], sample.pos[j]
                b = min(int(v / width), self.n_intervals - 1) if width > 0 else 0
                if taken[b] >= self.per_interval or any(s == seq and abs(p - pos) <= sep for s, p in shown):
                    continue
                taken[b] += 1
                shown.append((seq, pos))
                ex = self._example(self.sample, latent, j, tokens_of)
                ex["interval"] = [b * width, (b + 1) * width]
                intervals.append(ex)
            intervals.sort(key=lambda e: -e["activation"])
        return {"top": top, "intervals": intervals}

    def _example(self, slots: _Slots, latent: int, j: int, tokens_of: Callable) -> dict:
        row = slots.rows(latent)
        seq, pos, win = row.seq[j], row.pos[j], row.win[j]
        values = [v for v in win if v == v]  # NaN (v != v) marks positions past the sequence edges
        start = pos - self.left + next(i for i, v in enumerate(win) if v == v)
        return {"seq": seq, "position": pos, "activation": row.value[j],
                "tokens": tokens_of(seq, start, start + len(values)), "values": values, "peak": pos - start}

    def to_cpu(self) -> None:
        """Move the state to the CPU (before reading examples out one latent at a time)."""
        self.top.to("cpu")
        self.sample.to("cpu")


class _Slots:
    """Per-latent fixed-size slots ranked by a key: value, seq, pos, window [d_sae, n(, width)]."""

    def __init__(self, d_sae: int, n: int, width: int, device: str) -> None:
        self.key = torch.full((d_sae, n), float("-inf"), device=device)
        self.value = torch.zeros(d_sae, n, device=device)
        self.seq = torch.full((d_sae, n), -1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(d_sae, n, dtype=torch.int64, device=device)
        self.win = torch.zeros(d_sae, n, width, device=device)
        self._cache: tuple[int, _Row] | None = None

    def offer(self, key: torch.Tensor, value: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor,
              win: torch.Tensor) -> None:
        """Keep the n largest keys of (kept ∪ offered); offered tensors are [d_sae, m(, width)]."""
        n = self.key.shape[1]
        if n == 0:
            return
        all_key = torch.cat([self.key, key], 1)
        best = all_key.topk(n, dim=1).indices  # [d_sae, n]
        self.key = all_key.gather(1, best)
        self.value = torch.cat([self.value, value], 1).gather(1, best)
        self.seq = torch.cat([self.seq, seq], 1).gather(1, best)
        self.pos = torch.cat([self.pos, pos], 1).gather(1, best)
        self.win = torch.cat([self.win, win], 1).gather(1, best[..., None].expand(-1, -1, self.win.shape[2]))
        self._cache = None

    def order(self, latent: int) -> list[int]:
        """Filled slots of one latent, best key first."""
        keys = self.rows(latent).key
        return sorted((j for j, k in enumerate(keys) if k > float("-inf")), key=lambda j: -keys[j])

    def rows(self, latent: int) -> _Row:
        """One latent's slots as Python lists (reading examples out one latent at a time stays cheap)."""
        if self._cache is None or self._cache[0] != latent:
            self._cache = (latent, _Row(self.key[latent].tolist(), self.value[latent].tolist(),
                                        self.seq[latent].tolist(), self.pos[latent].tolist(),
                                        self.win[latent].tolist()))
        return self._cache[1]

    def to(self, device: str) -> None:
        for name in ("key", "value", "seq", "pos", "win"):
            setattr(self, name, getattr(self, name).to(device))
        self._cache = None


class _Row(NamedTuple):
    """One latent's slots: key, value, seq, pos [n] and win [n][width] as lists."""

    key: list[float]
    value: list[float]
    seq: list[int]
    pos: list[int]
    win: list[list[float]]


def _greedy_non_overlapping(group: torch.Tensor, pos: torch.Tensor, value: torch.Tensor, sep: int,
                            k: int) -> torch.Tensor:
    """Greedy non-maximum suppression within groups: indices of the candidates kept when each group repeatedly
    takes its largest remaining value and drops the others within `sep` positions of it (at most k per group).

    group, pos, value: [n]. Rounds are vectorised over groups; a group takes one pick per round.
    """
    n = value.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=value.device)
    order = torch.argsort(-value, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # contiguous groups, largest value first
    g, p = group[order], pos[order]
    _, g_dense = torch.unique_consecutive(g, return_inverse=True)
    n_groups = int(g_dense.max()) + 1
    alive = torch.ones(n, dtype=torch.bool, device=value.device)
    kept = []
    idx = torch.arange(n, device=value.device)
    for _ in range(k):
        if not alive.any():
            break
        # First alive candidate of each group = its largest remaining value.
        first = torch.full((n_groups,), n, dtype=torch.int64, device=value.device)
        first.scatter_reduce_(0, g_dense[alive], idx[alive], reduce="amin")
        has = first < n
        picks = first[has]
        kept.append(picks)
        pick_pos = torch.full((n_groups,), -(10**9), dtype=torch.int64, device=value.device)
        pick_pos[has] = p[picks]
        alive &= (p - pick_pos[g_dense]).abs() > sep
        alive[picks] = False
    return order[torch.cat(kept)]
