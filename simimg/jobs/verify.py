"""`simimg verify`: every file of an index checked against the checksums taken when it was written
(store/checksums.py), with the images each damaged file affects; `--repair` mends what can be made again.

What can be repaired, and how: a damaged vector row is dropped and its image embedded again from the original
file (the next index run embeds every row that lacks a vector); a damaged or missing FAISS file is built again from
the vectors (an index run rebuilds a published file that fails its checksum); the leftovers of killed runs (a model
folder being staged, a temporary file) are removed when no writer holds the index. A damaged model file cannot be
made again: it names the model, for `simimg use` or a new training run.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from simimg.errors import SimimgError
from simimg.jobs.index_config import read_index_job
from simimg.store.catalog import Catalog, reading
from simimg.store.checksums import file_checksum, manifest_problems, row_checksums
from simimg.store.layout import IndexFolder
from simimg.store.lock import writer_lock
from simimg.store.vectors import ROW_DTYPE, shard_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DamagedFile:
    """One damaged file: its path, its kind (vectors, faiss, model), why, and the images whose results it affects."""

    file: str
    kind: str
    reason: str
    images: list[str]


@dataclass(frozen=True)
class VerifyReport:
    """What `simimg verify` found: problems (none: every checked file is whole), what was checked, rows and files
    written before checksums (not checked), leftovers of killed runs, and what `--repair` did."""

    name: str
    problems: list[DamagedFile]
    checked: dict[str, int]
    unrecorded: dict[str, int]
    leftovers: list[str]
    repaired: list[str] = field(default_factory=list)


def verify(folder: IndexFolder, repair: bool = False) -> VerifyReport:
    """Check every file of the index in `folder`; with `repair`, mend what can be and check again."""
    report = _check(folder)
    if not repair:
        return report
    done = _repair(folder, report)
    return replace(_check(folder), repaired=done)


def _check(folder: IndexFolder) -> VerifyReport:
    if not folder.catalog.is_file():
        raise SimimgError(f"no index named '{folder.name}' in {folder.root.parent}")
    with reading(folder.catalog) as catalog:
        vectors, rows, unrecorded_rows = _check_vectors(catalog)
        faiss, versions, unrecorded_faiss = _check_faiss(catalog, folder)
        models, kept = _check_models(catalog, folder)
    return VerifyReport(
        folder.name,
        [*vectors, *faiss, *models],
        {"vector_rows": rows, "faiss_files": versions, "models": kept},
        {"vector_rows": unrecorded_rows, "faiss_files": unrecorded_faiss},
        _leftovers(folder),
    )


def _check_vectors(catalog: Catalog) -> tuple[list[DamagedFile], int, int]:
    """Every stored vector row against its checksum, shard file by shard file; (problems, rows, rows unrecorded)."""
    problems, rows, unrecorded = [], 0, 0
    for path, located, bad, reason in _shards(catalog):
        rows += len(located)
        unrecorded += sum(crc is None for crc, _ in located.values())
        if bad:
            images = sorted({p for row in bad for p in located[row][1]})
            problems.append(DamagedFile(str(path), "vectors", reason, images))
    return problems, rows, unrecorded


Located = dict[int, tuple[int | None, list[str]]]  # row: (its recorded checksum, the paths of its images)


def _shards(catalog: Catalog) -> Iterator[tuple[Path, Located, list[int], str]]:
    """Each shard file: its rows, those that fail their checksum, and why."""
    by_shard: dict[tuple[str, int, int], Located] = defaultdict(dict)
    for embedding, dim, shard, row, crc, image in catalog.vector_locations():
        by_shard[embedding, dim, shard].setdefault(row, (crc, []))[1].append(image)
    for (embedding, dim, shard), located in by_shard.items():
        file = shard_path(catalog.vectors_dir / embedding, shard)
        yield file, located, *_bad_rows(file, dim, located)


def _bad_rows(path: Path, dim: int, located: Located) -> tuple[list[int], str]:
    """The rows of one shard file that fail their checksum (all of them when the file is gone or short), and why."""
    want = sorted(located)
    stored = path.stat().st_size // (dim * np.dtype(ROW_DTYPE).itemsize) if path.is_file() else 0
    if stored <= want[-1]:
        short = [row for row in want if row >= stored]
        return short, f"holds {stored} rows; the catalog points at row {want[-1]}" if stored else "missing"
    vectors = np.memmap(path, ROW_DTYPE, "r", shape=(stored, dim))[want]
    bad = [row for row, crc in zip(want, row_checksums(vectors)) if located[row][0] not in (None, crc)]
    return bad, f"{len(bad)} vector rows do not match their checksums"


def _check_faiss(catalog: Catalog, folder: IndexFolder) -> tuple[list[DamagedFile], int, int]:
    """The published version's FAISS file and list file against the checksums recorded when it was published
    (older kept versions are only read by a reader that opened one before the switch)."""
    published = catalog.published()
    recorded = catalog.version_checksums(published.version) if published else None
    if published is None or recorded is None:
        return [], 0, int(published is not None)
    files = [
        (folder.faiss(published.version), recorded[0], "faiss"),
        (folder.lists(published.version), recorded[1], "lists"),
    ]
    damaged = []
    for path, crc, kind in files:
        got = None if crc is None else file_checksum(path)
        if got != crc:
            damage = "missing or unreadable" if got is None else "does not match its checksum"
            images = [row.path for row in catalog.iter_rows(published.version)]
            damaged.append(DamagedFile(str(path), kind, f"version {published.version}: {damage}", images))
    return damaged, 1, 0


def _check_models(catalog: Catalog, folder: IndexFolder) -> tuple[list[DamagedFile], int]:
    """Each kept model folder against its manifest; a serving model's damage affects every image it serves."""
    serving = {v.model: v.version for v in catalog.kept_versions()}
    problems, checked = [], 0
    for directory in sorted(folder.models.iterdir()) if folder.models.is_dir() else []:
        if directory.name.startswith(".") or not directory.is_dir():
            continue
        bad = manifest_problems(directory)
        checked += bad is not None
        if bad:
            version = serving.get(directory.name)
            images = [row.path for row in catalog.iter_rows(version)] if version else []
            reason = f"model {directory.name}: {', '.join(bad)} damaged; serve another model (`simimg use`) or retrain"
            problems.append(DamagedFile(str(directory), "model", reason, images))
    return problems, checked


