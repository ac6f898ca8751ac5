"""ActivationStore parity: the exact rows, order and values of the stream, against an independent reference, for
every way the store gathers rows (memory-mapped, h5py reads, in memory).

The reference below re-derives the stream from its definition (ActivationStore's docstring): blocks on a global
grid of `block_rows`, each epoch a seeded block permutation cut into groups of `buffer_blocks`, each group's usable
rows shuffled by a seeded permutation, batches consecutive slices across groups and epochs. Any change to how the
store reads, gathers, converts or prefetches must keep these tests green: a run resumed or repeated with the same
seed sees the same batches as before the change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _trainer_helpers import one_torch_thread, write_acts  # noqa: F401

from sae_toolkit.activations.pairs import PairedActivationStore
from sae_toolkit.activations.store import ActivationStore
from sae_toolkit.errors import SAEToolkitError

CTX, N_SEQS, D = 16, 24, 6


def reference_rows(keep: np.ndarray, row_start: int, *, block_rows: int, buffer_blocks: int, seed: int,
                   n: int) -> np.ndarray:
    """The first `n` file rows of the stream, from its definition alone. keep: usable flag of each row from
    `row_start`; buffer_blocks: the store's effective group size."""
    row_stop = row_start + len(keep)
    edges = list(range((row_start // block_rows + 1) * block_rows, row_stop, block_rows))
    bounds = [row_start, *edges, row_stop]
    blocks = [np.arange(lo, hi)[keep[lo - row_start:hi - row_start]] for lo, hi in zip(bounds[:-1], bounds[1:])]
    blocks = [b for b in blocks if len(b)]
    out: list[np.ndarray] = []
    epoch = 0
    while sum(map(len, out)) < n:
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        for g, i in enumerate(range(0, len(order), buffer_blocks)):
            rows = np.concatenate([blocks[b] for b in order[i:i + buffer_blocks]])
            out.append(rows[np.random.default_rng([seed, epoch, g]).permutation(len(rows))])
        epoch += 1
    return np.concatenate(out)[:n]


def _file(tmp_path, dtype: str, *, d: int = D, name: str = "hp", extra: dict | None = None):
    """Values with a fractional part (rounded by 16-bit dtypes) and column 0 = the row index (exact in every dtype
    for the small row counts here), so a batch says which rows it holds."""
    acts = np.random.default_rng(7).standard_normal((N_SEQS * CTX, d)).astype(np.float32) * 3
    acts[:, 0] = np.arange(N_SEQS * CTX)
    path = write_acts(tmp_path / "a.h5", {name: acts, **(extra or {})}, context_size=CTX, dtype=dtype,
                      chunk_rows=16)
    return path, acts


def _stored_as_float32(acts: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(acts).to(getattr(torch, dtype)).float()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize(("in_memory", "memory_map"), [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("normalize", [False, True])
def test_stream_rows_order_and_values_match_the_reference(tmp_path, dtype, in_memory, memory_map, normalize):
    path, acts = _file(tmp_path, dtype)
    seq_range = (3, 21)  # starts and ends mid-block: clipped first and last blocks
    kw = dict(batch_size=40, seed=11, block_rows=32, buffer_blocks=2, seq_range=seq_range)
    with ActivationStore(path, "hp", in_memory=in_memory, normalize=normalize, memory_map=memory_map, **kw) as store:
        assert store.memory_mapped == (memory_map and not in_memory)  # streaming: from the map, or h5py reads
        batches = [store.next_batch() for _ in range(25)]  # > 3 passes over 270 usable rows
        scale, group = store.scale, store.buffer_blocks
    keep = np.arange(seq_range[0] * CTX, seq_range[1] * CTX) % CTX != 0
    groups = len(keep) if in_memory else group  # in memory: one group holds every block
    want = reference_rows(keep, seq_range[0] * CTX, block_rows=32, buffer_blocks=groups, seed=11, n=25 * 40)
    got = torch.cat(batches)
    assert all(b.dtype == torch.float32 and b.shape == (40, D) for b in batches)
    expected = _stored_as_float32(acts, dtype)[torch.from_numpy(want)] * torch.tensor(scale, dtype=torch.float32)
    assert torch.equal(got, expected)  # same rows, same order, bit-identical values


def test_stream_matches_the_reference_after_resume_and_across_prefetch_depths(tmp_path):
    path, acts = _file(tmp_path, "float16")
    kw = dict(batch_size=24, seed=3, block_rows=32, buffer_blocks=3)
    keep = np.arange(N_SEQS * CTX) % CTX != 0
    with ActivationStore(path, "hp", prefetch=1, **kw) as a:
        want = reference_rows(keep, 0, block_rows=32, buffer_blocks=a.buffer_blocks, seed=3, n=60 * 24)
        first = torch.cat([a.next_batch() for _ in range(17)])
        state = a.state_dict()
    for prefetch in (1, 6):
        with ActivationStore(path, "hp", prefetch=prefetch, **kw) as b:
            b.load_state_dict(state)
            rest = torch.cat([b.next_batch() for _ in range(43)])
        assert torch.equal(torch.cat([first, rest])[:, 0].long(), torch.from_numpy(want)), prefetch


def test_paired_store_follows_the_same_stream(tmp_path):
    ids = np.arange(N_SEQS * CTX, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    path, acts = _file(tmp_path, "float16", extra={"target": ids + 0.5})
    kw = dict(batch_size=40, seed=2, block_rows=32, buffer_blocks=2, normalize=True)
    keep = np.arange(N_SEQS * CTX) % CTX != 0
    for in_memory, memory_map in ((False, True), (False, False), (True, True)):
        with PairedActivationStore(path, "hp", "target", in_memory=in_memory, memory_map=memory_map, **kw) as s:
            assert s.memory_mapped == (memory_map and not in_memory)
            pairs = [s.next_batch() for _ in range(20)]
            scale, target_scale, group = s.scale, s.target_scale, s.buffer_blocks
        want = torch.from_numpy(reference_rows(keep, 0, block_rows=32, buffer_blocks=group, seed=2, n=800))
        x = torch.cat([p.x for p in pairs])
        y = torch.cat([p.y for p in pairs])
        assert torch.equal(x, _stored_as_float32(acts, "float16")[want] * torch.tensor(scale, dtype=torch.float32))
        target = torch.from_numpy(ids[want.numpy()] + 0.5)  # exact in float16 at these sizes
        assert torch.equal(y, target * torch.tensor(target_scale, dtype=torch.float32))
        assert math.isfinite(scale) and scale != target_scale


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("memory_map", [True, False])
def test_finite_maxima_pass_and_the_bad_row_is_named_in_every_block(tmp_path, dtype, memory_map):
    big = {"float16": 65504.0, "bfloat16": 3.3e38, "float32": 3.4e38}[dtype]
    acts = np.full((N_SEQS * CTX, D), big, dtype=np.float32)  # sums overflow, yet every value is finite
    acts[::2] *= -1
    path = write_acts(tmp_path / "big.h5", {"hp": acts}, context_size=CTX, dtype=dtype, chunk_rows=16)
    with ActivationStore(path, "hp", batch_size=N_SEQS * (CTX - 1), block_rows=32, memory_map=memory_map) as store:
        assert torch.isfinite(store.next_batch()).all()
    for bad_row in (1, 33, N_SEQS * CTX - 1):
        acts2 = acts.copy()
        acts2[bad_row, D - 1] = np.nan
        path = write_acts(tmp_path / f"bad{bad_row}.h5", {"hp": acts2}, context_size=CTX, dtype=dtype,
                          chunk_rows=16)
        seq, pos = divmod(bad_row, CTX)
        with ActivationStore(path, "hp", batch_size=N_SEQS * (CTX - 1), block_rows=32,
                              memory_map=memory_map) as store:
            with pytest.raises(SAEToolkitError, match=rf"row {bad_row} \(sequence {seq}, position {pos}\)"):
                store.next_batch()


@pytest.mark.parametrize("memory_map", [True, False])
def test_batches_spanning_many_groups_keep_their_rows(tmp_path, memory_map):
    """With most positions excluded, a group holds fewer usable rows than a batch: a batch then gathers from many
    groups, and no group's buffer may be refilled before its rows are in the batch."""
    path, acts = _file(tmp_path, "float16")
    kw = dict(batch_size=8, seed=4, block_rows=32, buffer_blocks=1, exclude_first_positions=CTX - 1,
              memory_map=memory_map)
    with ActivationStore(path, "hp", **kw) as store:
        assert store.n_rows == N_SEQS and store.buffer_blocks == 1  # 2 usable rows per group: 4 groups a batch
        got = torch.cat([store.next_batch() for _ in range(12)])[:, 0].long()
    keep = np.arange(N_SEQS * CTX) % CTX == CTX - 1
    want = reference_rows(keep, 0, block_rows=32, buffer_blocks=1, seed=4, n=12 * 8)
    assert torch.equal(got, torch.from_numpy(want))
