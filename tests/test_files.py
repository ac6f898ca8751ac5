"""sae_toolkit.files: ownership markers and all-at-once folder writes (never touching files we did not write)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.files import (
    MARKER,
    atomic_dir,
    check_out_dir,
    foreign_entries,
    only_names,
    read_marker,
    remove_owned,
    write_marker,
)


def _tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_empty_and_own_folders_are_writable_others_are_refused(tmp_path):
    check_out_dir(tmp_path / "new", "report")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", "report")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SAEToolkitError, match="is a file"):
        check_out_dir(tmp_path / "file", "report")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "cfg.json").write_text("{}")
    with pytest.raises(SAEToolkitError, match="not empty and was not written by sae-toolkit"):
        check_out_dir(theirs, "report")
    with pytest.raises(SAEToolkitError, match="not empty and was not written"):  # force needs a recognised folder
        check_out_dir(theirs, "report", force=True)
    with atomic_dir(tmp_path / "ours", "report") as tmp:
        (tmp / "a.txt").write_text("a")
    assert read_marker(tmp_path / "ours")["files"] == ["a.txt"]
    check_out_dir(tmp_path / "ours", "report")
    with pytest.raises(SAEToolkitError, match="holds a sae-toolkit report output, not a saelens-export"):
        check_out_dir(tmp_path / "ours", "saelens-export")
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    with pytest.raises(SAEToolkitError, match=r"holds files sae-toolkit did not write \(notes.txt\)"):
        check_out_dir(tmp_path / "ours", "report", force=True)
    with pytest.raises(SAEToolkitError, match="did not write"):
        remove_owned(tmp_path / "ours", "report", force=True)
    assert (tmp_path / "ours" / "notes.txt").read_text() == "mine"


def test_rewrite_replaces_every_old_file_and_keeps_nothing_stale(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "report") as tmp:
        for i in range(6):
            (tmp / "b").mkdir(exist_ok=True)
            (tmp / "b" / f"batch-{i}.json").write_text(str(i))
    with atomic_dir(out, "report") as tmp:
        (tmp / "b").mkdir()
        (tmp / "b" / "batch-0.json").write_text("new")
    assert _tree(out) == {"b/batch-0.json": b"new", MARKER: (out / MARKER).read_bytes()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


def test_an_error_inside_the_block_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "export") as tmp:
        (tmp / "cfg.json").write_text("old")
    before = _tree(out)
    with pytest.raises(RuntimeError), atomic_dir(out, "export") as tmp:
        (tmp / "cfg.json").write_text("half")
        raise RuntimeError("disk full")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigkill_inside_the_block_keeps_the_old_folder_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "report") as tmp:
        (tmp / "metrics.json").write_text("old")
    before = _tree(out)
    code = (f"import os, signal\nfrom sae_toolkit.files import atomic_dir\n"
            f"with atomic_dir({str(out)!r}, 'report') as tmp:\n"
            f"    (tmp / 'metrics.json').write_text('new')\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -9
    assert _tree(out) == before
    left = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert len(left) == 1 and left[0].startswith(".out.tmp-")  # the killed process's half-written folder
    check_out_dir(out, "report")  # the next run removes it (its process is gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_the_two_fallback_renames_is_repaired(tmp_path):
    # Where renameat2 is unavailable, replace_dir renames out aside first; a kill right then leaves only .out.old-PID.
    out = tmp_path / "out"
    with atomic_dir(out, "report") as tmp:
        (tmp / "metrics.json").write_text("old")
    before = _tree(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.replace(out, tmp_path / f".out.old-{int(dead.stdout)}")
    check_out_dir(out, "report")
    assert _tree(out) == before


def test_nested_markers_and_patterns(tmp_path):
    demo = tmp_path / "demo"
    (demo / "run").mkdir(parents=True)
    write_marker(demo, "demo", ["acts.h5", "acts.h5*", "run"])
    write_marker(demo / "run", "run", ["metrics.jsonl", "checkpoints"])
    (demo / "acts.h5").write_text("")
    (demo / "acts.h5.lock").write_text("")
    (demo / "run" / "checkpoints" / "step_1").mkdir(parents=True)
    (demo / "run" / "metrics.jsonl").write_text("")
    assert foreign_entries(demo) == []
    (demo / "run" / "notes.txt").write_text("mine")
    (demo / "mine").mkdir()
    assert foreign_entries(demo) == ["mine/", "run/notes.txt"]


def test_only_names_recognises_older_outputs(tmp_path):
    legacy = only_names({"cfg.json", "w"}, lambda d: json.loads((d / "cfg.json").read_text()).get("ours", False))
    old = tmp_path / "old"
    old.mkdir()
    (old / "cfg.json").write_text('{"ours": true}')
    with pytest.raises(SAEToolkitError, match="pass --force to replace it"):
        check_out_dir(old, "export", legacy=legacy)
    check_out_dir(old, "export", force=True, legacy=legacy)
    (old / "cfg.json").write_text('{"ours": false}')  # a folder someone else wrote with the same names
    with pytest.raises(SAEToolkitError, match="not written by sae-toolkit; choose"):
        check_out_dir(old, "export", force=True, legacy=legacy)


def test_a_symlinked_out_is_written_through(tmp_path):
    target = tmp_path / "target"
    with atomic_dir(target, "report") as tmp:
        (tmp / "a").write_text("1")
    (tmp_path / "link").symlink_to(target)
    with atomic_dir(tmp_path / "link", "report") as tmp:
        (tmp / "a").write_text("2")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "a").read_text() == "2"
