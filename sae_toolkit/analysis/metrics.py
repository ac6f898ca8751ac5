"""Streaming, mergeable metric accumulators: reconstruction and sparsity (DESIGN §6) and CE/KL with a model.

Every accumulator keeps sums, never samples, so batches — and later several processes — combine exactly with
`merge`. Sums are float64: at a million tokens float32 sums of squared norms lose the digits FVU needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sae_toolkit.errors import SAEToolkitError

# log10(density + DENSITY_EPS) puts dead latents at -10 in the histogram instead of -inf.
DENSITY_EPS = 1e-10


@dataclass
class ReconstructionMetrics:
    """Running sums over evaluated tokens for `l0`, density, FVU/EV, MSE, cosine, L2 ratio and shrinkage.

    With x [tokens, d_in] the input, x̂ the reconstruction and f [tokens, d_sae] the latents:
    fvu = Σ‖x − x̂‖² / Σ‖x − x̄‖² where x̄ is the mean over all evaluated tokens, explained_variance = 1 − fvu.
    Σ‖x − x̄‖² is kept as (mean, M2) and merged with Chan et al.'s pairwise formula, which stays exact where
    Σ‖x‖² − ‖Σx‖²/N would cancel catastrophically (residual streams have a large mean direction).
    """

    d_in: int
    """Width of the reconstructed activation."""
    d_sae: int
    """Number of latents."""
    n: int = 0
    """Tokens seen."""
    mean_x: torch.Tensor | None = None
    """Running mean of x, float64 [d_in]."""
    m2_x: float = 0.0
    """Σ‖x − x̄‖² over the tokens seen."""
    sse: float = 0.0
    """Σ‖x − x̂‖²."""
    sum_cos: float = 0.0
    """Σ cos(x, x̂)."""
    sum_l2_ratio: float = 0.0
    """Σ ‖x̂‖/‖x‖."""
    sum_l2_in: float = 0.0
    """Σ ‖x‖."""
    sum_l2_out: float = 0.0
    """Σ ‖x̂‖."""
    sum_dot: float = 0.0
    """Σ x·x̂ (for the relative reconstruction bias)."""
    sum_sq_out: float = 0.0
    """Σ ‖x̂‖²."""
    sum_l1: float = 0.0
    """Σ ‖f‖₁."""
    fire_count: torch.Tensor | None = None
    """Tokens on which each latent was > 0, int64 [d_sae]."""
    act_sum: torch.Tensor | None = None
    """Σ f over all tokens, float64 [d_sae] (divided by fire_count it is the mean activation when firing)."""
    act_max: torch.Tensor | None = None
    """Largest activation of each latent, float32 [d_sae]."""
    l0_counts: torch.Tensor | None = None
    """Histogram of the per-token number of active latents, int64 [d_sae + 1]."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEToolkitError(f"ReconstructionMetrics needs positive sizes, got d_in={self.d_in}, "
                                  f"d_sae={self.d_sae}")
        if self.mean_x is None:
            self.mean_x = torch.zeros(self.d_in, dtype=torch.float64)
        if self.fire_count is None:
            self.fire_count = torch.zeros(self.d_sae, dtype=torch.int64)
        if self.act_sum is None:
            self.act_sum = torch.zeros(self.d_sae, dtype=torch.float64)
        if self.act_max is None:
            self.act_max = torch.zeros(self.d_sae, dtype=torch.float32)
        if self.l0_counts is None:
            self.l0_counts = torch.zeros(self.d_sae + 1, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add a batch: x, x_hat [tokens, d_in], f [tokens, d_sae] (tokens already filtered of BOS/padding)."""
        if x.shape != x_hat.shape or x.shape[-1] != self.d_in or f.shape != (x.shape[0], self.d_sae):
            raise SAEToolkitError(f"metric batch shapes disagree: x {tuple(x.shape)}, x_hat {tuple(x_hat.shape)}, "
                                  f"f {tuple(f.shape)}; expected [tokens, {self.d_in}] and [tokens, {self.d_sae}]")
        if x.shape[0] == 0:
            return
        other = ReconstructionMetrics(self.d_in, self.d_sae)
        x, x_hat = x.double(), x_hat.double()
        other.n = x.shape[0]
        other.mean_x = x.mean(0).cpu()
        other.m2_x = (x - x.mean(0)).pow(2).sum().item()
        other.sse = (x - x_hat).pow(2).sum().item()
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)  # [tokens]
        other.sum_cos = F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum().item()
        other.sum_l2_ratio = (norm_out / norm_in.clamp_min(1e-12)).sum().item()
        other.sum_l2_in = norm_in.sum().item()
        other.sum_l2_out = norm_out.sum().item()
        other.sum_dot = (x * x_hat).sum().item()
        other.sum_sq_out = norm_out.pow(2).sum().item()
        # The latent matrix is the big one ([tokens, d_sae]): reduce it in float32 along one axis first (≤ 4k
        # terms per sum, ~1e-6 relative error) and keep the partial sums in float64; copying all of it to
        # float64 made this update slower than the SAE forward.
        # (Summing a float 0/1 matrix is also ~2x faster on CPU than summing the bool one.)
        f = f.float()
        fires = (f > 0).float()  # [tokens, d_sae]
        other.sum_l1 = torch.linalg.vector_norm(f, ord=1, dim=-1).double().sum().item()
        other.fire_count = fires.sum(0).long().cpu()
        other.act_sum = f.sum(0).double().cpu()
        other.act_max = f.amax(0).clamp_min(0).cpu()
        other.l0_counts = torch.bincount(fires.sum(-1).long().cpu(), minlength=self.d_sae + 1)
        self.merge_(other)

    def merge_(self, other: ReconstructionMetrics) -> ReconstructionMetrics:
        """Fold `other` into self (exact: the result equals one pass over both token sets); returns self."""
        if (other.d_in, other.d_sae) != (self.d_in, self.d_sae):
            raise SAEToolkitError(f"cannot merge metrics of sizes {(other.d_in, other.d_sae)} into "
                                  f"{(self.d_in, self.d_sae)}")
        n = self.n + other.n
        if n == 0:
            return self
        delta = other.mean_x - self.mean_x
        self.m2_x += other.m2_x + delta.pow(2).sum().item() * self.n * other.n / n
        self.mean_x = self.mean_x + delta * (other.n / n)
        self.n = n
        for name in ("sse", "sum_cos", "sum_l2_ratio", "sum_l2_in", "sum_l2_out", "sum_dot", "sum_sq_out",
                     "sum_l1"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.fire_count = self.fire_count + other.fire_count
        self.act_sum = self.act_sum + other.act_sum
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.l0_counts = self.l0_counts + other.l0_counts
        return self

    def merge(self, other: ReconstructionMetrics) -> ReconstructionMetrics:
        """A new accumulator holding both token sets; neither input changes."""
        out = ReconstructionMetrics(self.d_in, self.d_sae)
        return out.merge_(self).merge_(other)

    @property
    def density(self) -> torch.Tensor:
        """Fraction of evaluated tokens on which each latent was > 0, float64 [d_sae]."""
        return self.fire_count.double() / max(self.n, 1)

    @property
    def mean_activation(self) -> torch.Tensor:
        """Mean activation of each latent over the tokens where it fires (0 for dead latents), [d_sae]."""
        return self.act_sum / self.fire_count.clamp_min(1).double()

    def compute(self) -> dict[str, float | int]:
        """The scalar metrics of DESIGN §6 under their contract names (NaN where undefined, e.g. no tokens)."""
        n = self.n
        nan = float("nan")
        per_tok = (lambda s: s / n) if n else (lambda s: nan)
        fvu = self.sse / self.m2_x if self.m2_x > 0 else nan
        l0_values = torch.arange(self.d_sae + 1, dtype=torch.float64)
        return {
            "tokens": n,
            "l0": per_tok((self.l0_counts.double() * l0_values).sum().item()),
            "l1": per_tok(self.sum_l1),
            "dead_fraction": (self.fire_count == 0).double().mean().item() if n else nan,
            "dead_fraction_tokens": n,
            "n_dead": int((self.fire_count == 0).sum()),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / (n * self.d_in) if n else nan,
            "cosine_sim": per_tok(self.sum_cos),
            "l2_ratio": per_tok(self.sum_l2_ratio),
            "l2_norm_in": per_tok(self.sum_l2_in),
            "l2_norm_out": per_tok(self.sum_l2_out),
            "relative_reconstruction_bias": self.sum_sq_out / self.sum_dot if self.sum_dot else nan,
        }


def density_histogram(density: torch.Tensor, bins: int = 50) -> tuple[list[int], list[float]]:
    """Histogram of log10(density + 1e-10) over latents: (counts [bins], edges [bins + 1]); dead latents at -10."""
    lo = math.log10(DENSITY_EPS)  # density >= 0, so no value falls below this edge
    log_d = torch.log10(density.double() + DENSITY_EPS).clamp_max(0.0)  # density 1 + eps lands in the top bin
    counts = torch.histc(log_d, bins=bins, min=lo, max=0.0)
    edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64)
    return [int(c) for c in counts.tolist()], edges.tolist()


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of predicting input_ids[:, 1:] from logits[:, :-1]: [batch, seq - 1] float32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, seq-1, vocab]
    return -logp.gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) per position from logits [..., vocab], computed in log space with log_softmax: [...] float32."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass
class ModelMetrics:
    """Running sums of next-token CE and KL with the SAE spliced in (`ce_sae`, `kl_sae`) or the hooked activation
    zeroed (`ce_zero_ablation`, `kl_zero_ablation`), over predicting positions that are evaluated.

    ce_loss_recovered = (ce_zero_ablation − ce_sae) / (ce_zero_ablation − ce_clean); delta_ce = ce_sae − ce_clean;
    kl_sae = mean KL(P_clean ‖ P_sae). With mean-ablated logits too (the activation replaced by its mean over the
    evaluated tokens): ce_mean_ablation and ce_loss_recovered_mean = (ce_mean_ablation − ce_sae) /
    (ce_mean_ablation − ce_clean), a stricter baseline than zeros (zeroing also removes the mean direction).
    """

    n: int = 0
    """Predictions evaluated."""
    seqs: int = 0
    """Sequences (context windows) run through the model."""
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("ce_clean", "ce_sae", "ce_zero_ablation", "kl_sae", "kl_zero_ablation"), 0.0))
    n_mean: int = 0
    """Predictions evaluated with mean-ablated logits too."""
    sums_mean: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("ce_clean", "ce_sae", "ce_mean_ablation"), 0.0))
    """Σ over the predictions that also have mean-ablated logits."""
    """Σ of each per-prediction quantity."""

    @torch.no_grad()
    def update(self, input_ids: torch.Tensor, logits_clean: torch.Tensor, logits_sae: torch.Tensor,
               logits_zero: torch.Tensor, mask: torch.Tensor, logits_mean: torch.Tensor | None = None) -> None:
        """Add a batch. input_ids [batch, seq]; logits_* [batch, seq, vocab]; mask [batch, seq - 1] selects the
        predictions (made at position p of token p + 1) that count."""
        mask = mask.bool()
        if logits_mean is not None:
            for name, logits in (("ce_clean", logits_clean), ("ce_sae", logits_sae), ("ce_mean_ablation", logits_mean)):
                self.sums_mean[name] += next_token_ce(logits, input_ids)[mask].double().sum().item()
            self.n_mean += int(mask.sum())
        per_pos = {
            "ce_clean": next_token_ce(logits_clean, input_ids),
            "ce_sae": next_token_ce(logits_sae, input_ids),
            "ce_zero_ablation": next_token_ce(logits_zero, input_ids),
            "kl_sae": kl_div(logits_clean[:, :-1], logits_sae[:, :-1]),
            "kl_zero_ablation": kl_div(logits_clean[:, :-1], logits_zero[:, :-1]),
        }
        for name, v in per_pos.items():
            self.sums[name] += v[mask].double().sum().item()
        self.n += int(mask.sum())
        self.seqs += input_ids.shape[0]

    def merge_(self, other: ModelMetrics) -> ModelMetrics:
        """Fold `other` into self; returns self."""
        self.n += other.n
        self.seqs += other.seqs
        self.n_mean += other.n_mean
        for name, v in other.sums.items():
            self.sums[name] += v
        for name, v in other.sums_mean.items():
            self.sums_mean[name] += v
        return self

    def compute(self) -> dict[str, float | int]:
        """Means and the derived scores (NaN where a denominator is 0)."""
        nan = float("nan")
        m = {name: (v / self.n if self.n else nan) for name, v in self.sums.items()}
        gap = m["ce_zero_ablation"] - m["ce_clean"]
        m["ce_loss_recovered"] = (m["ce_zero_ablation"] - m["ce_sae"]) / gap if gap else nan
        if self.n_mean:
            mm = {name: v / self.n_mean for name, v in self.sums_mean.items()}
            m["ce_mean_ablation"] = mm["ce_mean_ablation"]
            gap_mean = mm["ce_mean_ablation"] - mm["ce_clean"]
            m["ce_loss_recovered_mean"] = (mm["ce_mean_ablation"] - mm["ce_sae"]) / gap_mean if gap_mean else nan
        m["delta_ce"] = m["ce_sae"] - m["ce_clean"]
        kl0 = m["kl_zero_ablation"]
        m["kl_div_score"] = (kl0 - m["kl_sae"]) / kl0 if kl0 else nan
        m["model_tokens"] = self.n
        m["model_seqs"] = self.seqs
        return m
