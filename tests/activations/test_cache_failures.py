"""`cache` when things go wrong: disk full (fault-injected and a real tmpfs), a writer that cannot open its
file, a second run on the same --out, bad corpora, --tokens far beyond the corpus, too little free space."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cache_helpers import one_thread  # noqa: F401 (fixture)

from sae_toolkit import cli
from sae_toolkit.activations.cacher import CacheConfig, cache_activations
from sae_toolkit.activations.info import describe
from sae_toolkit.activations.lock import OutputLock
from sae_toolkit.activations.writer import Writer
from sae_toolkit.errors import RunFailure, SAEToolkitError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def config(out, **kw) -> CacheConfig:
    base = dict(model="tiny-llama", hookpoints=["mlp_out.1", "mlp_hidden.0"], dataset="builtin:pydoc",
                tokens=20 * 32, context_size=32, batch_size=3, device="cpu", out=str(out))
    return CacheConfig(**{**base, **kw})


def contents(path) -> dict:
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n_seqs"])
        return {"n_seqs": n, "tokens": f["tokens"][:n],
                **{name: dset[: n * 32] for name, dset in f["acts"].items()}}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


class FullDisk:
    """h5py raising ENOSPC, as on a full disk, from the n-th write to an acts/ dataset on (None: never)."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.calls = 0

    def fill_after(self, n: int | None) -> None:
        self.limit, self.calls = n, 0


@pytest.fixture
def disk(monkeypatch) -> FullDisk:
    state = FullDisk()
    real = h5py.Dataset.__setitem__

    def write(self, key, value):
        if self.name.startswith("/acts/") and state.limit is not None:
            state.calls += 1
            if state.calls >= state.limit:
                raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, error message = "
                                            "'No space left on device')")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", write)
    return state


def test_disk_full_stops_at_once_resumes_bit_identically(tmp_path, disk, capsys):
    out = tmp_path / "a.h5"
    disk.fill_after(2 * 3 + 1)  # 2 acts datasets per batch: batches 0-2 written, batch 3 fails on its 1st row
    with pytest.raises(RunFailure, match=rf"^disk full while writing {out} after 9 sequences .*--resume$") as e:
        cache_activations(config(out))
    assert "\n" not in str(e.value)
    status = describe(str(out))
    assert "INCOMPLETE: 9 of 20 sequences (45%)" in status and "stored:       9 sequences" in status
    got = contents(out)
    assert got["n_seqs"] == 9 and all(np.abs(got[k].astype(np.float32)).sum(1).min() > 0
                                      for k in ("acts/mlp_out.1", "acts/mlp_hidden.0") if k in got)
    assert not (tmp_path / "a.h5.lock").exists()

    disk.fill_after(None)  # space freed
    cache_activations(config(out, resume=True))
    assert "resuming" in capsys.readouterr().out
    cache_activations(config(tmp_path / "ref.h5"))
    assert_same(contents(out), contents(tmp_path / "ref.h5"))
    assert contents(out)["n_seqs"] == 20 and "status:       complete" in describe(str(out))


def test_disk_full_on_the_first_batch_leaves_no_file_and_exits_1(tmp_path, disk, capsys):
    out = tmp_path / "a.h5"
    disk.fill_after(1)
    argv = ["cache", "--model", "tiny-llama", "--hookpoint", "mlp_out.1", "--dataset", "builtin:pydoc",
            "--tokens", "640", "--context-size", "32", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: disk full while writing {out} after 0 sequences") and "\n" not in err
    assert not out.exists()  # it made the file and nothing in it counts: removed, not left "INCOMPLETE 0 of 20"


def test_writer_that_cannot_open_its_file_does_not_block(tmp_path):
    writer = Writer(tmp_path / "missing" / "a.h5")
    raised = []

    def feed():
        try:
            for seq in range(0, 100, 2):  # far more than the queue holds
                writer.put(seq, np.zeros((2, 4), np.int32), {})
        except RunFailure as e:
            raised.append(str(e))

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "put() blocked on a writer thread that had died"
    assert raised and "a.h5 failed after 0 sequences" in raised[0] and "No such file" in raised[0]
    writer.close()  # the error was already raised once: close does not repeat it, and does not hang


def test_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "a.h5"
    with OutputLock(out):
        with pytest.raises(RunFailure, match=f"{out} is being written by another `sae-toolkit cache` run"):
            cache_activations(config(out))
        argv = ["cache", "--model", "tiny-llama", "--hookpoint", "mlp_out.1", "--dataset", "builtin:pydoc",
                "--tokens", "640", "--context-size", "32", "--device", "cpu", "--out", str(out), "--resume"]
        assert cli.main(argv) == 1
        assert "being written by another" in capsys.readouterr().err
        assert not out.exists()
    assert not (tmp_path / "a.h5.lock").exists()  # released and removed
    cache_activations(config(out, tokens=64))  # free again
    assert contents(out)["n_seqs"] == 2


def test_tokens_far_beyond_the_corpus_leave_a_small_file(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("A short paragraph about caching.\n\n" * 300)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**50, 0, 2**50))
    path = cache_activations(config(tmp_path / "a.h5", dataset=str(corpus), tokens="100M", batch_size=8))
    assert "the corpus ran out" in capsys.readouterr().err
    n = contents(path)["n_seqs"]
    with h5py.File(path, "r") as f:
        assert f["tokens"].shape[0] == n and f["acts/mlp_out.1"].shape[0] == n * 32
    data = n * 32 * (4 + 2 * (64 + 128))
    # The datasets grew with the data: the file ends within one 1 MiB chunk per dataset of what it holds
    # (before, it was sized for 100M tokens: tens of GB, sparse).
    assert path.stat().st_size < data + 3 * 2**20 + 2**16, (path.stat().st_size, data)
    assert "complete (the corpus ran out" in describe(str(path))


