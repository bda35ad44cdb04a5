"""batching.py: concurrent work is gathered into bounded batches on one thread; `answer` groups a batch's queries
so each group is one forward pass, and gives every request what a search of its own would have given."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from simimg.errors import SimimgError
from simimg.http.batching import MicroBatcher, QueueFull, Work, answer
from simimg.query.service import SearchService


class Gate:
    """A batch function that records its batches and holds the model thread until opened."""

    def __init__(self, open_: bool = False) -> None:
        self.opened, self.entered = threading.Event(), threading.Event()
        self.batches: list[list[int]] = []
        if open_:
            self.opened.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.entered.set()
        assert self.opened.wait(30), "the test never opened the gate"
        self.batches.append(list(items))
        if any(item < 0 for item in items):
            raise ValueError("negative")
        return [item * 10 for item in items]


@pytest.fixture
def gated():
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=4, max_wait_s=0.005, max_queue=8)
    yield gate, batcher
    gate.opened.set()
    batcher.close(5)


def hold_the_model_thread(gate: Gate, batcher: MicroBatcher) -> list:
    """Submit one item and wait until the model thread is inside the batch function with it."""
    held = batcher.submit([0])
    assert gate.entered.wait(10)
    return held


def test_work_waiting_behind_a_busy_model_runs_in_full_batches_in_order(gated):
    gate, batcher = gated
    held = hold_the_model_thread(gate, batcher)
    futures: list = [None] * 8
    threads = [
        threading.Thread(target=lambda i=i: futures.__setitem__(i, batcher.submit([i + 1])[0])) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batcher.queued == 8
    gate.opened.set()
    assert [f.result(10) for f in futures] == [(i + 1) * 10 for i in range(8)] and held[0].result(10) == 0
    assert gate.batches[0] == [0] and [len(b) for b in gate.batches[1:]] == [4, 4]
    assert sorted(i for batch in gate.batches[1:] for i in batch) == list(range(1, 9))
    assert (batcher.batches, batcher.items) == (3, 9)


def test_a_lone_item_is_not_kept_waiting_for_company():
    gate = Gate(open_=True)
    batcher = MicroBatcher(gate, max_batch=64, max_wait_s=0.02, max_queue=64)
    try:
        start = time.monotonic()
        assert batcher.submit([7])[0].result(5) == 70
        assert time.monotonic() - start < 2  # waits max_wait_s for company, not for a full batch
    finally:
        batcher.close(5)


def test_a_full_queue_refuses_at_once_and_takes_all_of_a_request_or_none(gated):
    gate, batcher = gated
    hold_the_model_thread(gate, batcher)
    waiting = batcher.submit([1, 2, 3, 4, 5, 6])
    with pytest.raises(QueueFull, match="6 images are already waiting"):
        batcher.submit([7, 8, 9])
    assert batcher.queued == 6  # nothing of the refused request was queued
    last = batcher.submit([7, 8])
    with pytest.raises(QueueFull):
        batcher.submit([9])
    gate.opened.set()
    assert [f.result(10) for f in waiting + last] == [10, 20, 30, 40, 50, 60, 70, 80]


def test_a_failing_batch_fails_its_items_and_the_thread_goes_on(gated):
    gate, batcher = gated
    gate.opened.set()
    bad = batcher.submit([-1])[0]
    with pytest.raises(ValueError, match="negative"):
        bad.result(10)
    assert batcher.submit([3])[0].result(10) == 30 and batcher.alive


def test_cancelled_items_are_skipped_and_close_fails_what_still_waits(gated):
    gate, batcher = gated
    held = hold_the_model_thread(gate, batcher)
    cancelled, kept = batcher.submit([1, 2])
    assert cancelled.cancel()
    gate.opened.set()
    assert kept.result(10) == 20 and held[0].result(10) == 0
    assert all(1 not in batch for batch in gate.batches)
    gate.opened.clear()
    gate.entered.clear()
    hold_the_model_thread(gate, batcher)
    stranded = batcher.submit([5])[0]
    threading.Timer(0.2, gate.opened.set).start()
    batcher.close(10)
    with pytest.raises(SimimgError, match="stopped before answering"):
        stranded.result(1)
    with pytest.raises(SimimgError, match="shutting down"):
        batcher.submit([6])


def test_bad_settings_are_refused():
    with pytest.raises(SimimgError):
        MicroBatcher(lambda items: items, max_batch=0)


# --- answer: a real index -------------------------------------------------------------------------------
class CountingService(SearchService):
    """The real service, counting its forward passes."""

    forwards = 0

    def _embed(self, served, images):
        self.forwards += 1
        return super()._embed(served, images)


@pytest.fixture(scope="module")
def service(shapes_index) -> tuple[Path, CountingService]:
    """The session's index 'shapes', read through a counting service."""
    return shapes_index.data, CountingService(shapes_index.home, "shapes", "cpu")


def assert_same_answer(got, expected) -> None:
    """Equal but for the last rounded digit of a score: a batch's forward pass may differ in float rounding."""
    assert (got.query, got.prediction, got.error) == (expected.query, expected.prediction, expected.error)
    assert [(n.path, n.label) for n in got.neighbors] == [(n.path, n.label) for n in expected.neighbors]
    np.testing.assert_allclose([n.score for n in got.neighbors], [n.score for n in expected.neighbors], atol=1e-5)


def test_a_mixed_batch_gives_each_request_what_its_own_search_gives(service):
    root, svc = service
    paths = [
        root / "circles" / "circles_000.png",
        root / "squares" / "squares_001.png",
        root / "circles" / "circles_002.png",
        root / "squares" / "squares_003.png",
    ]
    images = [svc.load(p) for p in paths]
    asks = [dict(k=3), dict(k=10, min_score=0.99), dict(k=2, label="squares"), dict(k=5), dict(k=4, label="squares")]
    works = [Work(svc, images[i % 4], str(paths[i % 4]), **ask) for i, ask in enumerate(asks)]
    works.append(Work(svc, images[0], "embed me", embed=True))
    before = svc.forwards
    results = answer(works)
    assert svc.forwards - before == 3  # (no label), (label squares), (embed): one forward pass each
    for work, ask, result in zip(works, asks, results):
        assert_same_answer(result, svc.search(work.name, **ask))
    embedded = results[-1]
    assert embedded.query == "embed me" and embedded.model == svc.model.bundle.fingerprint
    np.testing.assert_allclose(embedded.vector, svc.embed([images[0]])[0], atol=1e-5)
    assert results[1].neighbors and all(n.score >= 0.99 for n in results[1].neighbors)
