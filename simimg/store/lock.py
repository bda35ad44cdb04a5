"""One writer per index: an OS file lock that a crash or kill -9 releases by itself."""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simimg.errors import SimimgError

log = logging.getLogger(__name__)

_held: set[int] = set()


@contextmanager
def writer_lock(path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock for the block; when another process holds it, fail at once naming it, or with `wait`, wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise SimimgError(
                    f"{what} is busy: {_holder(fd)} is writing it; wait for it to finish or stop it"
                ) from None
            log.warning("%s is busy: waiting for %s to finish", what, _holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
        }
        _close_in_forked_children()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _held.add(fd)
        yield
    finally:
        _held.discard(fd)
        os.close(fd)


@functools.cache
def _close_in_forked_children() -> None:
    """Registered on first use, not at import: a forked child (a DataLoader worker) shares the lock and must not
    keep it alive after its parent is killed."""
    os.register_at_fork(after_in_child=_close_in_child)


def _close_in_child() -> None:
    for fd in _held:
        os.close(fd)
    _held.clear()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {info['pid']} on {info['host']} ({info['command']!r}, since {info['started']})"
    except (ValueError, KeyError):
        return "another process"
