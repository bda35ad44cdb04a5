"""`simimg labels`: correct a collection's labels as data, batch by batch, each batch published as an index version.

A batch is recorded in one catalog transaction, then the index job publishes it: the catalog's rows take their new
labels over the vectors they have (nothing is embedded for a relabel), excluded images leave the index, and readers
see the old labels or the new ones, never a mix. A kill in between leaves the batch recorded but unpublished; the
next `labels` or `index` run publishes it. Files on disk never move, except through `export_labels(move=True)`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path

from simimg.dataset.corrections import Edit, check_label
from simimg.errors import SimimgError
from simimg.jobs.audit_config import read_audit
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob, read_index_job
from simimg.jobs.labels_config import LabelsReport
from simimg.jobs.review import open_label_issues
from simimg.progress import Phase
from simimg.store.catalog import Catalog, reading
from simimg.store.edits import read_corrections, record_batch, undo_batch
from simimg.store.layout import IndexFolder
from simimg.store.lock import writer_lock

log = logging.getLogger(__name__)


def edit_labels(
    home: str | Path | None,
    name: str,
    paths: Sequence[str],
    action: str,
    to: str | None = None,
    source: str = "user",
    on_phase: Phase | None = None,
) -> LabelsReport:
    """Record one batch (`set` each path's label `to`, `exclude` them, or `dismiss` their findings) and publish it."""
    if action == "set":
        check_label(to)
    elif to is not None:
        raise SimimgError(f"--to applies to `labels set` only, not `labels {action}`")
    return _record_many(home, name, [(paths, action, to)], source, on_phase)


def accept_suggestions(
    home: str | Path | None, name: str, top: int | None = None, on_phase: Phase | None = None
) -> LabelsReport:
    """Accept the last audit's suggested labels (its `top` highest-ranked label issues; all by default) as a batch,
    skipping the findings settled since: dismissed, excluded, or relabelled after the audit."""
    folder, _ = _indexed(home, name)
    report = read_audit(folder)
    if report is None:
        raise SimimgError(f"index '{name}' has no audit to accept: run `simimg audit --name {name}` first")
    with reading(folder.catalog) as catalog:
        labels = {path: row.label for path, row in catalog.head().items()}
        issues = open_label_issues(report, labels, read_corrections(catalog))[:top]
    if not issues:
        raise SimimgError(f"the last audit of '{name}' has no label suggestion left to accept")
    return apply_labels(home, name, {i["path"]: i["suggested"] for i in issues}, "audit", on_phase)


def apply_labels(
    home: str | Path | None,
    name: str,
    labels: Mapping[str, str],
    source: str = "user",
    on_phase: Phase | None = None,
) -> LabelsReport:
    """One batch giving each path its own label (accepted suggestions differ image by image)."""
    if not labels:
        raise SimimgError("no label to set: name at least one image")
    by_label: dict[str, list[str]] = {}
    for path, label in labels.items():
        check_label(label)
        by_label.setdefault(label, []).append(path)
    return _record_many(home, name, [(paths, "set", label) for label, paths in by_label.items()], source, on_phase)


def undo_labels(home: str | Path | None, name: str, on_phase: Phase | None = None) -> LabelsReport:
    """Undo the latest batch not yet undone, and publish the labels as they were before it."""
    started = time.perf_counter()
    folder, job = _indexed(home, name)
    lock = writer_lock(folder.lock, f"labels '{name}'", wait=True)
    with lock, closing(Catalog(folder.catalog)) as catalog, catalog.transaction():
        undone = undo_batch(catalog)
    if undone is None:
        raise SimimgError(f"index '{name}' has no label edit to undo")
    batch, edits = undone
    log.info("labels '%s': undid batch %d (%d edits)", name, batch, len(edits))
    return _published(job, "undo", batch, len(edits), started, on_phase)


def _record_many(
    home: str | Path | None,
    name: str,
    groups: Sequence[tuple[Sequence[str], str, str | None]],
    source: str,
    on_phase: Phase | None,
) -> LabelsReport:
    """One batch of several (paths, action, label) groups, every path one the index holds (or excluded)."""
    started = time.perf_counter()
    folder, job = _indexed(home, name)
    with writer_lock(folder.lock, f"labels '{name}'", wait=True), closing(Catalog(folder.catalog)) as catalog:
        labels = _current_labels(catalog)
        wanted = [(_catalog_paths(paths, Path(job.data_dir)), action, to) for paths, action, to in groups]
        unknown = [p for paths, _, _ in wanted for p in paths if p not in labels]
        if unknown:
            raise SimimgError(
                f"index '{name}' holds no image {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + ": give paths inside its collection, as `simimg labels list` or the audit shows them"
            )
        edits = [
            Edit(p, action, labels[p], to if action == "set" else labels[p], source)
            for paths, action, to in wanted
            for p in paths
        ]
        with catalog.transaction():
            batch = record_batch(catalog, edits, source)
    action = groups[0][1] if len({g[1] for g in groups}) == 1 else "set"
    log.info("labels '%s': batch %d, %d %s edits", name, batch, len(edits), action)
    return _published(job, action, batch, len(edits), started, on_phase)


def _published(
    job: IndexJob, action: str, batch: int | None, edits: int, started: float, on_phase: Phase | None
) -> LabelsReport:
    """Run the index job over the collection, which applies every edit in force, and report the version."""
    report = run_index(replace(job, wait=True, model=None, engine="local", address=None), on_phase=on_phase)
    return LabelsReport(
        job.name,
        action,
        batch,
        edits,
        report.version,
        report.relabelled,
        report.excluded,
        round(time.perf_counter() - started, 3),
    )


def _indexed(home: str | Path | None, name: str) -> tuple[IndexFolder, IndexJob]:
    """The index folder and the job that built it (its collection is what the edits apply to)."""
    folder = IndexFolder.of(home, name)
    job = read_index_job(folder)
    if job is None or not Catalog.initialised(folder.catalog):
        raise SimimgError(
            f"no index '{name}' under {folder.root.parent}: build it with `simimg index DIR --name {name}`"
        )
    return folder, replace(job, home=str(folder.root.parent), name=name)


def _current_labels(catalog: Catalog) -> dict[str, str | None]:
    """Every path an edit may name: the head's rows with their labels now, and the excluded images (no row)."""
    labels = {path: row.label for path, row in catalog.head().items()}
    corrections = read_corrections(catalog)
    for edit in corrections.edits:
        if edit.action == "exclude":
            labels.setdefault(edit.path, edit.old_label)
    return labels


def _catalog_paths(paths: Sequence[str], root: Path) -> list[str]:
    """The catalog's path of each file given: relative to the collection when inside it (as the scan names it,
    links not followed), absolute when outside it (the unlabeled pool), as given when no such file exists here."""
    out = []
    base = Path(os.path.abspath(root.expanduser()))
    for given in paths:
        path = Path(os.path.abspath(Path(given).expanduser()))
        if not path.is_file():
            out.append(Path(given).as_posix())
        elif path.is_relative_to(base):
            out.append(path.relative_to(base).as_posix())
        else:
            out.append(path.as_posix())
    return list(dict.fromkeys(out))
