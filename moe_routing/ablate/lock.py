"""One writer per output folder: an OS advisory lock (``flock``) on ``<folder>/.moe-ablate.lock``.

Two processes writing into the same folder would delete each other's in-flight temporaries (see
`checkpoint.remove_stale_temporaries`) and overwrite each other's files, so the second one stops at once instead.
The kernel drops a ``flock`` when its file is closed, which includes the death of the process (``kill -9`` too):
a lock file left behind never blocks the next run. The file holds the holder's pid, for the error message only;
it is never deleted (deleting it while another process waits on it would let two processes hold "the" lock).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not on Windows: no locking there
    fcntl = None

LOCK_NAME = ".moe-ablate.lock"


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock."""


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "folder") -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block; yields the lock file's path.

    Raises FolderInUseError, naming the folder and the holder's pid, if another process holds it (never
    waits). ``what`` names the folder in that message (e.g. "--out folder")."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise FolderInUseError(
                    f"{what} {folder} is in use by another moe-ablate process ({_holder(fd)}, lock file {path}); "
                    "wait for it to finish, stop it, or use another --out folder") from None
            except OSError as e:  # a filesystem without flock support: run, but unprotected
                print(f"moe-ablate: warning: cannot lock {path} ({e}); make sure no other process writes to "
                      f"{folder}", file=sys.stderr)
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield path
        finally:
            if locked:
                os.ftruncate(fd, 0)  # still held: no other process can have written its pid yet
    finally:
        os.close(fd)  # releases the lock
