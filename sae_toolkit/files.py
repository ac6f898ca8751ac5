"""Output folders the toolkit owns: an ownership marker listing what it wrote, and whole-folder writes that appear
all at once (temporary sibling + rename), so a rerun replaces its own output and never touches anyone else's files.

    >>> with atomic_dir("report", "report") as tmp:  # doctest: +SKIP
    ...     (tmp / "metrics.json").write_text("{}")   # report/ appears (or is replaced) only when the block ends

Rules every command follows (DESIGN §2): an `--out` folder may be written when it is absent, empty, or holds a
marker of the same kind and nothing the marker does not list; anything else is refused with a one-line error.
`force=True` also accepts a folder an older sae-toolkit wrote before markers existed (recognised by its files),
and still refuses one holding files sae-toolkit did not write.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sae_toolkit import __version__
from sae_toolkit.errors import SAEToolkitError

MARKER = ".sae-toolkit-output.json"
"""The ownership marker: JSON {"written_by": "sae-toolkit", "kind", "version", "files": [relative paths]}."""

Legacy = Callable[[Path], bool]
"""Recognises a folder an older sae-toolkit wrote without a marker (every entry its own); used with force=True."""

_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"


def read_marker(folder: str | Path) -> dict | None:
    """The folder's marker, or None when it has none (or an unreadable one, which then proves nothing)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "sae-toolkit" or not isinstance(data.get("files"), list):
        return None
    return data


def write_marker(folder: str | Path, kind: str, files: Iterable[str] | None = None) -> Path:
    """Mark `folder` as sae-toolkit's `kind` output owning `files` (relative paths; a folder owns what is under
    it; a name with `*` is an fnmatch pattern). files=None lists every file now under the folder."""
    folder = Path(folder)
    if files is None:
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
                 if p.name != MARKER and (p.is_file() or p.is_symlink())]
    data = {"written_by": "sae-toolkit", "kind": kind, "version": __version__, "files": sorted(set(files))}
    tmp = folder / f"{MARKER}{_TMP_TAG}{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, folder / MARKER)
    return folder / MARKER