def _leftovers(folder: IndexFolder) -> list[str]:
    """What killed runs leave: a model folder being staged, an atomic write's temporary file."""
    staged = folder.models.glob(".staging-*") if folder.models.is_dir() else []
    return sorted(str(p) for p in [*staged, *folder.root.glob(".*.tmp")])


def _repair(folder: IndexFolder, report: VerifyReport) -> list[str]:
    """Remove leftovers and damaged vector rows under the writer lock, then let an index run embed and rebuild."""
    done: list[str] = []
    with writer_lock(folder.lock, f"index '{folder.name}'"):
        for leftover in report.leftovers:
            _remove(Path(leftover))
            done.append(f"removed {leftover}")
        if any(p.kind == "vectors" for p in report.problems):
            done.append(f"dropped {_forget_damaged(folder)} damaged vectors")
        for damaged in (p for p in report.problems if p.kind == "lists"):  # the index run then builds them again
            Path(damaged.file).unlink(missing_ok=True)
            done.append(f"removed {damaged.file}")
    if any(p.kind in ("vectors", "faiss", "lists") for p in report.problems):
        from simimg.jobs.index import run_index  # torch loads only to embed: a check needs none

        job = read_index_job(folder)
        if job is None:
            raise SimimgError(f"index '{folder.name}' records no index job to embed from: run `simimg index` on it")
        result = run_index(job)
        done.append(f"`simimg index` embedded {result.indexed} images and published version {result.version}")
    return done


def _forget_damaged(folder: IndexFolder) -> int:
    """Drop the vectors at every damaged location, so the next index run embeds those images again."""
    catalog = Catalog(folder.catalog)
    try:
        locations = [(int(path.stem), row) for path, _, bad, _ in _shards(catalog) for row in bad]
        with catalog.transaction():
            return catalog.forget_vectors_at(locations)
    finally:
        catalog.close()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
