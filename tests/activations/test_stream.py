"""ModelStream: the rows a cache of the same corpus holds, shuffled through a buffer, resumable to the row."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch
from _cache_helpers import one_thread  # noqa: F401  (fixture)

from sae_toolkit.activations.cacher import cache_activations
from sae_toolkit.activations.config import CacheConfig
from sae_toolkit.activations.stream import ModelStream, StreamConfig
from sae_toolkit.errors import SAEToolkitError

CTX = 32

pytestmark = pytest.mark.usefixtures("one_thread")


def stream_cfg(**kw) -> StreamConfig:
    base = dict(model="tiny-llama", dataset="builtin:pydoc", hookpoints=["mlp_out.1", "resid_post.0"],
                context_size=CTX, forward_batch=8, buffer_tokens=8 * CTX)
    return StreamConfig(**{**base, **kw})


def test_rows_are_the_cached_rows_shuffled_within_the_buffer(tmp_path: Path) -> None:
    cache_activations(CacheConfig(model="tiny-llama", hookpoints=["mlp_out.1", "resid_post.0"],
                                  dataset="builtin:pydoc", tokens=16 * CTX, context_size=CTX, batch_size=5,
                                  dtype="float32", device="cpu", out=str(tmp_path / "a.h5")))
    stream = ModelStream(stream_cfg(), batch_size=62, normalize=False)
    assert stream.buffer_windows == 8
    batches = [stream.next_batches() for _ in range(8)]  # 8 * 62 rows = 16 windows of 31 rows (BOS dropped)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        keep = f["tokens"][:16].reshape(-1) != 0
        cached = {hp: torch.from_numpy(f[f"acts/{hp}"][: 16 * CTX][keep]) for hp in ("mlp_out.1", "resid_post.0")}
    for buffer in range(2):  # each buffer's rows are exactly its windows' rows, in another order
        for hp, rows in cached.items():
            got = torch.cat([b[hp] for b in batches[4 * buffer:4 * buffer + 4]])
            want = rows[8 * 31 * buffer:8 * 31 * (buffer + 1)]
            dist = torch.cdist(got, want)  # the same multiset of rows (windows can repeat a row: no argmin test)
            assert len(got) == len(want) and dist.min(dim=1).values.max() < 2e-3
            assert dist.min(dim=0).values.max() < 2e-3
            assert (got - want).abs().max() > 1e-2  # shuffled
    # every hookpoint gets the same permutation: row i is the same token everywhere
    d1 = torch.cdist(batches[0]["mlp_out.1"], cached["mlp_out.1"][:248]) < 2e-3
    d2 = torch.cdist(batches[0]["resid_post.0"], cached["resid_post.0"][:248]) < 2e-3
    assert (d1 & d2).any(dim=1).all()


def test_resume_from_state_gives_the_same_batches() -> None:
    a = ModelStream(stream_cfg(hookpoints=["mlp_out.1"]), batch_size=100, seed=3)
    first = [a.next_batches()["mlp_out.1"] for _ in range(2)]
    state = a.state_dict()
    rest = [a.next_batches()["mlp_out.1"] for _ in range(5)]  # crosses into later buffers
    b = ModelStream(stream_cfg(hookpoints=["mlp_out.1"]), batch_size=100, seed=3)
    b.load_state_dict(state)
    for want in rest:
        assert torch.equal(b.next_batches()["mlp_out.1"], want)
    assert not torch.equal(first[0], rest[0])
    c = ModelStream(stream_cfg(hookpoints=["mlp_out.1"]), batch_size=50, seed=3)
    with pytest.raises(SAEToolkitError, match="batch_size was 100 and is now 50"):
        c.load_state_dict(state)


def test_ranks_see_disjoint_documents() -> None:
    cfg = stream_cfg(hookpoints=["mlp_out.1"])
    one = ModelStream(cfg, batch_size=31)
    ranks = [ModelStream(cfg, batch_size=31, rank=r, world_size=2) for r in range(2)]
    windows = [[w.tobytes() for _, w in zip(range(20), s._windows())] for s in (one, *ranks)]
    assert windows[1][0] == windows[0][0]  # document 0 is rank 0's
    assert not set(windows[1]) & set(windows[2])
    assert ranks[0].next_batches()["mlp_out.1"].shape == (31, 64)


@pytest.mark.parametrize("change, message", [
    ({"buffer_tokens": 0}, "buffer_tokens=0"),
    ({"forward_batch": 0}, "forward_batch=0"),
    ({"hookpoints": []}, "no hookpoint"),
    ({"dataset": ""}, "needs both --model and --dataset"),
])
def test_config_validation(change, message) -> None:
    with pytest.raises(SAEToolkitError, match=message):
        stream_cfg(**change)


def test_the_first_buffer_runs_once(monkeypatch) -> None:
    calls = []
    forward = ModelStream._forward
    monkeypatch.setattr(ModelStream, "_forward", lambda self, *a: calls.append(1) or forward(self, *a))
    stream = ModelStream(stream_cfg(hookpoints=["mlp_out.1"]), batch_size=62)
    for _ in range(4):  # one buffer of 8 windows = 248 rows = 4 batches
        stream.next_batches()
    assert len(calls) == 1
    stream.next_batches()
    assert len(calls) == 2


def _tokenizer_threads() -> set:
    """The live tokenizer prefetch threads (a stream another test dropped inside a reference cycle may still hold
    one until the garbage collector runs: the tests below look at the threads they started)."""
    import threading

    return {t for t in threading.enumerate() if t.name == "sae-cache-tokenizer" and t.is_alive()}


def test_close_joins_the_tokenizer_thread_mid_corpus(monkeypatch) -> None:
    """A stream closed mid-corpus leaves no tokenizer thread running: a daemon thread still inside native code at
    interpreter exit is ended by pthread_exit, which can abort the process."""
    monkeypatch.setattr("sae_toolkit.model.corpus._DOCS_PER_BATCH", 1)  # many small blocks: the queue fills up
    before = _tokenizer_threads()
    stream = ModelStream(stream_cfg(), batch_size=62, normalize=False)
    stream.next_batches()
    assert _tokenizer_threads() - before  # still tokenizing ahead, blocked on its full queue
    stream.close()
    assert not _tokenizer_threads() - before


def test_resuming_a_stream_ends_the_old_positions_tokenizer_thread(monkeypatch) -> None:
    monkeypatch.setattr("sae_toolkit.model.corpus._DOCS_PER_BATCH", 1)
    before = _tokenizer_threads()
    stream = ModelStream(stream_cfg(), batch_size=62, normalize=False)
    stream.next_batches()
    old = _tokenizer_threads() - before
    assert old
    stream.load_state_dict({**stream.state_dict(), "rows_done": 124})
    assert not old & _tokenizer_threads()  # joined, not left behind
    stream.next_batches()  # and the stream goes on from the new position, with a thread of its own
    assert _tokenizer_threads() - before - old
    stream.close()


def test_prefetch_joins_its_thread_when_the_consumer_stops_or_fails() -> None:
    from sae_toolkit.activations.cacher import _prefetch

    before = _tokenizer_threads()

    def endless():
        i = 0
        while True:
            i += 1
            yield i

    it = _prefetch(endless(), depth=2)
    assert next(it) == 1 and _tokenizer_threads() - before
    it.close()
    assert not _tokenizer_threads() - before

    def failing():
        yield 1
        raise ValueError("bad document")

    it = _prefetch(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad document"):
        next(it)
    assert not _tokenizer_threads() - before
