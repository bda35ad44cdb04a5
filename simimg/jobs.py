"""Long jobs (build, train, serve a model, evaluate) run in background threads, keyed per index, so pages stay live.

One board per process, shared by every browser session of the app: two tabs cannot start two writers on the same
index, and the second one is told which job is running. A job records the session that started it, so its result
is shown to that session only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from simimg.errors import SimimgError

log = logging.getLogger(__name__)

# Jobs that write an index (its catalog, vectors or models): at most one of them runs per index.
WRITERS = frozenset({"build", "train", "use"})


@dataclass
class Job:
    """One background job; the page polls it and may ask it to stop."""

    index: str
    kind: str
    label: str
    owner: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    total: int = 0
    phase: str = ""
    events: list = field(default_factory=list)
    result: object = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def running(self) -> bool:
        return self.finished is None

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def on_phase(self, phase: str) -> None:
        self.phase, self.done, self.total = phase, 0, 0

    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


class JobBoard:
    """The process's jobs, one slot per (index, kind), guarded by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], Job] = {}

    def get(self, index: str, kind: str) -> Job | None:
        with self._lock:
            return self._jobs.get((index, kind))

    def running(self, index: str) -> list[Job]:
        with self._lock:
            return [j for (name, _), j in self._jobs.items() if name == index and j.running]

    def start(self, index: str, kind: str, label: str, work: Callable[[Job], object], owner: str = "") -> Job:
        """Run `work(job)` in a daemon thread; refuse while a conflicting job on the same index runs."""
        with self._lock:
            busy = [j for (name, k), j in self._jobs.items() if name == index and j.running
                    and (k == kind or (k in WRITERS and kind in WRITERS))]
            if busy:
                raise SimimgError(f"index '{index}' is busy: {busy[0].label} has been running for "
                                  f"{busy[0].seconds():.0f} s (started in another tab or earlier); wait for it to "
                                  "finish or cancel it")
            job = self._jobs[(index, kind)] = Job(index, kind, label, owner)
        threading.Thread(target=_run, args=(job, work), name=f"simimg-{kind}-{index}", daemon=True).start()
        return job


def _run(job: Job, work: Callable[[Job], object]) -> None:
    """SimimgError becomes job.error; anything else is logged in full and shown short."""
    try:
        job.result = work(job)
    except SimimgError as err:
        job.error = str(err)
    except Exception as err:  # noqa: BLE001 - a thread has nobody else to tell
        log.exception("%s of '%s' failed", job.kind, job.index)
        job.error = f"unexpected failure: {type(err).__name__}: {err}"
    finally:
        job.finished = time.time()
