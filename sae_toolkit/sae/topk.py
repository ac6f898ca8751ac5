"""TopK SAEs (Gao et al. 2024, with AuxK and Multi-TopK) and BatchTopK SAEs (Bussmann et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import kernels
from sae_toolkit.sae.base import SAE, SAEConfig, TrainOutput
from sae_toolkit.sae.codes import SparseActs, Transposed, batch_topk_code, topk_code, transposed
from sae_toolkit.sae.kernels import sparse_decode, sparse_pre_acts
from sae_toolkit.sae.registry import register


@register
class TopKSAE(SAE):
    """f = ReLU(TopK_k(W_encᵀ(x − b_dec) + b_enc)),  x̂ = W_decᵀ f + b_dec  (Gao et al. 2024).

    Loss  ‖x − x̂‖² + α‖e − ê‖²  with the AuxK term: e = stopgrad(x − x̂), ê = W_decᵀ z_aux (no bias), z_aux the
    top k_aux pre-activations among dead latents (ReLU'd), α = aux_coefficient (1/32). Multi-TopK adds ‖x − x̂₄ₖ‖²/8.
    Training runs on the sparse kernels: decode and every backward cost batch·k·d_in, not batch·d_sae·d_in.
    """

    archs = ("topk",)

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae]: the k largest pre-activations per token, ReLU'd; the rest 0."""
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def _select(self, pre: Tensor) -> SparseActs:
        """[batch, d_sae] detached pre-activations → the (token, latent) entries the training forward keeps."""
        return topk_code(pre, 4 * self.cfg.k if self.cfg.multi_topk else self.cfg.k)

    def training_loss(self, x: Tensor, *, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                      target: Tensor | None = None) -> TrainOutput:
        """Loss of one batch x [batch, d_in]; parts {"mse", "auxk"} (+ "mse_4k" with Multi-TopK).

        dead_mask [d_sae] bool selects the latents AuxK may use; None or all-False gives auxk = 0.
        sparsity_scale is ignored (k fixes the sparsity). MSE = mean over the batch of ‖x − x̂‖² summed over d_in.
        """
        if x.ndim != 2:
            raise SAEToolkitError(f"training_loss takes a [batch, d_in] batch, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        y = self._target(x, target)  # what x̂ is compared with: x, or a transcoder's target
        skip = self.skip_out(x) if self.cfg.skip else None  # [batch, d_out]
        with torch.no_grad():
            sae_in = self._sae_in(x)  # [batch, d_in]; b_dec's gradient comes from the kernel, see below
            pre = F.linear(sae_in, self.W_enc.t(), self.b_enc)  # [batch, d_sae], only to choose entries
        code = self._select(pre)
        t = transposed(code, self.cfg.d_sae)  # one column sort, shared by both sparse backwards
        dead = self._dead_compact(pre, dead_mask)
        if dead is None:
            z = self._sparse_pre_acts(code, sae_in, t).relu()  # [nnz]
        else:  # AuxK's dead block rides in the same kernels as the main entries (gradients added in place)
            b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
            z_pre = pre.index_select(1, dead)  # [batch, n_dead], no grad: the encoder ran once, for every latent
            z, z_dead = kernels.sparse_pre_acts_with_block(code, sae_in, self.W_enc, self.b_enc, b_dec, t, dead,
                                                           z_pre)
            z = z.relu()
        main, t_main = code._replace(vals=z), t
        parts: dict[str, Tensor] = {}
        if self.cfg.multi_topk:
            # topk_code sorts each row descending, so the first k of the 4k entries are the top k
            k, b = self.cfg.k, x.shape[0]
            keep = lambda t: t.view(b, 4 * k)[:, :k].reshape(-1)
            main = SparseActs(keep(z), keep(code.rows), keep(code.cols), b, k)
            t_main = None
            x_hat_4k = sparse_decode(code._replace(vals=z), self.W_dec, t) + self.b_dec
            parts["mse_4k"] = self._mse(y, x_hat_4k if skip is None else x_hat_4k + skip) / 8
        if dead is None:
            x_hat = sparse_decode(main, self.W_dec, t_main) + self.b_dec  # [batch, d_out]
        else:
            f_dead = self._auxk_keep(z_dead, z_pre)
            x_hat, e_hat = kernels.sparse_decode_with_block(main, self.W_dec, t_main, dead, f_dead)
            x_hat = x_hat + self.b_dec
        if skip is not None:
            x_hat = x_hat + skip
        parts["mse"] = self._mse(y, x_hat)
        if dead is None:
            parts["auxk"] = self._auxk_loss(y, x_hat, sae_in, pre, dead_mask)
        else:
            parts["auxk"] = self.cfg.aux_coefficient * self._mse((y - x_hat).detach(), e_hat)
        self._after_batch(main)
        active = (main.vals.detach() > 0).float()  # [nnz]
        # scatter-max instead of boolean indexing: no host sync on GPU
        fired = active.new_zeros(self.cfg.d_sae).scatter_reduce_(0, main.cols, active, "amax") > 0
        l0 = active.sum() / x.shape[0]
        return TrainOutput(sum(parts.values()), x_hat, fired, l0, parts)

    def _auxk_loss(self, x: Tensor, x_hat: Tensor, sae_in: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """α·mean_b ‖e − ê‖², e = stopgrad(x − x̂), ê decoded (no bias) from the top k_aux dead pre-activations.
        x is what x̂ approximates (a transcoder's target), sae_in the encoder's input.

        The dead latents' values carry gradients to their encoder columns W_enc[:, i] and b_enc[i] (and b_dec) as
        well as to their decoder rows (DESIGN §5). Two implementations of the same formula:
        - static (GPU, torch.compile): top k_aux of the pre-activations with live latents masked to −inf, through
          the sparse kernels; fixed shapes, no host sync, no early exit (the loss is multiplied by "any dead").
        - compact (eager CPU): the dead columns gathered into a [batch, n_dead] block and handled with dense
          GEMMs; with k_aux ≈ n_dead/2 (10 % dead) that block is half full, and a GEMM is ~10× cheaper per
          multiply-add than the sparse gathers — and a batch without dead latents costs nothing. In bf16 with
          float32 accumulation where the CPU has native bf16 (`kernels.LOW_PRECISION_SUMS`).
        """
        zero = x_hat.new_zeros(())
        if dead_mask is None or self.cfg.aux_coefficient == 0:
            return zero
        if dead_mask.shape != (self.cfg.d_sae,):
            raise SAEToolkitError(f"dead_mask has shape {tuple(dead_mask.shape)}, expected ({self.cfg.d_sae},)")
        dead_mask = dead_mask.to(pre.device, torch.bool)
        e = (x - x_hat).detach()
        if kernels.host_syncs_ok(pre):
            dead = self._dead_compact(pre, dead_mask)  # [n_dead]
            if dead is None:
                return zero
            e_hat = self._auxk_decode_compact(sae_in, pre, dead)
            return self.cfg.aux_coefficient * self._mse(e, e_hat)
        k_aux = min(self.cfg.k_aux, self.cfg.d_sae)
        # live latents at −inf never win the top k_aux while a dead one is left; when fewer than k_aux are dead
        # the −inf picks are ReLU'd to exactly 0 (no value, no gradient), as if k_aux were n_dead
        aux = topk_code(pre.masked_fill(~dead_mask, float("-inf")), k_aux)
        t = transposed(aux, self.cfg.d_sae)
        z_aux = self._sparse_pre_acts(aux, sae_in, t).relu()
        e_hat = sparse_decode(aux._replace(vals=z_aux), self.W_dec, t)  # [batch, d_in]
        return self.cfg.aux_coefficient * self._mse(e, e_hat) * dead_mask.any()

    def _dead_compact(self, pre: Tensor, dead_mask: Tensor | None) -> Tensor | None:
        """[n_dead] ids of the dead latents when AuxK takes the compact path inside the main kernels (eager CPU, some
        latent dead, AuxK on); None otherwise (no AuxK, or `_auxk_loss` decides)."""
        if (dead_mask is None or self.cfg.aux_coefficient == 0 or not kernels.host_syncs_ok(pre)
                or dead_mask.shape != (self.cfg.d_sae,)):
            return None
        dead = dead_mask.to(pre.device, torch.bool).nonzero().squeeze(1)
        return dead if dead.numel() else None

    def _auxk_keep(self, z: Tensor, z_pre: Tensor) -> Tensor:
        """AuxK's latents on the dead block: ReLU(z) [batch, n_dead] kept at each token's top k_aux of z_pre (the
        same values without grad, which choose the entries)."""
        k_aux = min(self.cfg.k_aux, z_pre.shape[1])
        f = z.relu()
        # a token with at most k_aux positive pre-activations keeps all of them, the rest are ReLU'd to 0 anyway:
        # then the top k_aux (2.7 ms of a CPU step at 460 dead latents) changes nothing; a count read on the host
        if k_aux == z_pre.shape[1] or (kernels.host_syncs_ok(z_pre) and kernels.max_true_per_row(z_pre > 0) <= k_aux):
            return f
        idx = z_pre.topk(k_aux, dim=-1, sorted=False).indices  # [batch, k_aux]
        return f * torch.zeros_like(z_pre, dtype=torch.bool).scatter_(-1, idx, True)

    def _auxk_decode_compact(self, sae_in: Tensor, pre: Tensor, dead: Tensor) -> Tensor:
        """ê [batch, d_in] from the dead latents `dead` [n_dead] (global ids), dense on their columns only: the
        compact AuxK of archs that decode in several pieces (Matryoshka); TopK runs the same block inside its main
        kernels (`kernels.sparse_pre_acts_with_block`)."""
        z_pre = pre.index_select(1, dead)  # [batch, n_dead], no grad: the encoder ran once, for every latent
        # gradients reach the dead columns of W_enc, b_enc (and b_dec, as one matvec) without a second forward GEMM
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        z = kernels.dense_pre_acts(z_pre, sae_in, kernels.select_distinct(self.W_enc, dead, 1),
                                   self.b_enc.index_select(0, dead), b_dec, adaptive=False)
        return self._auxk_keep(z, z_pre) @ kernels.select_distinct(self.W_dec, dead, 0)

    def _sparse_pre_acts(self, code: SparseActs, sae_in: Tensor, t: Transposed | None = None) -> Tensor:
        """[nnz] pre-activations at code's entries with the sparse backward (b_dec's gradient as one matvec)."""
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return sparse_pre_acts(code, sae_in, self.W_enc, self.b_enc, b_dec, t)

    def _after_batch(self, main: SparseActs) -> None:
        """Hook for per-batch state updates (BatchTopK's threshold)."""


@register
class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): training keeps the k·batch largest pre-activations of the whole batch
    (ReLU'd), so tokens get a variable number of latents averaging k (after a start that moves from per-token TopK
    to this rule, `per_token_share`). Inference applies one threshold θ,
    f = ReLU(π)·1[π > θ], θ an EMA (cfg.batchtopk_threshold_decay) of the smallest kept positive activation per
    training batch, which the trainer replaces at the end by `calibrate_threshold_` on training rows (the saved
    SAE keeps k latents per token on average there). Same AuxK loss as TopK.
    """

    archs = ("batchtopk",)

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        # < 0 means "not estimated yet": encode then falls back to per-token TopK.
        self.register_buffer("threshold", torch.tensor(-1.0, device=device, dtype=self.W_enc.dtype))
        # the share is a tensor so a compiled loss keeps one graph while the trainer moves it; the Python-side mode
        # picks the cheap exact paths at the two ends
        self.register_buffer("_per_token_share", torch.ones((), device=device, dtype=self.W_enc.dtype),
                             persistent=False)
        self._selection = "batch"
        self.per_token_share = 0.0

    @property
    def per_token_share(self) -> float:
        """Training state set by the trainer (not saved): 1 selects the top k per token, as TopK; 0 the top k·batch
        of the whole batch (BatchTopK); in between, the top k·batch of π − s·π₍ₖ₎, π₍ₖ₎ each token's k-th largest
        pre-activation (`mixed_topk_code`), which moves continuously from the first to the second.

        Why a per-token start: at initialisation the batch-wide selection gives most latents to the highest-norm
        tokens, i.e. to mixtures of many features, and the decoder settles on those mixtures (issue-11 toy: MMCS
        0.86 against TopK's 0.996). Why a ramp and not a switch: per-token TopK leaves the pre-activations below each
        token's top k untrained, and at an abrupt switch the high-norm tokens took hundreds of them at once (SmolLM2
        mlp_out.9, k 32, 200k tokens: training loss ×35 in one step, ~30 steps to recover; held-out EV 0.821
        with the switch, 0.854 with the ramp)."""
        return float(self._per_token_share)

    @per_token_share.setter
    def per_token_share(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise SAEToolkitError(f"per_token_share={share!r} must be in [0, 1]")
        self._selection = "token" if share >= 1.0 else "batch" if share <= 0.0 else "mixed"
        self._per_token_share.fill_(share)

    @property
    def per_token_selection(self) -> bool:
        """Whether training selects the top k per token (per_token_share 1); setting it sets the share to 1 or 0."""
        return self._selection == "token"

    @per_token_selection.setter
    def per_token_selection(self, on: bool) -> None:
        self.per_token_share = 1.0 if on else 0.0

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., d_sae]. Eval mode: ReLU(π)·1[π > θ] per token. Train mode: BatchTopK over all
        tokens given. Eval before any training batch (θ unset): per-token TopK."""
        pre = self.pre_acts(x)
        if self.training:
            flat = pre.reshape(-1, self.cfg.d_sae)
            code = batch_topk_code(flat.detach(), self.cfg.k)
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[code.rows, code.cols] = True
            return (flat.relu() * mask).reshape(pre.shape)
        if self.threshold < 0:
            return super().encode(x)
        return pre.relu() * (pre > self.threshold)

    def _select(self, pre: Tensor) -> SparseActs:
        if self._selection == "token":
            return topk_code(pre, self.cfg.k)
        if self._selection == "mixed":
            return mixed_topk_code(pre, self.cfg.k, self._per_token_share)
        return batch_topk_code(pre, self.cfg.k)

    @torch.no_grad()
    def _after_batch(self, main: SparseActs) -> None:
        if not self.training or self._selection != "batch":
            # per-token (and mixed) selections keep smaller activations than the batch-wide one will: θ would start
            # too low
            return
        # all tensor ops (no host sync on GPU): a batch without positive activations leaves θ as it is
        vals = main.vals.detach().to(self.threshold.dtype)
        m = torch.where(vals > 0, vals, torch.inf).min()
        ema = torch.lerp(self.threshold, m, 1 - self.cfg.batchtopk_threshold_decay)
        new = torch.where(self.threshold < 0, m, ema)
        self.threshold.copy_(torch.where(torch.isfinite(m), new, self.threshold))

    @torch.no_grad()
    def calibrate_threshold_(self, x: Tensor, chunk_rows: int = 4096) -> float:
        """Set θ from the current weights so that inference keeps k latents per token on average over x [n, d_in]
        (rows of the training distribution): θ = the (k·n + 1)-th largest pre-activation over all n·d_sae of
        them, i.e. one BatchTopK selection over a batch of n. Returns θ.

        Why not the EMA alone: it averages per-batch minima taken with weights that were still moving (and only
        over the batch-wide phase), and with few batch-wide steps it lags the final weights — on SmolLM2 mlp_out.9
        (k = 32) the EMA θ gave a held-out L0 of 23. Calibrating on the final weights fixes the inference L0 at k.
        """
        if x.ndim != 2 or x.shape[0] < 1:
            raise SAEToolkitError(f"calibrate_threshold_ takes a non-empty [n, d_in] batch, got {tuple(x.shape)}")
        need = min(self.cfg.k * x.shape[0] + 1, x.shape[0] * self.cfg.d_sae)
        top = x.new_empty(0, dtype=self.W_enc.dtype)  # the `need` largest pre-activations seen so far
        for chunk in x.split(chunk_rows):
            pre = self.pre_acts(chunk.to(self.W_enc.device, self.W_enc.dtype)).reshape(-1)
            cand = torch.cat([top.to(pre.device), pre.topk(min(need, pre.numel()), sorted=False).values])
            top = cand.topk(min(need, cand.numel()), sorted=False).values
        # θ ≥ 0: with fewer than k·n positive pre-activations every positive one is kept (ReLU drops the rest)
        theta = top.min().clamp_min(0)
        self.threshold.copy_(theta.to(self.threshold))
        return float(theta)

    def _fold_extra_(self, scale: float) -> None:
        if self.threshold >= 0:
            self.threshold.div_(scale)

    def state_tensors(self) -> dict[str, Tensor]:
        """W_enc, b_enc, W_dec, b_dec and the scalar inference `threshold` (−1: not estimated yet)."""
        return {**super().state_tensors(), "threshold": self.threshold}


def mixed_topk_code(pre: Tensor, k: int, share: Tensor | float) -> SparseActs:
    """[batch, d_sae] pre-activations π → the k·batch entries with the largest π − s·π₍ₖ₎ (values: π itself), where
    π₍ₖ₎ [batch, 1] is each token's k-th largest pre-activation and s = share in [0, 1].

    s = 1 is per-token TopK (exactly k entries of each token reach π − π₍ₖ₎ ≥ 0, all others are below); s = 0 is
    BatchTopK. In between, a token's entries are lifted by (1 − s)·π₍ₖ₎: high-norm tokens gain latents gradually as
    s falls, so the selection (and the loss) moves continuously from one rule to the other.
    """
    kth = pre.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [batch, 1]
    code = batch_topk_code(pre - share * kth, k)
    return code._replace(vals=pre.reshape(-1)[code.rows * pre.shape[1] + code.cols])
