"""The toolkit's error classes: a message for people (what was wrong, the bad value, what to do)."""

from pathlib import Path


class SAEToolkitError(Exception):
    """Raised for bad input or state the user can fix. The CLI prints it as one line, without a traceback."""

    exit_code = 2
    """CLI exit status: 2, a usage error (bad arguments or input files)."""


class RunFailure(SAEToolkitError):
    """A run that failed for a reason outside its arguments: disk full, no permission, a lock held by another run."""

    exit_code = 1
    """CLI exit status: 1, a runtime failure."""


def failure_message(error: BaseException, out: str | None = None) -> tuple[str, int]:
    """(one-line message, CLI exit status) for an exception no specific check turned into an SAEToolkitError.

    OSError (h5py's included: its messages carry ``errno = N`` and ``name = '...'``) names the path and the
    fix by errno; MemoryError and torch's OutOfMemoryError say what to shrink; a refused pickle says why.
    Errors of other classes that carry an OS error (safetensors' ``(os error 28)``) count as that OSError.
    ``out`` (the command's --out) names the place when the error does not.
    Anything else is an unexpected failure: its type and first line, and how to see the traceback.
    """
    import errno
    import pickle
    import re

    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, SAEToolkitError):
        return str(error), error.exit_code
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return (f"out of memory ({first}); lower --batch-size, --tokens or --n-features/--expansion, "
                "or use a machine with more memory"), 1
    if isinstance(error, pickle.UnpicklingError):
        return (f"refused to unpickle a file ({first}); pickles can run code — use safetensors files "
                "from a source you trust"), 1
    found = re.search(r"errno = (\d+)|\(os error (\d+)\)|\[Errno (\d+)\]", text)
    if isinstance(error, OSError) or found:
        code = getattr(error, "errno", None)
        if code is None and found:
            code = int(next(g for g in found.groups() if g))
        name = re.search(r"(?:file )?name = '([^']*)'", text)
        path = getattr(error, "filename", None) or (name.group(1) if name else None)
        where = path or out or "a file"
        fixes = {
            errno.ENOSPC: f"disk full writing {where}; free space or pick an --out on another disk, then rerun "
                          "(cache and train continue with --resume)",
            errno.EROFS: f"{where} is on a read-only filesystem; pick an --out on a writable disk",
            errno.EACCES: f"permission denied for {where}; pick an --out you can write to or fix its permissions",
            errno.EPERM: f"operation not permitted on {where}; pick an --out you own or fix its permissions",
            errno.EEXIST: f"{where} already exists; pick another --out (nothing there was changed)",
            errno.ENOTDIR: f"{where}: {_file_on_path(path)} is a regular file, not a folder; pick an --out "
                           "whose parents are folders",
            errno.EISDIR: f"{where} is a folder where a file is needed; give a file path",
            errno.ENOENT: f"{where} does not exist; check the path",
        }
        if code == errno.EEXIST and path and Path(path).is_file():  # mkdir of an --out parent that is a file
            fixes[code] = f"{where} is a file where a folder is needed; pick another --out (nothing was changed)"
        if code in fixes:
            return fixes[code], 1
        return f"cannot use {where}: {first}; check the path, its permissions and the disk", 1
    return f"unexpected {type(error).__name__}: {first} (rerun with --debug for the traceback)", 1


def _file_on_path(path: str | None) -> str:
    """The first part of ``path`` that is a regular file (where a folder was needed), else "a part of it"."""
    if path:
        for part in reversed(Path(path).parents):
            if part.is_file():
                return str(part)
    return "a part of it"
