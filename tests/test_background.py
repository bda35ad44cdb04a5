"""jobs.py: app jobs run in child processes keyed per index; a second writer on the same index is refused by name."""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import pytest

import job_tasks
from conftest import ROOT
from simimg.app.background import JobBoard, Task
from simimg.errors import SimimgError


def finished(job, timeout: float = 60.0):
    deadline = time.time() + timeout
    while job.running and time.time() < deadline:
        time.sleep(0.05)
    assert not job.running
    return job


@pytest.mark.slow
def test_a_job_runs_in_its_own_process_and_reports_progress_and_result():
    job = finished(JobBoard().start("pets", "build", "Indexing pets", Task(job_tasks.count, {"n": 3}), owner="tab"))
    assert job.error is None and job.result != os.getpid() and isinstance(job.result, int)
    assert (job.done, job.total, job.fraction(), job.owner) == (3, 3, 1.0, "tab")


@pytest.mark.slow
def test_a_job_started_from_a_page_does_not_run_the_app_again(monkeypatch: pytest.MonkeyPatch):
    """Streamlit runs app.py as the `__main__` module, and a spawned child runs its parent's `__main__` again (as
    `__mp_main__`) before its task: each job started from a page ran the whole app and its Search page first."""
    main = types.ModuleType("__main__")
    main.__file__ = str(ROOT / "app.py")  # what Streamlit's script runner puts there while a page runs
    monkeypatch.setitem(sys.modules, "__main__", main)
    job = finished(JobBoard().start("pets", "build", "Indexing pets", Task(job_tasks.heavy_modules, callbacks="")))
    assert job.error is None and job.result == [], job.result


@pytest.mark.slow
def test_a_job_sees_the_environment_of_its_start_with_torch_already_imported(monkeypatch: pytest.MonkeyPatch):
    """Children fork from a fork server that imported torch once; its environment is that of the first job, so each
    child takes the server's environment of the moment its job starts, as a spawned child would."""
    board, task = JobBoard(), Task(job_tasks.environment, {"name": "SIMIMG_JOB_PROBE"}, callbacks="")
    monkeypatch.setenv("SIMIMG_JOB_PROBE", "first")
    assert finished(board.start("pets", "build", "A", task)).result == ("first", True)
    monkeypatch.setenv("SIMIMG_JOB_PROBE", "second")
    assert finished(board.start("pets", "build", "B", task)).result == ("second", True)


@pytest.mark.slow
def test_a_second_writer_on_the_same_index_is_refused_naming_the_first(tmp_path: Path):
    board, release = JobBoard(), tmp_path / "release"
    first = board.start("pets", "train", "Training of 'pets'", Task(job_tasks.wait_for, {"path": str(release)}))
    try:
        with pytest.raises(SimimgError, match="index 'pets' is busy: Training of 'pets' has been running"):
            board.start("pets", "build", "Indexing pets", Task(job_tasks.count, {"n": 1}), owner="tab-2")
        other = board.start("cars", "build", "Indexing cars", Task(job_tasks.count, {"n": 1}))  # another index
        reader = board.start("pets", "evaluate", "Evaluation", Task(job_tasks.count, {"n": 1}))  # readers run beside
        finished(other), finished(reader)
        assert board.running("pets") == [first] and reader.error is None
    finally:
        release.touch()
    assert finished(first).result == "released"
    assert board.start("pets", "build", "Indexing pets", Task(job_tasks.count, {"n": 1})) is not None


@pytest.mark.parametrize(
    "function, message",
    [
        ("user_error", "no images found in x"),
        ("bug", "unexpected failure: ZeroDivisionError: division by zero"),
        ("die", "the job's process ended without an answer (exit code 3)"),
    ],
)
@pytest.mark.slow
def test_errors_and_a_dead_child_become_the_jobs_message(function: str, message: str):
    job = finished(JobBoard().start("a", "build", "A", Task(getattr(job_tasks, function), callbacks="")))
    assert job.error == message and job.result is None


@pytest.mark.slow
def test_a_job_reports_its_steps_from_the_start_and_estimates_the_time_left(monkeypatch: pytest.MonkeyPatch):
    from simimg.app.background import Job

    messages, apply = [], Job.apply
    monkeypatch.setattr(Job, "apply", lambda self, message: (messages.append(message), apply(self, message))[1])
    job = JobBoard().start(
        "pets",
        "build",
        "Indexing pets",
        Task(job_tasks.steps, {"names": ["scanning", "embedding"]}, callbacks="phases"),
    )
    finished(job)
    phases = [m[1] for m in messages if m[0] == "phase"]
    assert phases == ["starting", "scanning", "embedding"]  # "starting" comes before the imports
    assert job.result == ["scanning", "embedding"] and job.phase == "embedding" and (job.done, job.total) == (2, 2)
    assert job.seconds_left() is None  # a finished job has nothing left


def test_seconds_left_follows_the_current_steps_rate():
    from simimg.app.background import Job

    job = Job("pets", "build", "Indexing pets")
    assert job.seconds_left() is None  # nothing counted yet
    job.apply(("phase", "embedding"))
    job.phase_started -= 10  # ten seconds into the step, a quarter done
    job.apply(("progress", 25, 100))
    assert job.seconds_left() == pytest.approx(30, rel=0.05)


def test_cancelling_a_job_without_hooks_ends_its_process_and_is_no_error(tmp_path: Path):
    job = JobBoard().start("pets", "build", "Indexing pets", Task(job_tasks.wait_for, {"path": str(tmp_path / "x")}))
    time.sleep(0.5)
    job.stop.set()
    finished(job, timeout=30)
    assert job.cancelled and job.error is None and job.result is None