def test_too_little_free_space_is_refused_before_starting(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(RunFailure, match=r"caching 6,400 tokens needs about 5\.4 MiB in .*, but only 1\.0 MiB "
                                         r"is free; free space, pick another --out or lower --tokens"):
        cache_activations(config(tmp_path / "a.h5", tokens="6400"))
    assert not (tmp_path / "a.h5").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "gives no window of 32 tokens"),
        ("   \n\n \t\n\n", "gives no window of 32 tokens"),
        ('{"text": "hello there"}\n{"text": \n', "line 2 is not a JSON object"),
        ('{"text": "hello there"}\n\xff\xfe\n', "line 2 is not a JSON object"),
    ],
)
def test_bad_corpus_is_one_line_and_leaves_no_file(tmp_path, content, message):
    corpus = tmp_path / ("c.jsonl" if content.startswith("{") else "c.txt")
    corpus.write_bytes(content.encode("latin-1"))
    with pytest.raises(SAEToolkitError, match=message):
        cache_activations(config(tmp_path / "a.h5", dataset=str(corpus)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [corpus.name]


def test_a_failed_resume_never_deletes_the_users_file(tmp_path, disk):
    out = tmp_path / "a.h5"
    cache_activations(config(out, tokens=3 * 32))  # a complete 3-sequence file
    with h5py.File(out, "r+") as f:
        f.attrs["n_seqs"] = 0  # as if its first run had been killed before committing anything
    disk.fill_after(1)
    with pytest.raises(RunFailure, match="disk full"):
        cache_activations(config(out, tokens=3 * 32, resume=True))
    assert out.exists()  # not made by this run: kept even though it holds nothing


# Runs inside `unshare -m` (its own mount namespace): one interpreter for every step, since startup dominates.
SCRIPT = textwrap.dedent("""
    import json, shutil, subprocess, sys
    from sae_toolkit import cli
    from sae_toolkit.activations import cacher
    from sae_toolkit.activations.info import describe

    mnt, args, report = sys.argv[1], sys.argv[2:], {}
    mount = lambda *opts: subprocess.run(["mount", *opts], check=True)
    mount("-t", "tmpfs", "-o", "size=512k", "tmpfs", mnt)
    real_check = cacher._check_free_space
    cacher._check_free_space = lambda *a: None  # as if another job filled the disk after the check passed
    report["rc1"] = cli.main(args + ["--out", mnt + "/a.h5"])
    report["info"] = describe(mnt + "/a.h5")
    mount("-o", "remount,size=4m", mnt)
    cacher._check_free_space = real_check
    report["rc2"] = cli.main(args + ["--out", mnt + "/a.h5", "--resume"])
    shutil.copy(mnt + "/a.h5", mnt + "/../resumed.h5")
    mount("-o", "remount,ro", mnt)
    report["rc3"] = cli.main(args + ["--out", mnt + "/b.h5"])
    subprocess.run(["umount", mnt], check=True)
    print(json.dumps(report))
""")


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe} && umount {probe}"],
                       capture_output=True)
    return r.returncode == 0


def test_real_full_tmpfs_then_resume_and_read_only(tmp_path):
    """The same on a real 1 MiB tmpfs (needs root and mount namespaces; the fault-injected tests above
    cover the logic everywhere else)."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs here (needs root and `unshare -m`)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["cache", "--model", "tiny-llama", "--hookpoint", "mlp_out.1", "--dataset", "builtin:pydoc",
            "--tokens", "8k", "--context-size", "32", "--batch-size", "8", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", SCRIPT, str(mnt), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]  # not 139 (the segfault this used to end in)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert report["rc1"] == 1 and errors[0].startswith("error: disk full while writing"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]
    n = int(errors[0].split(" after ")[1].split()[0])
    assert 0 < n < 250
    assert f"INCOMPLETE: {n} of 250 sequences" in report["info"]
    assert report["rc2"] == 0, r.stderr[-2000:]
    assert cli.main([*args, "--out", str(tmp_path / "ref.h5")]) == 0
    resumed, ref = contents(tmp_path / "resumed.h5"), contents(tmp_path / "ref.h5")
    assert resumed["n_seqs"] == 250
    assert_same(resumed, ref)
    assert report["rc3"] == 1 and "read-only filesystem" in errors[-1], errors
