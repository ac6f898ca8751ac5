"""Does this SAE belong to these activations (and this model)? Checks `analyze` runs before trusting a number.

A tiny-llama SAE evaluated on tiny-gpt2 activations of the same hookpoint name and width ran to the end and
reported EV 0.24 instead of 0.89 (measured, issue 10): nothing in the numbers says they are meaningless, so the
provenance is compared, plus a cheap statistical guard for files that carry none.
"""

from __future__ import annotations

import torch

from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.errors import SAEToolkitError

MAX_FVU = 2.0
"""A trained SAE whose reconstruction error on a sample exceeds twice the variance about the mean (EV < -1) and
the error of predicting zeros does not fit these activations. Only SAEs the trainer saved (cfg.json
`extra.train_steps`) are checked: an untrained one legitimately scores worse (a random 48-latent ReLU SAE on a
16-d test file: FVU 2.1; random decoders sum more directions as d_sae grows). The guard is deliberately coarse:
a trained tiny-llama SAE gave FVU 0.82 on its activations permuted across dimensions and 0.20 on them scaled 10x
(measured), both below it; it catches reconstructions worse than both trivial predictors (a decoder applied to
an unrelated stream, a sign flip), and the model/hookpoint provenance checks catch the rest."""

SAMPLE_TOKENS = 2048
"""Tokens (whole windows) the statistical check reads before the full pass."""

_ALLOW = "pass --allow-mismatch to analyze anyway"


def _same_model(a: str, b: str) -> bool:
    from sae_toolkit.model.loading import canonical_spec

    return canonical_spec(a) == canonical_spec(b)


def check_model(sae, model: str | None, *, allow_mismatch: bool, where: object) -> list[str]:
    """`--model` must be the model the SAE was trained on (when cfg.json names one). Returns notes for the report
    (allowed mismatches); raises otherwise."""
    sae_model = sae.cfg.model or ""
    if not model or not sae_model or _same_model(model, sae_model):
        return []
    msg = f"--model {model!r} is not the SAE's model {sae_model!r} (cfg.json of {where})"
    if not allow_mismatch:
        raise SAEToolkitError(f"{msg}; CE/KL would splice it into the wrong model: pass --model {sae_model} or "
                              f"{_ALLOW}")
    return [f"allowed mismatch: {msg}"]


def check_acts(sae, reader: ActsReader, *, allow_mismatch: bool, where: object) -> list[str]:
    """The activation file must hold the SAE's hookpoint of its model, and the SAE must reconstruct a sample
    of it better than MAX_FVU. Returns notes for the report (allowed mismatches); raises otherwise."""
    notes = []
    problems = []
    if sae.cfg.hookpoint and reader.hookpoint != sae.cfg.hookpoint:
        problems.append(f"the SAE was trained on hookpoint {sae.cfg.hookpoint!r} but {reader.path} is read at "
                        f"{reader.hookpoint!r}")
    if sae.cfg.model and reader.model and not _same_model(sae.cfg.model, reader.model):
        problems.append(f"the SAE in {where} was trained on model {sae.cfg.model!r} but {reader.path} holds "
                        f"activations of {reader.model!r}")
    if not problems and "train_steps" in sae.cfg.extra:
        fvu, vs_zero = sample_fvu(sae, reader)
        if fvu > MAX_FVU and vs_zero > 1:
            problems.append(f"the SAE in {where} reconstructs {reader.path} acts/{reader.hookpoint} with FVU "
                            f"{fvu:.3g} on a {SAMPLE_TOKENS}-token sample, far worse than predicting the mean or "
                            f"zero (limit {MAX_FVU}): it was not trained on these activations")
    for p in problems:
        if not allow_mismatch:
            raise SAEToolkitError(f"{p}; analyze it on its own activations or {_ALLOW}")
        notes.append(f"allowed mismatch: {p}")
    return notes


@torch.no_grad()
def sample_fvu(sae, reader: ActsReader, tokens: int = SAMPLE_TOKENS) -> tuple[float, float]:
    """(Σ‖x − x̂‖² / Σ‖x − x̄‖², Σ‖x − x̂‖² / Σ‖x‖²) over the first windows of the reader's range (BOS positions
    excluded); (0, 0) when the sample is degenerate or holds non-finite values (the full pass reports those)."""
    seqs = max(1, -(-tokens // reader.ctx))
    _, toks, x = next(reader.chunks(seqs))
    if reader.bos_token_id is not None:
        x = x[toks.reshape(-1) != reader.bos_token_id]
    if len(x) < 2 or not torch.isfinite(x).all():
        return 0.0, 0.0
    device = next(iter(sae.state_tensors().values())).device
    x = x.to(device)
    err = (x - sae(x).x_hat.float()).pow(2).sum()
    var, sq = (x - x.mean(0)).pow(2).sum(), x.pow(2).sum()
    if var <= 0 or sq <= 0:
        return 0.0, 0.0
    return float(err / var), float(err / sq)
