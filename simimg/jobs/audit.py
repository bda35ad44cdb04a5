"""`simimg audit`: what is wrong with a labelled folder, judged with the embeddings of the index's serving model.

Reads DATA_DIR's split (train/ and val/ folders, else the seeded split `simimg train` would make), takes each
image's vector and content hash from the catalog when it holds the file unchanged and embeds the others with the
serving model (without adding them), then runs findings.py's findings. The report is kept as `audit.json` in the index
folder, with the job that made it, so the app can show the last audit without running it again.

DATA_DIR must be the index's collection folder or a folder inside it: a report is kept under the index it judges,
so another collection is refused (index it, and audit it with that index). Images of the collection that the index
does not hold yet (new or changed files) are embedded on the fly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simimg.analysis.findings import (
    class_balance,
    crosses,
    exact_duplicates,
    label_issues,
    near_duplicates,
    out_of_fold_probabilities,
    outliers,
)
from simimg.dataset.splits import Split, split_dataset
from simimg.errors import SimimgError
from simimg.fsutil import atomic_write_bytes
from simimg.jobs.audit_config import AuditJob, AuditReport
from simimg.jobs.labels_config import corrections_for
from simimg.jobs.train_head import SplitVectors, collection_folder, held_vectors, split_vectors, stored_model
from simimg.models.device import loader_workers, resolve_compute
from simimg.models.encoder import EmbedSettings
from simimg.store.layout import IndexFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collection:
    """The audited images that could be read, in split order: arrays for findings.py, names for the report."""

    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    hashes: list[str]
    vectors: np.ndarray
    classes: tuple[str, ...]


def run_audit(
    job: AuditJob, progress: Callable[[int, int], None] | None = None, on_phase: Callable[[str], None] | None = None
) -> AuditReport:
    """Audit `job.data_dir` with index `job.name`'s serving model and keep the report as its audit.json.

    `on_phase` hears "reading", then "embedding" (only when the index lacks some images; `progress` then counts
    them), "fitting" and "saving".
    """
    started = time.perf_counter()
    phase = on_phase or (lambda _: None)
    folder = IndexFolder.of(job.home, job.name)
    phase("reading")
    base = stored_model(folder)
    corrections = corrections_for(job.home, job.name, job.data_dir)
    split = split_dataset(job.data_dir, job.val_split, job.seed, corrections)
    refuse_foreign(folder, split.root.resolve())
    held = held_vectors(folder, base, split)
    if held.missing:
        phase("embedding")
    compute = resolve_compute(job.device)
    settings = EmbedSettings(compute, job.batch_size, loader_workers(job.workers, compute.device))
    found = split_vectors(held, base, split, settings, progress)
    collection = _collection(split, found)
    phase("fitting")
    issues, duplicates, atypical, threshold = find_all(collection, job.folds, job.seed)
    seen = _mark_seen(issues, duplicates, atypical, corrections.dismissed)
    issues_now, duplicates_now = [i for i in issues if not i["seen"]], [d for d in duplicates if not d["seen"]]
    summary = {
        "name": job.name,
        "data_dir": str(split.root.resolve()),
        "model": base.bundle.fingerprint,
        "embedding": base.bundle.embedding,
        "model_kind": base.bundle.kind,
        "split": split.kind,
        "images": len(collection.paths),
        "classes": list(split.classes),
        **found.counts,
        "skipped": found.skipped,
        "label_issues": len(issues_now),
        "exact_duplicates": sum(d["kind"] == "exact" for d in duplicates_now),
        "near_duplicates": sum(d["kind"] == "near" for d in duplicates_now),
        "cross_class": sum(d["cross_class"] for d in duplicates_now),
        "cross_split": sum(d["cross_split"] for d in duplicates_now),
        "outliers": sum(not o["seen"] for o in atypical),
        "seen": seen,
        "near_threshold": round(threshold, 6),
        "imbalance": class_balance(collection.labels, split.classes),
        "seconds": round(time.perf_counter() - started, 3),
        "job": asdict(job),
    }
    report = AuditReport(issues, duplicates, atypical, summary)
    phase("saving")
    atomic_write_bytes(folder.audit, json.dumps(report.to_dict(), indent=1).encode())
    log.info(
        "audit of %s: %d label issues, %d duplicate findings, %d outliers",
        split.root,
        len(issues),
        len(duplicates),
        len(atypical),
    )
    return report


def _mark_seen(
    issues: list[dict[str, Any]], duplicates: list[dict[str, Any]], atypical: list[dict[str, Any]], dismissed: Set[str]
) -> int:
    """Flag the findings the user dismissed (a duplicate group when all its images were): listed, not counted."""
    for finding in issues + atypical:
        finding["seen"] = finding["path"] in dismissed
    for group in duplicates:
        group["seen"] = all(path in dismissed for path in group["paths"])
    return sum(f["seen"] for f in issues + atypical + duplicates)


def refuse_foreign(folder: IndexFolder, root: Path) -> None:
    """A report is kept under the index it judges: refuse a folder outside the index's collection folder."""
    collection = collection_folder(folder)
    if collection is not None and root.is_relative_to(collection):
        return
    raise SimimgError(
        f"{root} is not index '{folder.name}''s collection folder "
        f"({collection or 'none recorded'}) or inside it, and an audit is kept with the index it "
        f"judges: build an index of that folder first (`simimg index {root} --name {root.name}`) and "
        f"audit it with that index (`simimg audit {root} --name {root.name}`)"
    )


def _collection(split: Split, found: SplitVectors) -> Collection:
    """The readable images of the split, in split order; an audit needs at least 3."""
    records = split.train + split.val
    keep = sorted(found.vectors)
    if len(keep) < 3:
        raise SimimgError(f"only {len(keep)} images of {split.root} could be read: an audit needs at least 3")
    splits = ["train"] * len(split.train) + ["val"] * len(split.val)
    return Collection(
        [records[i].path for i in keep],
        split.labels(records)[keep],
        [splits[i] for i in keep],
        [found.hashes[i] for i in keep],
        np.stack([found.vectors[i] for i in keep]),
        split.classes,
    )


def find_all(
    c: Collection, folds: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], float]:
    """(label issues, duplicates, outliers, the near-duplicate threshold) as the report lists them."""
    probs = out_of_fold_probabilities(c.vectors, c.labels, len(c.classes), folds, seed)
    issues = [
        {
            "path": c.paths[i.position],
            "label": c.classes[c.labels[i.position]],
            "suggested": c.classes[i.suggested],
            "score": round(i.score, 6),
        }
        for i in label_issues(c.labels, probs)
    ]
    near, threshold = near_duplicates(c.vectors, c.hashes)
    duplicates = [_duplicate(d.positions, d.kind, d.score, c) for d in exact_duplicates(c.hashes) + near]
    atypical = [{"path": c.paths[o.position], "score": round(o.score, 6)} for o in outliers(c.vectors)]
    return issues, duplicates, atypical, threshold


def _duplicate(positions: Sequence[int], kind: str, score: float, c: Collection) -> dict[str, Any]:
    labels = [c.classes[c.labels[i]] for i in positions]
    cross_class, cross_split = crosses(positions, c.labels.tolist(), c.splits)
    return {
        "paths": [c.paths[i] for i in positions],
        "kind": kind,
        "score": round(float(score), 6),
        "labels": labels,
        "cross_class": cross_class,
        "cross_split": cross_split,
    }
