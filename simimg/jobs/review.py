"""The Review page's queues, read from one published version: what to ask the user about, in the order to ask it.

- `issues`: the last audit's label issues still open (not dismissed, excluded or relabelled since), its ranking;
- `duplicates`: its duplicate groups still open, each image tagged with its group;
- `unlabeled`: the unlabeled pool, least certain first (smallest margin of a head fitted on the labelled images);
- `class`: one class's images, least typical first (lowest cosine to the class's mean embedding).

The unlabeled and class queues fit the head on the stored vectors of the labelled images as they are now (what a
head-only refit fits, in a second or two at a few thousand images), so every batch of answers reorders them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simimg.analysis.classifier import fit_head
from simimg.analysis.review import least_certain_first, least_typical_first, margins, typicality
from simimg.choices import REVIEW_QUEUES
from simimg.dataset.corrections import Corrections
from simimg.errors import SimimgError
from simimg.jobs.audit_config import AuditReport, read_audit
from simimg.store.catalog import Snapshot, reading
from simimg.store.edits import read_corrections
from simimg.store.layout import IndexFolder


@dataclass(frozen=True)
class ReviewItem:
    """One image to judge: its `path` in the index, its `label` now (None: unlabeled), the `suggested` label with
    its `probability`, the queue's `score` (the audit's score, the margin, or the typicality; lower comes first),
    and for duplicates the `group` it belongs to."""

    path: str
    label: str | None
    suggested: str | None
    probability: float | None
    score: float
    group: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def review_queue(
    home: str | Path | None, name: str, queue: str, label: str | None = None, limit: int | None = None
) -> list[ReviewItem]:
    """The queue's open items, first to ask first; `label` picks the class of the `class` queue."""
    if queue not in REVIEW_QUEUES:
        raise SimimgError(f"unknown review queue {queue!r}: choose one of {', '.join(REVIEW_QUEUES)}")
    folder = IndexFolder.of(home, name)
    with reading(folder.catalog) as catalog:
        read = catalog.snapshot_with_vectors()
        corrections = read_corrections(catalog)
    if read is None:
        raise SimimgError(f"index '{name}' has no published version yet: build it with `simimg index`")
    snapshot, vectors = read
    if queue in ("issues", "duplicates"):
        items = _audit_queue(folder, name, queue, snapshot, corrections)
    elif queue == "unlabeled":
        items = _unlabeled_queue(snapshot, vectors)
    else:
        items = _class_queue(snapshot, vectors, label)
    return items[:limit]


def open_label_issues(
    report: AuditReport, labels: dict[str, str | None], corrections: Corrections
) -> list[dict[str, Any]]:
    """The report's label issues not settled since it ran: dismissed, excluded, or relabelled after the audit."""
    return [
        i for i in report.label_issues if i["path"] not in corrections.dismissed and labels.get(i["path"]) == i["label"]
    ]


def _audit_queue(
    folder: IndexFolder, name: str, queue: str, snapshot: Snapshot, corrections: Corrections
) -> list[ReviewItem]:
    report = read_audit(folder)
    if report is None:
        raise SimimgError(f"index '{name}' has no audit to review: run `simimg audit --name {name}` first")
    labels = dict(zip(snapshot.paths, snapshot.labels))
    if queue == "issues":
        return [
            ReviewItem(i["path"], i["label"], i["suggested"], None, float(i["score"]))
            for i in open_label_issues(report, labels, corrections)
        ]
    items = []
    for number, group in enumerate(report.duplicates):
        present = [p for p in group["paths"] if p in labels and p not in corrections.dismissed]
        if len(present) > 1:
            items += [ReviewItem(p, labels[p], None, None, float(group["score"]), number) for p in present]
    return items


def _unlabeled_queue(snapshot: Snapshot, vectors: np.ndarray) -> list[ReviewItem]:
    pool = np.flatnonzero([label is None for label in snapshot.labels])
    if not len(pool):
        return []
    classes, probabilities = _head_probabilities(snapshot, vectors, vectors[pool])
    order = least_certain_first(probabilities)
    margin = margins(probabilities)
    best = probabilities.argmax(axis=1)
    return [
        ReviewItem(snapshot.paths[pool[i]], None, classes[best[i]], float(probabilities[i, best[i]]), float(margin[i]))
        for i in order
    ]


def _class_queue(snapshot: Snapshot, vectors: np.ndarray, label: str | None) -> list[ReviewItem]:
    members = np.flatnonzero(np.array([lab == label for lab in snapshot.labels]))
    if label is None or not len(members):
        known = sorted({lab for lab in snapshot.labels if lab is not None})
        raise SimimgError(f"the class queue needs one of the index's classes ({', '.join(known)}), not {label!r}")
    classes, probabilities = _head_probabilities(snapshot, vectors, vectors[members])
    best = probabilities.argmax(axis=1)
    score = typicality(vectors[members])
    return [
        ReviewItem(
            snapshot.paths[members[i]],
            label,
            classes[best[i]] if classes[best[i]] != label else None,
            float(probabilities[i, best[i]]),
            float(score[i]),
        )
        for i in least_typical_first(vectors[members])
    ]


def _head_probabilities(snapshot: Snapshot, vectors: np.ndarray, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(classes, probabilities of `rows`) from a head fitted on every labelled vector, as a head-only refit fits."""
    labelled = np.array([label is not None for label in snapshot.labels])
    labels = [snapshot.labels[i] for i in np.flatnonzero(labelled)]
    classes = sorted({str(label) for label in labels})
    if len(classes) < 2:
        raise SimimgError(f"a head needs labelled images of 2 classes or more; this index has {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[str(label)] for label in labels])
    return classes, fit_head(vectors[labelled], y, len(classes)).probabilities(rows)
