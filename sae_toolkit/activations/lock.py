"""The lock that keeps two `cache` runs off one output file: ``<out>.lock`` held with flock while a run writes."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sae_toolkit.errors import RunFailure


class OutputLock:
    """An exclusive, non-blocking lock on ``<out>.lock``; a second holder gets a one-line RunFailure.

    flock locks die with their process, so a killed run leaves no stale lock, only the empty lock file,
    which the next run reuses. The file is removed on release (it is the toolkit's own); a run that raced
    the removal sees its lock file replaced and locks the new one, so two holders never coexist.

        >>> with OutputLock(Path("acts.h5")):  # doctest: +SKIP
        ...     ...  # write acts.h5
    """

    def __init__(self, out: Path) -> None:
        """out: the file to protect; the lock is its sibling ``<name>.lock``."""
        self.path = out.with_name(out.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise a RunFailure naming the busy file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                out = self.path.with_name(self.path.name.removesuffix(".lock"))
                raise RunFailure(
                    f"{out} is being written by another `sae-toolkit cache` run (it holds {self.path}); "
                    "wait for it to finish or pick another --out"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # the previous holder removed it between our open and our lock
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, so a waiting run locks a fresh file)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
