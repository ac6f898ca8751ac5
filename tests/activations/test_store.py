"""ActivationStore: coverage per epoch, determinism, dtypes, normalization, resume position, errors."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
import torch
from _trainer_helpers import one_torch_thread, write_acts  # noqa: F401

from sae_toolkit.activations.store import ActivationStore
from sae_toolkit.errors import SAEToolkitError

CTX, N_SEQS, D = 16, 20, 4


def _indexed_file(tmp_path, **kw):
    """Column 0 of row r holds r, so batches say which rows they came from."""
    acts = np.random.default_rng(1).standard_normal((N_SEQS * CTX, D)).astype(np.float32)
    acts[:, 0] = np.arange(N_SEQS * CTX)
    return write_acts(tmp_path / "a.h5", {"mlp_out.0": acts}, context_size=CTX, **kw), acts


def _rows(batches):
    return torch.cat(batches)[:, 0].round().long().tolist()


@pytest.mark.parametrize("in_memory", [False, True])
def test_each_epoch_covers_every_non_bos_row_once(tmp_path, in_memory):
    path, _ = _indexed_file(tmp_path, chunk_rows=16, extra_rows=40)  # NaN rows past the data are never read
    store = ActivationStore(path, "mlp_out.0", batch_size=20, in_memory=in_memory, block_rows=32,
                            buffer_blocks=2)
    usable = sorted(r for r in range(N_SEQS * CTX) if r % CTX != 0)
    assert store.n_rows == len(usable) == 300
    epoch1 = _rows([store.next_batch() for _ in range(15)])
    epoch2 = _rows([store.next_batch() for _ in range(15)])
    store.close()
    assert sorted(epoch1) == usable and sorted(epoch2) == usable
    assert epoch1 != usable, "rows must be shuffled"
    assert epoch1 != epoch2, "each epoch gets a new shuffle"


def test_batches_span_epochs_without_dropping_rows(tmp_path, caplog):
    path, _ = _indexed_file(tmp_path)
    store = ActivationStore(path, "mlp_out.0", batch_size=70, block_rows=32)
    with caplog.at_level(logging.INFO, logger="sae_toolkit.activations.store"):
        rows = _rows([store.next_batch() for _ in range(9)])  # 630 rows = 2 epochs of 300 + 30
    store.close()
    assert [r.getMessage().split(" with")[0] for r in caplog.records] == [
        "acts/mlp_out.0: starting pass 2 over a.h5 (300 usable rows)",
        "acts/mlp_out.0: starting pass 3 over a.h5 (300 usable rows)"]
    assert sorted(rows[:300]) == sorted(rows[300:600])
    assert len(set(rows[:300])) == 300


def test_bos_kept_when_asked_and_seq_range(tmp_path):
    path, _ = _indexed_file(tmp_path)
    with ActivationStore(path, "mlp_out.0", batch_size=16, exclude_bos=False, seq_range=(5, 8)) as store:
        rows = _rows([store.next_batch() for _ in range(3)])
    assert sorted(rows) == list(range(5 * CTX, 8 * CTX))


def test_same_seed_same_stream_other_seed_other_stream(tmp_path):
    path, _ = _indexed_file(tmp_path)

    def stream(seed):
        with ActivationStore(path, "mlp_out.0", batch_size=32, seed=seed, block_rows=32) as s:
            return _rows([s.next_batch() for _ in range(12)])

    assert stream(3) == stream(3)
    assert stream(3) != stream(4)


def test_state_dict_resumes_the_exact_stream(tmp_path):
    path, _ = _indexed_file(tmp_path)
    kw = dict(batch_size=24, block_rows=32, buffer_blocks=2, seed=5)
    with ActivationStore(path, "mlp_out.0", **kw) as a:
        for _ in range(7):
            a.next_batch()
        state = a.state_dict()
        expected = _rows([a.next_batch() for _ in range(20)])  # crosses into the second epoch
    with ActivationStore(path, "mlp_out.0", **kw) as b:
        b.load_state_dict(state)
        assert _rows([b.next_batch() for _ in range(20)]) == expected
    with ActivationStore(path, "mlp_out.0", **{**kw, "batch_size": 12}) as c:
        with pytest.raises(SAEToolkitError, match="batch_size"):
            c.load_state_dict(state)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_files_are_read_exactly(tmp_path, dtype):
    acts = np.random.default_rng(0).standard_normal((N_SEQS * CTX, D)).astype(np.float32) * 3
    path = write_acts(tmp_path / "a.h5", {"hp": acts}, context_size=CTX, bos_token_id=None, dtype=dtype)
    with ActivationStore(path, "hp", batch_size=N_SEQS * CTX, in_memory=False) as store:
        got = store.next_batch()
    expected = torch.from_numpy(acts).to(getattr(torch, dtype)).float()
    # One epoch in one batch: the same rows, shuffled.
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
    assert got.dtype == torch.float32


def test_normalization_gives_mean_norm_sqrt_d(tmp_path):
    acts = np.random.default_rng(0).standard_normal((N_SEQS * CTX, 64)).astype(np.float32) * 7 + 2
    path = write_acts(tmp_path / "a.h5", {"hp": acts}, context_size=CTX)
    with ActivationStore(path, "hp", batch_size=100, normalize=True) as store:
        expected_scale = np.sqrt(64) / np.linalg.norm(acts[np.arange(len(acts)) % CTX != 0], axis=1).mean()
        assert store.scale == pytest.approx(expected_scale, rel=1e-5)  # the sample is every usable row here
        norms = store.next_batch().norm(dim=1)
        assert norms.mean().item() == pytest.approx(8.0, rel=0.05)
        raw = store.sample(50, seed=1, normalized=False)
        assert torch.allclose(store.sample(50, seed=1) / store.scale, raw)


def test_sample_is_deterministic_and_usable_rows_only(tmp_path):
    path, _ = _indexed_file(tmp_path)
    with ActivationStore(path, "mlp_out.0", batch_size=8, block_rows=32) as store:
        a, b = store.sample(100, seed=2), store.sample(100, seed=2)
        assert torch.equal(a, b) and a.shape == (100, D)
        rows = a[:, 0].round().long()
        assert (rows % CTX != 0).all() and len(set(rows.tolist())) == 100
        assert store.sample(10_000).shape == (300, D)


def test_error_hookpoint_missing_lists_present(tmp_path):
    path, _ = _indexed_file(tmp_path)
    with pytest.raises(SAEToolkitError, match=r"'resid_post.3' is not in .* holds: mlp_out.0"):
        ActivationStore(path, "resid_post.3", batch_size=8)


def test_error_not_the_format(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros((10, 3))
    with pytest.raises(SAEToolkitError, match="not a sae_toolkit activation file"):
        ActivationStore(plain, "x", batch_size=2)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SAEToolkitError, match="not a readable HDF5 file"):
        ActivationStore(text, "x", batch_size=2)
    with pytest.raises(SAEToolkitError, match="does not exist"):
        ActivationStore(tmp_path / "missing.h5", "x", batch_size=2)


@pytest.mark.parametrize("dtype,bad", [("float32", np.inf), ("float16", np.inf), ("float16", np.nan),
                                       ("bfloat16", -np.inf), ("bfloat16", np.nan)])
def test_error_non_finite_names_the_row(tmp_path, dtype, bad):
    acts = np.full((N_SEQS * CTX, D), 65504.0 if dtype == "float16" else 3e38, dtype=np.float32)  # finite maxima
    acts[3 * CTX + 5, 2] = bad
    path = write_acts(tmp_path / "a.h5", {"hp": acts}, context_size=CTX, dtype=dtype)
    with ActivationStore(path, "hp", batch_size=N_SEQS * (CTX - 1)) as store:
        with pytest.raises(SAEToolkitError, match=r"non-finite value in row 53 \(sequence 3, position 5\)"):
            store.next_batch()
    with pytest.raises(SAEToolkitError, match="row 53"):
        ActivationStore(path, "hp", batch_size=8, in_memory=True)


def test_error_fewer_rows_than_a_batch(tmp_path):
    path, _ = _indexed_file(tmp_path)
    with pytest.raises(SAEToolkitError, match="300 usable rows .* fewer than one batch of 301"):
        ActivationStore(path, "mlp_out.0", batch_size=301)
    with pytest.raises(SAEToolkitError, match="seq_range"):
        ActivationStore(path, "mlp_out.0", batch_size=8, seq_range=(3, 99))


def test_error_normalizing_all_zero_rows(tmp_path):
    path = write_acts(tmp_path / "z.h5", {"hp": np.zeros((N_SEQS * CTX, D), np.float32)}, context_size=CTX)
    with pytest.raises(SAEToolkitError, match="all zero; cannot normalize"):
        ActivationStore(path, "hp", batch_size=8, normalize=True)
    with ActivationStore(path, "hp", batch_size=8) as store:  # without normalization they are just data
        assert store.next_batch().abs().sum() == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rows_stay_in_the_file_dtype_until_the_batch_is_made(tmp_path, dtype):
    acts = np.random.default_rng(3).standard_normal((N_SEQS * CTX, D)).astype(np.float32) * 3
    path = write_acts(tmp_path / "a.h5", {"hp": acts}, context_size=CTX, dtype=dtype)
    batches = {}
    for in_memory in (True, False):
        with ActivationStore(path, "hp", batch_size=24, in_memory=in_memory, normalize=True, block_rows=32,
                             seed=5) as store:
            if in_memory:  # RAM holds the stored dtype: half the bytes of float32 for 16-bit files
                assert store._memory.itemsize == np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize
            batches[in_memory] = ([store.next_batch() for _ in range(12)], store.scale)  # > 1 epoch
    for in_memory, (bs, scale) in batches.items():
        have = {tuple(r) for r in (torch.from_numpy(acts).to(getattr(torch, dtype)).float() * scale).tolist()}
        assert all(b.dtype == torch.float32 and b.shape == (24, D) for b in bs)
        # every row is a (BOS-free) file row converted exactly, then scaled
        assert all(tuple(r) in have for b in bs for r in b.tolist()), in_memory


def test_auto_in_memory_follows_the_available_ram(tmp_path, monkeypatch):
    from sae_toolkit.activations import store as store_mod

    path, _ = _indexed_file(tmp_path, dtype="float16")
    n_bytes = (N_SEQS * CTX - N_SEQS) * D * 2  # BOS rows excluded, 2 bytes per value
    monkeypatch.setattr(store_mod, "available_ram", lambda: 2 * n_bytes)
    with ActivationStore(path, "mlp_out.0", batch_size=8, in_memory="auto") as s:
        assert s.in_memory
    monkeypatch.setattr(store_mod, "available_ram", lambda: 2 * n_bytes - 2)
    with ActivationStore(path, "mlp_out.0", batch_size=8, in_memory="auto") as s:
        assert not s.in_memory
    monkeypatch.undo()
    assert store_mod.available_ram() is None or store_mod.available_ram() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_side_stream_batches_equal_the_cpu_batches(tmp_path, dtype):
    path, _ = _indexed_file(tmp_path, dtype=dtype)
    got = {}
    for device in ("cpu", "cuda"):
        with ActivationStore(path, "mlp_out.0", batch_size=16, device=device, normalize=True, prefetch=2,
                             block_rows=32) as s:
            bs = [s.next_batch() for _ in range(40)]  # wraps the ring of pinned buffers many times
            torch.cuda.synchronize()
            got[device] = torch.stack([b.cpu() for b in bs])
            assert all(b.device.type == device and b.dtype == torch.float32 for b in bs)
    assert torch.equal(got["cpu"], got["cuda"])
