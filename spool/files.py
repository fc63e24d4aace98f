"""Small files written whole: a reader sees the old content or the new, never part of it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically: written to ``<path>.tmp``, fsynced,
    then renamed over ``path``. The fsync comes first so that after a power loss the rename
    cannot have reached the disk before the bytes it names (an empty ``result.json``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Busy(RuntimeError):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class ProcessLock:
    """An exclusive, non-blocking flock on ``path`` for this process's lifetime or until
    ``release``; ``Busy`` names the holder (what it wrote: its PID and command). The kernel
    drops the lock when the holder dies, so a killed process never leaves a stale lock."""

    def __init__(self, path: str | Path, holder: str):
        import fcntl

        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise Busy(self.path, other) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        # The file stays: unlinking it would let a waiter lock an orphaned inode.
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
