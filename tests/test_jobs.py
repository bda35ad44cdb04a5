"""jobs.py: background jobs keyed per index; a second writer on the same index is refused by name."""

from __future__ import annotations

import threading
import time

import pytest

from simimg.errors import SimimgError
from simimg.jobs import JobBoard


def wait_for(job, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while job.running and time.time() < deadline:
        time.sleep(0.01)
    assert not job.running


def test_a_job_reports_its_result_progress_and_owner():
    board = JobBoard()

    def work(job):
        job.on_phase("training")
        job.progress(3, 4)
        return 42

    job = board.start("pets", "train", "Training of 'pets'", work, owner="tab-1")
    wait_for(job)
    assert (job.result, job.error, job.owner, job.phase, job.fraction()) == (42, None, "tab-1", "training", 0.75)
    assert board.get("pets", "train") is job and board.running("pets") == []


def test_a_second_writer_on_the_same_index_is_refused_naming_the_first():
    board, release = JobBoard(), threading.Event()
    first = board.start("pets", "train", "Training of 'pets'", lambda job: release.wait(10), owner="tab-1")
    try:
        with pytest.raises(SimimgError, match="index 'pets' is busy: Training of 'pets' has been running"):
            board.start("pets", "build", "Indexing pets", lambda job: None, owner="tab-2")
        with pytest.raises(SimimgError, match="is busy"):
            board.start("pets", "train", "Training again", lambda job: None, owner="tab-1")
        other = board.start("cars", "build", "Indexing cars", lambda job: None)  # another index is free
        reader = board.start("pets", "evaluate", "Evaluation of 'pets'", lambda job: "ok")  # readers run beside
        wait_for(other), wait_for(reader)
        assert board.running("pets") == [first] and reader.result == "ok"
    finally:
        release.set()
    wait_for(first)
    assert board.start("pets", "build", "Indexing pets", lambda job: None) is not None


def test_errors_become_the_jobs_message():
    board = JobBoard()

    def user_error(job):
        raise SimimgError("no images found in x")

    def bug(job):
        raise ZeroDivisionError("division by zero")

    a, b = board.start("a", "build", "A", user_error), board.start("b", "build", "B", bug)
    wait_for(a), wait_for(b)
    assert a.error == "no images found in x"
    assert b.error == "unexpected failure: ZeroDivisionError: division by zero"
