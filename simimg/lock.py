"""One writer per index: an OS file lock that a crash or kill -9 releases by itself."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from simimg.errors import SimimgError

_held: set[int] = set()


@contextmanager
def writer_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock for the block, or fail at once naming the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SimimgError(f"{what} is busy: {_holder(fd)} is writing it; wait for it to finish or stop it") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _held.add(fd)
        yield
    finally:
        _held.discard(fd)
        os.close(fd)


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock; it must not keep it alive after its parent is killed."""
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {info['pid']} on {info['host']} ({info['command']!r}, since {info['started']})"
    except (ValueError, KeyError):
        return "another process"