def foreign_entries(folder: str | Path) -> list[str]:
    """Paths under `folder` its marker does not claim (all of them without a marker), sorted, shallowest first.

    A listed sub-folder that carries its own marker is checked against that marker, so a file a user dropped
    into e.g. demo_out/report/ is still theirs."""
    folder = Path(folder)
    marker = read_marker(folder)
    listed = set(marker["files"]) if marker else set()
    patterns = {p for p in listed if "*" in p}
    owned = listed - patterns
    ancestors = {a for p in owned for a in _parents(p)}
    found: list[str] = []

    def walk(d: Path, prefix: str) -> None:
        for entry in sorted(d.iterdir(), key=lambda p: p.name):
            rel = prefix + entry.name
            if rel == MARKER or (prefix == "" and entry.name.startswith(MARKER + _TMP_TAG)):
                continue
            if any(fnmatch.fnmatchcase(rel, pat) for pat in patterns):
                continue
            if rel in owned:
                if entry.is_dir() and not entry.is_symlink() and read_marker(entry) is not None:
                    found.extend(f"{rel}/{p}" for p in foreign_entries(entry))
                continue
            if rel in ancestors and entry.is_dir() and not entry.is_symlink():
                walk(entry, rel + "/")
                continue
            found.append(rel + ("/" if entry.is_dir() and not entry.is_symlink() else ""))

    walk(folder, "")
    return found


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def check_out_dir(out: str | Path, kind: str, *, force: bool = False, legacy: Legacy | None = None,
                  flag: str = "--out") -> Path:
    """Refuse (one-line SAEToolkitError) to write `kind` output into `out` unless it is absent, empty, or
    sae-toolkit's own `kind` output with nothing else in it (force: also an unmarked older one `legacy` accepts).
    Returns `out` as an absolute path (a symlink resolved: the folder it points to is the one replaced)."""
    out = Path(os.path.realpath(out))
    _recover(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise SAEToolkitError(f"{flag} {out} is a file, not a folder; choose a folder path for {flag}")
    if not any(out.iterdir()):
        return out
    marker = read_marker(out)
    if marker is not None and marker.get("kind") != kind:
        raise SAEToolkitError(f"{flag} {out} holds a sae-toolkit {marker.get('kind')} output, not a {kind}; "
                              f"choose another {flag}")
    if marker is None:
        if force and legacy is not None and legacy(out):
            return out
        hint = (f" (it looks like an older sae-toolkit {kind}: pass --force to replace it)"
                if legacy is not None and legacy(out) else "")
        raise SAEToolkitError(f"{flag} {out} is not empty and was not written by sae-toolkit{hint}; choose a new or "
                              f"empty {flag} (sae-toolkit never overwrites files it did not write)")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SAEToolkitError(f"{flag} {out} holds files sae-toolkit did not write ({shown}); move them out or "
                              f"choose a new {flag} (sae-toolkit never deletes files it did not write)")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, kind: str, *, force: bool = False, legacy: Legacy | None = None,
               flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to write into; when the block ends without an error, mark it
    and put it in place of `out` in one step (an existing `out` must pass `check_out_dir`). On an error or a
    kill, `out` keeps its old complete contents and the temporary folder is dropped (or removed by the next run).
    """
    out = check_out_dir(out, kind, force=force, legacy=legacy, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}{_TMP_TAG}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # ours: a leftover of an earlier process with the same pid
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, kind)
        # Checked again right before the swap: files dropped into `out` while we worked stay the user's.
        check_out_dir(out, kind, force=force, legacy=legacy, flag=flag)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, dst: Path) -> None:
    """Put folder `new` in place of `dst` (absent, or a folder the caller owns), then delete the old contents.

    Linux swaps the two in one renameat2(RENAME_EXCHANGE) call, so a reader always sees the old or the new
    folder; elsewhere (or on file systems without it) two renames leave a microseconds-long gap, which
    `check_out_dir` repairs on the next run by renaming the old folder back."""
    new, dst = Path(new), Path(dst)
    if not dst.exists():
        os.replace(new, dst)
        return
    if not dst.is_dir() or dst.is_symlink():
        raise SAEToolkitError(f"{dst} is not a folder; choose a folder path")
    if not any(dst.iterdir()):
        dst.rmdir()
        os.replace(new, dst)
        return
    if _exchange(new, dst):
        shutil.rmtree(new)  # now the old contents
        return
    old = dst.with_name(f".{dst.name}{_OLD_TAG}{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)


def remove_owned(folder: str | Path, kind: str, *, force: bool = False, legacy: Legacy | None = None,
                 flag: str = "--out") -> None:
    """Delete `folder` after `check_out_dir` confirmed that every file in it is sae-toolkit's `kind` output."""
    folder = check_out_dir(folder, kind, force=force, legacy=legacy, flag=flag)
    if folder.exists():
        shutil.rmtree(folder)


def only_names(names: set[str], proof: Callable[[Path], bool] = lambda p: True) -> Legacy:
    """A Legacy check: every entry of the folder is one of `names` and `proof(folder)` holds."""
    def check(folder: Path) -> bool:
        return all(p.name in names for p in folder.iterdir()) and proof(folder)

    return check


def _recover(out: Path) -> None:
    """Finish what a process killed inside `replace_dir` or `atomic_dir` left: rename a complete old folder back
    when `out` is missing; delete temporary siblings whose process is gone (they hold only our own files)."""
    parent = out.parent
    if not parent.is_dir():
        return
    prefix = f".{out.name}"
    for sib in parent.iterdir():
        tag = sib.name[len(prefix):]
        if not sib.name.startswith(prefix) or not tag.startswith((_TMP_TAG, _OLD_TAG)):
            continue
        pid = tag[len(_TMP_TAG):]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if tag.startswith(_OLD_TAG) and not out.exists() and read_marker(sib) is not None:
            os.replace(sib, out)
        elif sib.is_dir() and not sib.is_symlink():
            shutil.rmtree(sib, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own temporary folder, in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
