"""BatchTopK's training selection: per-token TopK at the start, moving continuously to BatchTopK (mixed_topk_code,
BatchTopKSAE.per_token_share, schedules.per_token_share_at)."""

from __future__ import annotations

import pytest
import torch
from _sae_helpers import cfg_for

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import make_sae
from sae_toolkit.sae.codes import batch_topk_code, topk_code
from sae_toolkit.sae.topk import mixed_topk_code
from sae_toolkit.training.schedules import per_token_share_at

K = 4


def _pre(n: int = 64, d_sae: int = 96, seed: int = 0) -> torch.Tensor:
    """[n, d_sae] pre-activations whose scale varies by token, as with real activations (a few tokens ×10)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(n, 1)
    scale[:4] = 10.0
    return torch.randn(n, d_sae, generator=g) * scale


def _entries(code) -> set[tuple[int, int]]:
    return set(zip(code.rows.tolist(), code.cols.tolist()))


def test_mixed_selection_is_topk_at_share_1_and_batchtopk_at_share_0():
    pre = _pre()
    for share, want in ((1.0, topk_code(pre, K)), (0.0, batch_topk_code(pre, K))):
        got = mixed_topk_code(pre, K, torch.tensor(share))
        assert _entries(got) == _entries(want), share
        assert torch.all(got.rows[1:] >= got.rows[:-1])  # sorted by row, as the sparse kernels need
        torch.testing.assert_close(got.vals, pre[got.rows, got.cols])  # the pre-activations, not the scores
    # the batch-wide rule gives the high-norm tokens far more than k: what the mixed rule phases in
    assert (batch_topk_code(pre, K).rows < 4).sum() > 4 * K * 4


def test_mixed_selection_moves_continuously_from_one_rule_to_the_other():
    """The old start switched from per-token to batch-wide in one step; on SmolLM2 activations the training loss
    jumped ×35 there. Along the ramp each step of s changes only a few entries, and the high-norm tokens' share
    grows steadily."""
    pre = _pre()
    nnz = pre.shape[0] * K
    prev = _entries(mixed_topk_code(pre, K, 1.0))
    assert len(_entries(batch_topk_code(pre, K)) ^ prev) > 0.5 * nnz  # the abrupt switch: most entries change
    heavy = []
    for i in range(1, 51):
        code = mixed_topk_code(pre, K, 1.0 - i / 50)
        assert code.vals.numel() == nnz
        cur = _entries(code)
        assert len(cur ^ prev) <= 0.1 * nnz, i
        heavy.append(int((code.rows < 4).sum()))
        prev = cur
    assert heavy == sorted(heavy) and heavy[0] <= 4 * K + 2 and heavy[-1] > 4 * K * 4


def test_per_token_share_sets_the_training_selection():
    sae = make_sae(cfg_for("batchtopk"))
    pre = _pre(16, sae.cfg.d_sae)
    assert sae.per_token_share == 0.0 and not sae.per_token_selection  # the plain BatchTopK rule by default
    assert _entries(sae._select(pre)) == _entries(batch_topk_code(pre, sae.cfg.k))
    sae.per_token_selection = True  # the older on/off switch still works
    assert sae.per_token_share == 1.0
    assert _entries(sae._select(pre)) == _entries(topk_code(pre, sae.cfg.k))
    sae.per_token_share = 0.25
    assert _entries(sae._select(pre)) == _entries(mixed_topk_code(pre, sae.cfg.k, 0.25))
    assert "_per_token_share" not in sae.state_dict()  # training state, not saved
    with pytest.raises(SAEToolkitError, match="per_token_share=1.5"):
        sae.per_token_share = 1.5


def test_per_token_share_ramps_down_over_the_start_fraction():
    assert [per_token_share_at(s, 10, 0.4) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert per_token_share_at(0, 100, 0.0) == 0.0  # no start phase: BatchTopK from the first step
    shares = [per_token_share_at(s, 1000, 0.5) for s in range(1000)]
    assert max(a - b for a, b in zip(shares, shares[1:])) <= 1 / 500 + 1e-12  # no jump anywhere
