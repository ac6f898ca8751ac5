"""Top-activating examples per latent: a streaming top-k over context windows plus activation-interval samples.

One candidate per (sequence, latent): the position where the latent peaks in that sequence. Keeping at most one
example per stored window means no two examples of a latent ever come from overlapping text, and the per-chunk
work is one `max` over positions followed by one `topk` over (kept ∪ new) candidates — no Python loop over latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_toolkit.errors import SAEToolkitError


@dataclass
class TopActivations:
    """Running top-k and uniform sample of the per-sequence peak of every latent.

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
        peak, pos = f.max(dim=1)  # [seqs, d_sae]
        # Window of values around each peak, NaN where it runs past the sequence: [d_sae, seqs, width]
        offsets = torch.arange(-self.left, self.right + 1, device=f.device)
        idx = pos.T[..., None] + offsets  # [d_sae, seqs, width]
        inside = (idx >= 0) & (idx < ctx)
        f_t = f.permute(2, 0, 1)  # [d_sae, seqs, seq]
        win = f_t.gather(2, idx.clamp(0, ctx - 1)).masked_fill(~inside, float("nan"))
        fired = peak.T > 0  # [d_sae, seqs]
        seqs = seq_ids.to(f.device).expand(d, n)
        value = peak.T.masked_fill(~fired, float("-inf"))
        self.top.offer(value, value, seqs, pos.T, win)
        if self.n_samples:
            keys = torch.rand(d, n, generator=self._gen, device=f.device).masked_fill(~fired, float("-inf"))
            self.sample.offer(keys, value, seqs, pos.T, win)

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
            seen = {e["seq"] for e in top}
            width = max_act / self.n_intervals
            taken = [0] * self.n_intervals
            for j in self.sample.order(latent):
                v = float(self.sample.value[latent, j])
                b = min(int(v / width), self.n_intervals - 1) if width > 0 else 0
                seq = int(self.sample.seq[latent, j])
                if taken[b] >= self.per_interval or seq in seen:
                    continue
                taken[b] += 1
                seen.add(seq)
                ex = self._example(self.sample, latent, j, tokens_of)
                ex["interval"] = [b * width, (b + 1) * width]
                intervals.append(ex)
            intervals.sort(key=lambda e: -e["activation"])
        return {"top": top, "intervals": intervals}

    def _example(self, slots: _Slots, latent: int, j: int, tokens_of: Callable) -> dict:
        seq, pos = int(slots.seq[latent, j]), int(slots.pos[latent, j])
        win = slots.win[latent, j]
        keep = ~torch.isnan(win)
        start = pos - self.left + int(keep.int().argmax())  # first in-sequence position of the window
        values = win[keep].tolist()
        return {"seq": seq, "position": pos, "activation": float(slots.value[latent, j]),
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

    def order(self, latent: int) -> list[int]:
        """Filled slots of one latent, best key first."""
        keys = self.key[latent]
        return [j for j in keys.argsort(descending=True).tolist() if keys[j] > float("-inf")]

    def to(self, device: str) -> None:
        for name in ("key", "value", "seq", "pos", "win"):
            setattr(self, name, getattr(self, name).to(device))
