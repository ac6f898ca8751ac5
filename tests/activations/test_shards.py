"""Rank-sharded caching: shards joined by virtual datasets read exactly like a one-process cache; per-shard resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cache_helpers import one_thread  # noqa: F401  (fixture)
from _torchrun_helpers import assert_process_group_ended, torchrun_env

from sae_toolkit.activations.cacher import cache_activations
from sae_toolkit.activations.config import CacheConfig
from sae_toolkit.activations.info import describe
from sae_toolkit.activations.shards import join_shards, refuse_joined, shard_path, shard_windows
from sae_toolkit.activations.store import ActivationStore
from sae_toolkit.errors import SAEToolkitError

pytestmark = pytest.mark.usefixtures("one_thread")


def config(out: Path, **kw) -> CacheConfig:
    base = dict(model="tiny-llama", hookpoints=["mlp_out.1", "resid_post.0"], dataset="builtin:pydoc",
                tokens=23 * 32, context_size=32, batch_size=5, dtype="float32", device="cpu", out=str(out))
    return CacheConfig(**{**base, **kw})


def contents(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        n, ctx = int(f.attrs["n_seqs"]), int(f.attrs["context_size"])
        return {"tokens": f["tokens"][:n], **{k: v[: n * ctx] for k, v in f["acts"].items()}}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shard_windows_tile_the_range() -> None:
    ranges = [shard_windows(23, r, 4) for r in range(4)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 23
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("one") / "one.h5"
    cache_activations(config(out))
    return contents(out)


def cache_shards(out: Path, world: int) -> list[Path]:
    """Each rank's shard, cached in this process as `cache_distributed` would on that rank."""
    for r in range(world):
        lo, hi = shard_windows(23, r, world)
        cache_activations(config(shard_path(out, r, world), tokens=(hi - lo) * 32, first_window=lo))
    return [shard_path(out, r, world) for r in range(world)]


def test_joined_shards_equal_a_one_process_file(tmp_path: Path, one_process) -> None:
    out = tmp_path / "joined.h5"
    join_shards(out, cache_shards(out, 3), config(out))
    assert_same(contents(out), one_process)
    assert "complete" in describe(str(out))
    with ActivationStore(out, "mlp_out.1", batch_size=64, in_memory=False) as store:  # VDS: no chunks
        assert store.n_rows == 23 * 31 and store.next_batch().shape == (64, 64)
        assert store.sample(100).shape == (100, 64)


def test_torchrun_cache_resumes_a_killed_shard_and_equals_one_process(tmp_path: Path,
                                                                       one_process) -> None:
    shards = cache_shards(tmp_path / "acts.h5", 2)
    with h5py.File(shards[1], "r+") as f:  # rank 1's shard as a kill leaves it: 4 of its 12 windows committed
        f.attrs["n_seqs"] = 4
    env = torchrun_env(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sae_toolkit",
           "cache", "--model", "tiny-llama", "--hookpoint", "mlp_out.1", "--hookpoint", "resid_post.0",
           "--dataset", "builtin:pydoc", "--tokens", str(23 * 32), "--context-size", "32", "--batch-size", "5",
           "--dtype", "float32", "--device", "cpu", "--out", "acts.h5", "--resume"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming" in run.stdout and "after 4 of 12 sequences" in run.stdout
    assert "wrote activations to acts.h5" in run.stdout
    assert_process_group_ended(tmp_path)  # the cacher loaded the model after joining the group
    assert_same(contents(tmp_path / "acts.h5"), one_process)
    with pytest.raises(SAEToolkitError, match="joins 2 rank shards; resume it under torchrun"):
        refuse_joined(config(tmp_path / "acts.h5", resume=True))


def test_first_window_is_validated(tmp_path: Path) -> None:
    with pytest.raises(SAEToolkitError, match="first_window=-1"):
        config(tmp_path / "x.h5", first_window=-1)
