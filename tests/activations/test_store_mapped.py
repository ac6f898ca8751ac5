"""The memory-mapped streaming path (activations.mapped): which files it serves, the fallback to h5py reads for the
others (same batches either way), the file left untouched, and the recycled float32 batches."""

from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np
import pytest
import torch
from _trainer_helpers import one_torch_thread, write_acts  # noqa: F401

from sae_toolkit.activations.mapped import MappedDataset
from sae_toolkit.activations.pairs import PairedActivationStore
from sae_toolkit.activations.store import ActivationStore, _Recycled
from sae_toolkit.errors import SAEToolkitError

CTX, N_SEQS, D = 16, 24, 6
KW = dict(batch_size=40, seed=5, block_rows=32, buffer_blocks=2, normalize=True)


def _acts() -> np.ndarray:
    acts = np.random.default_rng(3).standard_normal((N_SEQS * CTX, D)).astype(np.float32)
    acts[:, 0] = np.arange(N_SEQS * CTX)  # says which row a batch row is
    return acts


def _batches(path, n: int = 20, **kw) -> tuple[torch.Tensor, bool]:
    with ActivationStore(path, "hp", **{**KW, **kw}) as store:
        return torch.cat([store.next_batch() for _ in range(n)]), store.memory_mapped


def _rewrite(src, dst, **create) -> None:
    """`src` copied to `dst` with acts/hp re-created by `create_dataset(**create)` (attrs kept)."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w", userblock_size=create.pop("userblock_size", 0)) as b:
        b.attrs.update(a.attrs)
        b.create_dataset("tokens", data=a["tokens"][:])
        ds = b.create_dataset("acts/hp", data=a["acts/hp"][:], **create)
        ds.attrs.update(a["acts/hp"].attrs)


@pytest.mark.parametrize(("layout", "mapped"), [
    (dict(chunks=(16, D)), True),                       # the cacher's layout: whole-row chunks
    (dict(), True),                                     # contiguous
    (dict(chunks=(16, D), userblock_size=512), True),   # a user block before the HDF5 data
    (dict(chunks=(16, D), compression="gzip"), False),  # compressed: h5py decompresses
    (dict(chunks=(16, D), shuffle=True), False),        # any filter
    (dict(chunks=(16, 3)), False),                      # chunks split rows
])
def test_layouts_map_or_fall_back_with_the_same_batches(tmp_path, layout, mapped):
    base = write_acts(tmp_path / "base.h5", {"hp": _acts()}, context_size=CTX, dtype="float16", chunk_rows=16)
    want, _ = _batches(base, memory_map=False)
    _rewrite(base, tmp_path / "x.h5", **layout)
    got, was_mapped = _batches(tmp_path / "x.h5")
    assert was_mapped == mapped
    assert torch.equal(got, want)


def test_unmappable_datasets_say_why(tmp_path):
    with h5py.File(tmp_path / "u.h5", "w") as f:
        f.create_dataset("empty", shape=(64, D), dtype=np.float16, chunks=(16, D))  # no chunk written
        f.create_dataset("big_endian", data=np.ones((64, D), ">f2"), chunks=(16, D))
        f.create_dataset("zipped", data=np.ones((64, D), np.float16), chunks=(16, D), compression="gzip")
        f.create_dataset("ok", data=np.ones((64, D), np.float16), chunks=(16, D))
    with h5py.File(tmp_path / "u.h5", "r") as f:
        whys = {n: MappedDataset.open(f[n], tmp_path / "u.h5", (0, 64))[1] for n in f}
    assert "not allocated" in whys["empty"] and "byte order" in whys["big_endian"]
    assert "compressed" in whys["zipped"] and whys["ok"] == ""


def test_mapped_rows_match_h5py_for_every_chunk_and_piece(tmp_path):
    acts = _acts()
    path = write_acts(tmp_path / "a.h5", {"hp": acts}, context_size=CTX, dtype="bfloat16", chunk_rows=16)
    with h5py.File(path, "r") as f:
        dset = f["acts/hp"]
        m, why = MappedDataset.open(dset, path, (5, 300))
        assert why == "" and m is not None
        rows = np.arange(5, 300)
        got = m.rows_view(2).index_select(0, torch.from_numpy(m.offsets(rows) // 2)).numpy().view(np.uint16)
        assert np.array_equal(got, dset[5:300])  # bfloat16 is stored as uint16 bits
        pieces = list(m.pieces(5, 300))
        assert [p[0] for p in pieces] == [5, *range(16, 300, 16)]  # one piece per chunk, clipped at both ends
        assert np.array_equal(np.concatenate([p[1] for p in pieces]), dset[5:300])
        with pytest.raises(ValueError, match="unit 16"):
            m.rows_view(16)  # wider than any alignment


def test_streaming_never_writes_the_file(tmp_path):
    path = write_acts(tmp_path / "a.h5", {"hp": _acts()}, context_size=CTX, dtype="float16", chunk_rows=16)
    os.chmod(path, 0o444)  # a file the toolkit did not write may be read-only: mapping it must still work
    before = (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns)
    got, mapped = _batches(path, n=30)
    assert mapped and torch.isfinite(got).all()
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns) == before


def test_paired_store_maps_both_and_names_a_bad_target_row(tmp_path):
    acts = _acts()
    target = np.random.default_rng(1).standard_normal((N_SEQS * CTX, 3)).astype(np.float32)
    target[77, 2] = np.inf
    path = write_acts(tmp_path / "p.h5", {"hp": acts, "t": target}, context_size=CTX, dtype="float16",
                      chunk_rows=16)
    with PairedActivationStore(path, "hp", "t", batch_size=N_SEQS * (CTX - 1), block_rows=32) as store:
        assert store.memory_mapped
        assert store._unit == 2  # a batch row is 6 + 3 float16 = 18 bytes: gathered in 2-byte elements
        with pytest.raises(SAEToolkitError, match=r"acts/t in .* row 77 \(sequence 4, position 13\)"):
            store.next_batch()


def test_recycled_arrays_come_back_only_when_no_tensor_uses_them():
    pool = _Recycled((4, 3), cap=2)
    a = pool.take()
    view = a[:, :2]  # a consumer may keep only a view (PairedActivationStore's Pair does)
    del a
    b = pool.take()
    assert b.data_ptr() != view.data_ptr()
    ptr_b = b.data_ptr()
    del b
    assert pool.take().data_ptr() == ptr_b  # dropped: reused
    del view
    c, d = pool.take(), pool.take()
    assert {c.data_ptr(), d.data_ptr()} == {x.ctypes.data for x in pool._arrays}
    e = pool.take()  # both pooled arrays in use and the pool full: a fresh, unpooled array
    assert len(pool._arrays) == 2 and e.data_ptr() not in (c.data_ptr(), d.data_ptr())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_held_batches_are_never_rewritten(tmp_path, dtype):
    path = write_acts(tmp_path / "a.h5", {"hp": _acts()}, context_size=CTX, dtype=dtype, chunk_rows=16)
    with ActivationStore(path, "hp", **{**KW, "prefetch": 2}) as store:
        held = [store.next_batch() for _ in range(12)]  # more than the pool keeps
        kept = [b.clone() for b in held]
        for _ in range(40):
            store.next_batch()  # dropped right away: their arrays are reused
        assert all(torch.equal(a, b) for a, b in zip(held, kept, strict=True))


def test_blocks_are_checked_once_then_only_paged_in(tmp_path, monkeypatch):
    path = write_acts(tmp_path / "a.h5", {"hp": _acts()}, context_size=CTX, dtype="float16", chunk_rows=16)
    checked, paged = [], []
    monkeypatch.setattr(ActivationStore, "_check_finite", lambda self, rows, lo, name=None: checked.append(lo))
    monkeypatch.setattr(MappedDataset, "will_need", lambda self, lo, hi: paged.append(lo))
    with ActivationStore(path, "hp", **{**KW, "prefetch": 1, "normalize": False}) as store:  # no sample() reads
        n_blocks = len(store._blocks)
        for _ in range(3 * store.n_rows // store.batch_size):  # three passes
            store.next_batch()
        assert store._checked.all()
    # one check per chunk piece of each block, the first pass only; later groups are only paged in
    assert len(checked) == N_SEQS * CTX // 16 and sorted(set(checked)) == list(range(0, N_SEQS * CTX, 16))
    assert len(paged) >= n_blocks


def test_wrong_chunk_addresses_fall_back_instead_of_serving_wrong_rows(tmp_path, monkeypatch):
    import sae_toolkit.activations.mapped as mapped

    path = write_acts(tmp_path / "a.h5", {"hp": _acts()}, context_size=CTX, dtype="float16", chunk_rows=16)
    want, _ = _batches(path, memory_map=False)
    chunks = mapped._chunks
    # an HDF5 library reporting addresses off by a row (e.g. without a user block): caught by the spot check
    monkeypatch.setattr(mapped, "_chunks", lambda dset: ((f, a - D * 2, n) for f, a, n in chunks(dset)))
    with h5py.File(path, "r") as f:
        assert "differ from h5py" in MappedDataset.open(f["acts/hp"], path, (0, N_SEQS * CTX))[1]
    got, was_mapped = _batches(path)
    assert not was_mapped and torch.equal(got, want)
