"""Small file-system helpers: atomic writes, so a crash never leaves a half-written file behind."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simimg.faults import publish_step


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer; on success fsync it and rename it over `path`.

    On an exception the temporary file is removed and the old `path` stays as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        publish_step(f"{path.name} written")
        os.replace(tmp, path)
        publish_step(f"{path.name} in place")
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """`path` becomes a copy of `source` in one step: a hard link when the file system allows, else a real copy."""
    with atomic_target(path) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def size_and_mtime(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, what tells a changed file from a kept one; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
