"""Massive-activation positions: detected per position, excluded from training batches and from every number and
example of the analysis alike, with counts reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _report_helpers import write_acts

from sae_toolkit.activations.outliers import outlier_positions
from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.activations.store import ActivationStore
from sae_toolkit.analysis.report import build_report
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAEConfig, make_sae

CTX, D = 16, 8


def sink_file(path, n_seqs=32, sink=1, factor=30.0):
    """Random activations with position `sink` of every window `factor` × larger (an attention sink)."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n_seqs * CTX, D)).astype(np.float32)
    acts.reshape(n_seqs, CTX, D)[:, sink] *= factor
    tokens = rng.integers(3, 40, size=(n_seqs, CTX))
    tokens[:, 0] = 0  # BOS
    return write_acts(path, acts.reshape(n_seqs, CTX, D), tokens, hookpoint="hp"), acts


def test_detects_the_sink_and_the_first_positions(tmp_path):
    path, _ = sink_file(tmp_path / "a.h5")
    import h5py

    with h5py.File(path) as f:
        found = outlier_positions(f["acts/hp"], CTX, (0, 32))
        assert np.flatnonzero(found).tolist() == [1]
        first = outlier_positions(f["acts/hp"], CTX, (0, 32), multiple=None, first=3)
        assert np.flatnonzero(first).tolist() == [0, 1, 2]
        assert not outlier_positions(f["acts/hp"], CTX, (0, 32), multiple=0).any()
        with pytest.raises(SAEToolkitError, match="exclude_first_positions=16"):
            outlier_positions(f["acts/hp"], CTX, (0, 32), first=16)


def test_store_never_serves_outlier_rows(tmp_path):
    path, acts = sink_file(tmp_path / "a.h5")
    store = ActivationStore(path, "hp", batch_size=64, outlier_multiple=5.0, in_memory=True)
    try:
        assert np.flatnonzero(store.excluded_positions).tolist() == [1]
        assert store.n_outlier_rows == 32  # one per window (position 0 is BOS, excluded anyway)
        assert store.n_rows == 32 * (CTX - 2)
        big = float(np.linalg.norm(acts.reshape(32, CTX, D)[:, 1], axis=1).min())
        for _ in range(10):
            assert store.next_batch().norm(dim=1).max() < big
    finally:
        store.close()


def test_report_uses_one_exclusion_set_for_metrics_and_examples(tmp_path):
    path, _ = sink_file(tmp_path / "a.h5")
    sae = make_sae(SAEConfig(arch="relu", d_in=D, d_sae=16, hookpoint="hp"))
    sae_dir = sae.save(tmp_path / "sae")
    out = build_report(sae_dir, acts=path, out=tmp_path / "rep", top_k=5, device="cpu")
    m = json.loads((out / "metrics.json").read_text())
    assert m["excluded_positions"] == [1]
    assert m["excluded_tokens"] == {"special_tokens": 32, "outlier_positions": 32}
    assert m["tokens"] == 32 * (CTX - 2)
    with ActsReader(path, tokenizer=None) as r:
        assert r.keep_mask(torch.tensor([[0] + [5] * (CTX - 1)])).tolist() == [[False, False] + [True] * (CTX - 2)]
    # no example sits at an excluded position, and every latent's max activation is its best example
    for line in (out / "top_activations.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for ex in rec["examples"]:
            assert ex["position"] not in (0, 1)
        if rec["examples"]:
            assert rec["max_activation"] == pytest.approx(max(ex["activation"] for ex in rec["examples"]), rel=1e-5)
