"""Massive-activation tokens and the sink latents that reconstruct them: found during the analysis pass, reported
with a count, and kept out of the dashboard's default view (still browsable).

Massive activations (Sun et al. 2024) are a property of single tokens, not only of positions: in SmolLM2's
mlp_out.9 over builtin:pydoc, 1.3 % of the held-out tokens (BOS aside: 28 % of the tokens at position 1, 28 % of
the ` the` tokens, 17 % of the ` ` tokens) have 5-18x the median activation norm, all along one direction (mean
cosine 0.9995 to their mean), and they hold 49 % of the held-out variance. The per-position rule of
activations/outliers.py misses them (no position but BOS has a massive median), so a TopK SAE spends k latents on
that one direction: in the demo those 32 latents took every top spot of the dashboard (max activation 92-141
against <= 22 for any other latent), each with all of its top examples on massive tokens, none with any other.
They stay in the metrics and in training (with the demo's earlier defaults, held-out EV without the massive tokens
was 0.72 against 0.857 with them, and an SAE trained without them reached about the same 0.72): they are reported,
not hidden.

A token is massive when its activation norm exceeds `multiple` x the median token norm (the same multiple as the
position rule); a latent is a sink latent when at least `min_share` of its top examples peak on massive tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sae_toolkit.activations.outliers import sample_windows, window_norms
from sae_toolkit.analysis.metrics import ReconstructionMetrics
from sae_toolkit.errors import SAEToolkitError

SINK_MIN_SHARE = 0.5
"""Share of a latent's top examples on massive tokens from which it counts as a sink latent (in the demo the
shares are exactly 0 or 1, so any value in between gives the same 32 latents)."""


def median_token_norm(reader, sample_seqs: int = 256) -> float:
    """Median activation norm of the non-special tokens in up to `sample_seqs` evenly spaced windows of the
    reader's range (reader: an open activations.reader.ActsReader); 0.0 when there are none."""
    seqs = sample_windows(reader.seq_range, sample_seqs)
    if seqs.size == 0:
        return 0.0
    norms = window_norms(reader.dset, reader.ctx, seqs, reader.dtype)  # [n, ctx]
    special = torch.isin(torch.from_numpy(reader.file["tokens"][seqs].astype(np.int64)), reader.special_ids)
    flat = norms[~special.numpy()]
    return float(np.median(flat)) if flat.size else 0.0


@dataclass
class MassiveTokens:
    """Running record of the massive-activation tokens among the evaluated ones, and the reconstruction of the
    other tokens alone (how much of the explained variance the massive ones carry)."""

    multiple: float
    """A token is massive when its activation norm is above multiple x `median_norm`."""
    median_norm: float
    """Median token norm of the evaluated range (`median_token_norm`)."""
    ctx: int
    """Window length (file row = seq * ctx + position)."""
    d_out: int
    """Width of the reconstructed activation."""
    rows: list[torch.Tensor] = field(default_factory=list)
    """File rows of the massive tokens seen, int64 tensors, one per chunk."""
    rest: ReconstructionMetrics | None = None
    """Reconstruction sums over the evaluated tokens that are not massive."""
    shares: torch.Tensor | None = None
    """[d_sae] share of each latent's top examples on massive tokens (`sink_shares`), set after the pass."""
    min_share: float = SINK_MIN_SHARE
    """A latent with at least this share is a sink latent."""

    def __post_init__(self) -> None:
        if not self.multiple > 0:
            raise SAEToolkitError(f"massive-token multiple={self.multiple!r} must be > 0 (pass None to turn the "
                                  "detection off)")
        if self.rest is None:
            self.rest = ReconstructionMetrics(self.d_out, 1)

    @property
    def sinks(self) -> torch.Tensor | None:
        """[d_sae] bool: the sink latents (None before `shares` is set)."""
        return None if self.shares is None else self.shares >= self.min_share

    @property
    def threshold(self) -> float:
        return self.multiple * self.median_norm

    @torch.no_grad()
    def update(self, seq_ids: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, x_hat: torch.Tensor,
               keep: torch.Tensor) -> None:
        """One chunk: seq_ids [s], x [s*ctx, d_in] the SAE input (its norm decides), ref/x_hat [s*ctx, d_out] the
        target and its reconstruction, keep [s*ctx] bool the evaluated tokens."""
        massive = (x.float().norm(dim=-1) > self.threshold) & keep
        rows = seq_ids.to(x.device).repeat_interleave(self.ctx) * self.ctx + torch.arange(
            x.shape[0], device=x.device) % self.ctx
        self.rows.append(rows[massive].cpu())
        rest = keep & ~massive
        self.rest.update(ref[rest].float(), x_hat[rest].float(), torch.zeros(int(rest.sum()), 1, device=x.device))

    @property
    def all_rows(self) -> torch.Tensor:
        """Sorted file rows of every massive token seen, int64."""
        return torch.cat(self.rows).sort().values if self.rows else torch.zeros(0, dtype=torch.int64)

    def summary(self, total: ReconstructionMetrics) -> dict:
        """The metrics.json entry, given the accumulator over all evaluated tokens (`total`)."""
        n = int(self.all_rows.numel())
        rest = self.rest
        # Σ‖x − x̄‖² of the non-massive tokens about the mean of all tokens; the massive ones hold the remainder.
        rest_about_total = rest.m2_x + rest.n * (rest.mean_x - total.mean_x).pow(2).sum().item() if rest.n else 0.0
        share = 1.0 - rest_about_total / total.m2_x if total.m2_x > 0 else float("nan")
        return {"count": n, "fraction": n / total.n if total.n else float("nan"),
                "threshold_norm": self.threshold, "median_norm": self.median_norm, "multiple": self.multiple,
                "variance_share": share,
                "explained_variance_without": rest.compute()["explained_variance"],
                "rule": f"activation norm > {self.multiple:g} x the median token norm"}

    def sink_summary(self) -> dict | None:
        """The metrics.json entry for the sink latents (None without top examples)."""
        if self.shares is None:
            return None
        idx = torch.nonzero(self.sinks).flatten().tolist()
        return {"count": len(idx), "features": idx, "min_share": self.min_share,
                "rule": f"at least {self.min_share:.0%} of the latent's top examples peak on massive tokens; "
                        "left out of the dashboard's default list, still browsable"}


def sink_shares(seq: torch.Tensor, pos: torch.Tensor, ctx: int, massive_rows: torch.Tensor) -> torch.Tensor:
    """[d_sae] float: share of each latent's top examples that peak on a massive token (0 without examples).

    seq, pos [d_sae, k]: the top examples' windows and positions, seq < 0 in empty slots; massive_rows: sorted file
    rows (seq * ctx + pos) of the massive tokens."""
    filled = seq >= 0
    rows = seq.clamp_min(0) * ctx + pos
    on = torch.isin(rows, massive_rows) & filled
    return on.sum(1).double() / filled.sum(1).clamp_min(1).double()
