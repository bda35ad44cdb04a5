"""Long jobs (build, train, serve a model, evaluate) for the app: each runs in a child process, keyed per index.

A child process rather than a thread of the Streamlit server: training holds a Python interpreter busy between
torch ops and keeps both cores loaded, and in the server's own process that starved page loads of other tabs
(issue 13). The child runs at a lower scheduling priority with its own interpreter, and a crash in it cannot take
the server down. A supervising thread in the server relays the child's progress into the `Job` the pages poll.

Children are forked from multiprocessing's fork server, a clean process started with the first job that has
imported torch and the jobs' modules once (PRELOAD): a job then starts in a fraction of a second instead of
paying ~4 s of imports each time. The fork server never runs a model, so its forks inherit no thread pool, and
never the Streamlit server's threads or locks. Where there is no fork server (Windows), children are spawned.

One board per server process, shared by every browser session: two tabs cannot start two writers on the same
index, and the second one is told which job is running. A job records the session that started it, so its result
is shown to that session only.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import simimg
from simimg.errors import SimimgError

log = logging.getLogger(__name__)

# Jobs that write an index (its catalog, vectors or models): at most one of them runs per index.
WRITERS = frozenset({"build", "train", "use"})
NICENESS = 10  # a job yields the cores to the server when both want them
POLL_S = 0.2
# Steps in which a training run stops by itself at a cancel, keeping its best epoch; elsewhere a job is ended.
COOPERATIVE = frozenset({"training", "validating", "saving"})
# What the fork server imports once for every job; importing starts no thread pool (running a model would)
PRELOAD = ("torch", "torchvision", "simimg.jobs.index", "simimg.jobs.train", "simimg.jobs.evaluate")


@dataclass(frozen=True)
class Task:
    """What a job runs: `function` (a module-level function, e.g. `simimg.train`: the child imports it by name)
    called with `kwargs` (picklable) plus the callbacks it takes.

    `callbacks` is "hooks" (a training run: progress, phase, epochs, cooperative cancel), "phases" (`progress=`
    and `on_phase=` callables), "progress" (a `progress=` callable) or "" (none). A job is cancelled by ending its
    process, except a training run in a COOPERATIVE step: the index jobs resume from what a killed run committed.
    """

    function: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    callbacks: str = "progress"


@dataclass
class Job:
    """One background job as the pages see it; the page polls it and may ask it to stop."""

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
    cancelled: bool = False
    started: float = field(default_factory=time.time)
    phase_started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def running(self) -> bool:
        return self.finished is None

    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def seconds_left(self) -> float | None:
        """The current phase's time to go at its rate so far; None until it has counted some progress."""
        if not self.total or not self.done or not self.running:
            return None
        return (time.time() - self.phase_started) * (self.total - self.done) / self.done

    def apply(self, message: tuple) -> None:
        """One message from the child: progress, a phase, an epoch, the result or the error."""
        kind, *body = message
        if kind == "progress":
            self.done, self.total = body
        elif kind == "phase":
            self.phase, self.done, self.total, self.phase_started = body[0], 0, 0, time.time()
        elif kind == "epoch":
            self.events.append(body[0])
        elif kind == "result":
            self.result = body[0]
        elif kind == "error":
            self.error = body[0]


class JobBoard:
    """The server's jobs, one slot per (index, kind), guarded by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], Job] = {}

    def get(self, index: str, kind: str) -> Job | None:
        with self._lock:
            return self._jobs.get((index, kind))

    def running(self, index: str) -> list[Job]:
        with self._lock:
            return [j for (name, _), j in self._jobs.items() if name == index and j.running]

    def start(self, index: str, kind: str, label: str, task: Task, owner: str = "") -> Job:
        """Run `task` in a child process; refuse while a conflicting job on the same index runs."""
        with self._lock:
            busy = [
                j
                for (name, k), j in self._jobs.items()
                if name == index and j.running and (k == kind or (k in WRITERS and kind in WRITERS))
            ]
            if busy:
                raise SimimgError(
                    f"index '{index}' is busy: {busy[0].label} has been running for "
                    f"{busy[0].seconds():.0f} s (started in another tab or earlier); wait for it to "
                    "finish or cancel it"
                )
            job = self._jobs[(index, kind)] = Job(index, kind, label, owner)
        threading.Thread(target=_supervise, args=(job, task), name=f"simimg-{kind}-{index}", daemon=True).start()
        return job


def _supervise(job: Job, task: Task) -> None:
    """Start the child, relay its messages into `job`, pass a cancel on, and notice a child that died."""
    context = _context()
    messages, stop = context.Queue(), context.Event()
    child = context.Process(target=run_task, args=(task, messages, stop, dict(os.environ)), daemon=True)
    try:
        child.start()
        while child.is_alive() or not messages.empty():
            if job.stop.is_set():
                stop.set()
                if child.is_alive() and (task.callbacks != "hooks" or job.phase not in COOPERATIVE):
                    job.cancelled = True
                    child.terminate()  # no cooperative stop here: what it committed is kept, the next run resumes
            try:
                job.apply(messages.get(timeout=POLL_S))
            except queue.Empty:
                continue
        child.join()
        if job.result is None and job.error is None and not job.cancelled:
            job.error = f"the job's process ended without an answer (exit code {child.exitcode})"
    except Exception as err:  # a supervisor has nobody else to tell
        log.exception("%s of '%s' failed", job.kind, job.index)
        job.error = f"unexpected failure: {type(err).__name__}: {err}"
    finally:
        job.finished = time.time()


def _context() -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """The fork server's context (preloading PRELOAD), or spawn's where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # read when the server starts, with the first job
    return context


def run_task(
    task: Task, messages: multiprocessing.Queue, stop: multiprocessing.synchronize.Event, environ: dict[str, str]
) -> None:
    """The child: call the task with callbacks that report through `messages`; SimimgError becomes the message.
    `environ` is the server's environment when the job started (the fork server's may be older), as spawn gives."""
    os.environ.clear()
    os.environ.update(environ)
    os.nice(NICENESS)
    messages.put(("phase", "starting"))  # importing torch and the rest comes first: seconds on a cold machine
    simimg.reuse_freed_memory()
    kwargs = dict(task.kwargs)
    if task.callbacks == "hooks":
        kwargs["hooks"] = simimg.Hooks(
            on_epoch=lambda s: messages.put(("epoch", s)),
            progress=lambda d, t: messages.put(("progress", d, t)),
            on_phase=lambda p: messages.put(("phase", p)),
            should_stop=stop.is_set,
        )
    elif task.callbacks in ("progress", "phases"):
        kwargs["progress"] = lambda d, t: messages.put(("progress", d, t))
    if task.callbacks == "phases":
        kwargs["on_phase"] = lambda p: messages.put(("phase", p))
    try:
        messages.put(("result", task.function(**kwargs)))
    except SimimgError as err:
        messages.put(("error", str(err)))
    except Exception as err:  # the server shows it short; the child's log has the traceback
        logging.getLogger(__name__).exception("job %s failed", task.function.__qualname__)
        messages.put(("error", f"unexpected failure: {type(err).__name__}: {err}"))
