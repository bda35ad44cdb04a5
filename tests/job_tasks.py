"""Functions the job tests run in child processes (a real child needs importable functions, not lambdas)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from simimg.errors import SimimgError


def count(n: int, progress: Callable[[int, int], None]) -> int:
    for i in range(1, n + 1):
        progress(i, n)
    return os.getpid()


def wait_for(path: str, progress: Callable[[int, int], None]) -> str:
    while not Path(path).exists():
        time.sleep(0.05)
    return "released"


def user_error() -> None:
    raise SimimgError("no images found in x")


def bug() -> None:
    return 1 / 0


def die() -> None:
    os._exit(3)


def steps(names: list[str], progress: Callable[[int, int], None], on_phase: Callable[[str], None]) -> list[str]:
    """Report each step, then a little progress within it, slowly enough for a poller to see them."""
    for name in names:
        on_phase(name)
        for i in range(1, 3):
            progress(i, 2)
            time.sleep(0.05)
    return names


def heavy_modules() -> list[str]:
    """Which of the modules a page run loads (streamlit, the Search page's index and charts) this child has imported
    (torch is in every job's child: the fork server preloads it)."""
    return [name for name in ("altair", "streamlit", "simimg.query.service") if name in sys.modules]


def environment(name: str) -> tuple[str | None, bool]:
    """The child's value of `name`, and whether torch was imported before the task ran."""
    return os.environ.get(name), "torch" in sys.modules
