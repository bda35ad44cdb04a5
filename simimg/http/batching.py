"""Micro-batching: many request threads hand in images, one model thread runs them as batches.

A forward pass over 16 images costs far less than 16 passes over one, so `MicroBatcher` gathers what arrives
within a few milliseconds of the oldest waiting item (up to `max_batch`) and runs it in one call on its own
thread. Its queue is bounded: work that does not fit is refused at once (`QueueFull`) rather than piling up.

`answer` is the batch function the HTTP server gives it. Requests in one batch may differ in index, kind
(query or embed), label, k and min_score. A label changes which vectors are searched, so a batch is split into
groups by (index, kind, label), each one forward pass and one search; within a group the search uses the largest
k and each request's result is cut to its own k and min_score afterwards, which gives exactly what a search with
that k and min_score gives (neighbours come best first and the score filter is applied per neighbour).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from simimg import QueryResult, SearchService
from simimg.errors import SimimgError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(SimimgError):
    """The batcher's queue has no room for a request's images: the caller should try again shortly."""


@dataclass
class _Entry(Generic[T]):
    item: T
    future: Future
    queued_at: float


class MicroBatcher(Generic[T, R]):
    """Runs `run(items) -> results` (one result per item, in order) on one thread, over batches of waiting items."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        name: str = "simimg-model",
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise SimimgError("a batcher needs max_batch >= 1, max_queue >= 1 and max_wait_s >= 0")
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self._queue: deque[_Entry[T]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T]) -> list[Future]:
        """Queue all of `items` or none of them; a future per item. Raises QueueFull when they do not all fit."""
        with self._changed:
            if self._closed:
                raise SimimgError("the server is shutting down; try again on its next start")
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} images are already waiting for the model (the queue holds "
                    f"{self.max_queue}); try again shortly"
                )
            now = time.monotonic()
            entries = [_Entry(item, Future(), now) for item in items]
            self._queue.extend(entries)
            self._changed.notify()
        return [e.future for e in entries]

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Finish the batch under way, then fail whatever still waits; the model thread ends."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)
        with self._changed:
            left, self._queue = list(self._queue), deque()
        for entry in left:
            if entry.future.set_running_or_notify_cancel():
                entry.future.set_exception(SimimgError("the server stopped before answering"))

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Entry[T]] | None:
        """Wait for work, then until `max_batch` items wait or the oldest has waited `max_wait_s`; None once closed."""
        with self._changed:
            while not self._queue and not self._closed:
                self._changed.wait()
            while not self._closed and len(self._queue) < self.max_batch:
                left = self._queue[0].queued_at + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if self._closed:
                return None
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _run(self, batch: list[_Entry[T]]) -> None:
        live = [e for e in batch if e.future.set_running_or_notify_cancel()]  # timed-out requests are skipped
        if not live:
            return
        try:
            results = list(self.run([e.item for e in live]))
            if len(results) != len(live):
                raise RuntimeError(f"the batch function gave {len(results)} results for {len(live)} items")
        except Exception as err:  # a failed batch fails its requests, never the model thread
            log.exception("a batch of %d failed", len(live))
            for e in live:
                e.future.set_exception(err)
            return
        self.batches += 1
        self.items += len(live)
        for e, result in zip(live, results):
            e.future.set_result(result)


@dataclass(frozen=True)
class Work:
    """One image of one request: what to do with it, and against which warm index."""

    service: SearchService
    image: Image.Image
    name: str
    k: int = 10
    label: str | None = None
    min_score: float | None = None
    embed: bool = False


@dataclass(frozen=True)
class Embedded:
    """One image's unit-length embedding, with the model and embedding fingerprints that made it."""

    query: str
    vector: np.ndarray
    model: str
    embedding: str

    def to_dict(self) -> dict:
        return {"query": self.query, "model": self.model, "embedding": self.embedding, "vector": self.vector.tolist()}


def answer(works: Sequence[Work]) -> list[QueryResult | Embedded]:
    """Answer a batch: one forward pass (and one search) per (index, kind, label) group, results in input order."""
    results: list[QueryResult | Embedded | None] = [None] * len(works)
    for rows in _groups(works).values():
        first = works[rows[0]]
        images = [works[i].image for i in rows]
        if first.embed:
            vectors, bundle = first.service.embed_batch(images)
            for i, vector in zip(rows, vectors):
                results[i] = Embedded(works[i].name, vector, bundle.fingerprint, bundle.embedding)
            continue
        found = first.service.query_batch(
            images, max(works[i].k for i in rows), first.label, None, [works[i].name for i in rows]
        )
        for i, result in zip(rows, found):
            results[i] = trim(result, works[i].k, works[i].min_score)
    return results


def trim(result: QueryResult, k: int, min_score: float | None) -> QueryResult:
    """The result a search with this k and min_score gives, from one made with a larger k and no score floor."""
    kept = [n for n in result.neighbors if min_score is None or n.score >= min_score][:k]
    return replace(result, neighbors=kept)


def _groups(works: Sequence[Work]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, work in enumerate(works):
        groups.setdefault((id(work.service), work.embed, work.label), []).append(i)
    return groups
