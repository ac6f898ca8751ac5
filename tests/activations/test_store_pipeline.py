"""ActivationStore's threads: the CUDA side-stream path run on CPU with stand-in CUDA calls, the worker threads'
torch thread count, shutdown mid-read."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import torch
from _trainer_helpers import one_torch_thread, write_acts  # noqa: F401

from sae_toolkit.activations.pairs import PairedActivationStore
from sae_toolkit.activations.store import ActivationStore

CTX, N_SEQS, D = 16, 24, 6


def _file(tmp_path, dtype: str):
    acts = np.random.default_rng(5).standard_normal((N_SEQS * CTX, D)).astype(np.float32) * 3
    acts[:, 0] = np.arange(N_SEQS * CTX)
    ids = np.arange(N_SEQS * CTX, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    return write_acts(tmp_path / "a.h5", {"hp": acts, "target": ids + 0.5}, context_size=CTX, dtype=dtype,
                      chunk_rows=16)


class _Event:
    """Stands in for a CUDA event; fails if its buffer is refilled while its copy may still be running."""

    def __init__(self) -> None:
        self.pending = False
        self.records = 0

    def record(self, stream: object) -> None:
        assert stream == "side"
        assert not self.pending, "ring buffer refilled before its previous copy was waited for"
        self.pending, self.records = True, self.records + 1

    def synchronize(self) -> None:
        self.pending = False


class _FakeCudaOps:
    """The store's CUDA calls on CPU: the 'device copy' is a clone, streams are names."""

    pin = False

    def __init__(self) -> None:
        self.events: list[_Event] = []
        self.copies = self.hand_overs = 0

    def stream(self) -> str:
        return "side"

    def event(self) -> _Event:
        self.events.append(_Event())
        return self.events[-1]

    def on(self, stream: str) -> contextlib.AbstractContextManager:
        assert stream == "side"
        return contextlib.nullcontext()

    def copy(self, buf: torch.Tensor) -> torch.Tensor:
        self.copies += 1
        return buf.clone()

    def hand_over(self, x: torch.Tensor, ready: _Event) -> None:
        assert isinstance(ready, _Event) and ready in self.events
        self.hand_overs += 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("paired", [False, True])
def test_side_stream_path_gives_the_host_path_batches(tmp_path, monkeypatch, dtype, paired):
    path = _file(tmp_path, dtype)
    kw = dict(batch_size=24, seed=9, block_rows=32, buffer_blocks=2, normalize=True, prefetch=1)

    def batches(in_memory: bool) -> list[torch.Tensor]:
        store = (PairedActivationStore(path, "hp", "target", in_memory=in_memory, **kw) if paired
                 else ActivationStore(path, "hp", in_memory=in_memory, **kw))
        with store:
            out = [store.next_batch() for _ in range(40)]  # ~3 passes; the ring of 3 buffers turns ~13 times
        return [torch.cat(b, dim=1) if paired else b for b in out]

    for in_memory in (False, True):
        host = batches(in_memory)
        fake = _FakeCudaOps()
        with monkeypatch.context() as m:
            m.setattr(ActivationStore, "_device_ops", lambda self, fake=fake: fake)
            side = batches(in_memory)
        assert all(torch.equal(a, b) for a, b in zip(host, side, strict=True)), in_memory
        assert all(b.dtype == torch.float32 for b in side)
        assert len(fake.events) == 3 and fake.hand_overs == 40
        assert fake.copies == sum(e.records for e in fake.events) >= 40  # prefetched batches too


def test_cpu_prefetch_thread_runs_torch_single_threaded_and_leaves_the_default(tmp_path):
    path = _file(tmp_path, "float16")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}
        store = ActivationStore(path, "hp", batch_size=24, block_rows=32)
        produce = store._produce_host

        def spy(rows_done, put, reader, finisher):
            seen["prefetch"] = torch.get_num_threads()
            seen["finisher"] = finisher.submit(torch.get_num_threads).result()
            return produce(rows_done, put, reader, finisher)

        store._produce_host = spy
        with store:
            store.next_batch()
            fresh = {}
            t = threading.Thread(target=lambda: fresh.setdefault("n", torch.get_num_threads()))
            t.start()
            t.join()
            assert seen == {"prefetch": 1, "finisher": 1}
            assert torch.get_num_threads() == 2 and fresh["n"] == 2  # the caller's and later threads' default
    finally:
        torch.set_num_threads(before)


def _store_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ActivationStore")]


def test_close_and_resume_mid_stream_stop_every_thread(tmp_path):
    path = _file(tmp_path, "float16")
    kw = dict(batch_size=8, block_rows=16, buffer_blocks=1, prefetch=2, seed=1)
    assert not _store_threads()
    with ActivationStore(path, "hp", **kw) as a:
        first = [a.next_batch() for _ in range(5)]
        assert sorted(t.split("_")[0] for t in _store_threads()) == [  # the prefetch thread, its reader, finisher
            "ActivationStore-finish", "ActivationStore-prefetch", "ActivationStore-read"]
        state = a.state_dict()
        a.load_state_dict(state)  # restarts the stream: the old threads are joined first
        assert len(_store_threads()) == 0
        again = [a.next_batch() for _ in range(30)]
    assert not _store_threads()
    with ActivationStore(path, "hp", **kw) as b:
        want = [b.next_batch() for _ in range(35)]
    assert all(torch.equal(x, y) for x, y in zip(first + again, want, strict=True))
