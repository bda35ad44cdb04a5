"""`simimg index`: scan a folder, embed what is new, changed or missing, and publish a new index version.

Crash-safe by construction: embeddings are committed to the catalog in chunks as a pending version, and a
version becomes visible only when its FAISS file is written and the catalog says so, in one transaction.
Re-running after a crash finds the pending rows and embeds only what is still missing.

A version names the model that answers for it. A run embeds with the model the published version names, or with
the one it is asked to switch to (`model`: the end of `simimg train`, or `simimg use`): vectors are stored per
(image, embedding), so the new model's vectors are written while readers keep answering from the old ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from simimg.dataset.scan import IMAGE_EXTENSIONS, Record, Skipped, scan_folder
from simimg.errors import SimimgError
from simimg.faults import publish_step
from simimg.fsutil import atomic_copy, atomic_write_bytes
from simimg.jobs.engines import Engine, LocalEngine, open_engine
from simimg.jobs.index_config import IndexJob, IndexReport, ToEmbed, read_index_job
from simimg.jobs.int8 import gated_compute
from simimg.jobs.upgrade import needs_upgrade, upgrade
from simimg.memory import physical_memory
from simimg.models.encoder import EmbeddedBatch
from simimg.models.net import LoadedModel, build_model
from simimg.progress import Phase, Progress
from simimg.store.ann import (
    build_from_stored,
    check_kind,
    index_kind_for,
    load_index,
    outgrown,
    save_index,
    update_index,
)
from simimg.store.ann_ivfpq import PartEncoder, encode_here, lists_on_disk, update_on_disk, wants_disk
from simimg.store.catalog import Catalog, NewImage, Published, Row, reading
from simimg.store.checksums import version_checksums
from simimg.store.edits import forget_paths, read_corrections
from simimg.store.layout import IndexFolder
from simimg.store.lock import writer_lock
from simimg.store.model_store import (
    kept_embeddings,
    load_model,
    prune_models,
    publish_model,
    read_model,
    resolve_fingerprint,
    resolve_weights,
)
from simimg.store.precision import record_precision
from simimg.store.served import faiss_whole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What this run must do to bring the catalog's head in line with the folder."""

    to_embed: list[Record]
    to_remove: list[int]
    to_touch: list[tuple[int, int, int]]
    deleted: int
    to_relabel: list[tuple[int, str | None]] = field(default_factory=list)


def run_index(job: IndexJob, progress: Progress | None = None, on_phase: Phase | None = None) -> IndexReport:
    """Bring the named index up to date with `job.data_dir`; the one entry point for every caller and engine.

    `on_phase` hears each step as it starts (scanning, loading the model, embedding, publishing), so a caller can
    say what a long run is doing before the first image is embedded.
    """
    started = time.perf_counter()
    phase = on_phase or (lambda _: None)
    folder = IndexFolder.of(job.home, job.name)
    phase("scanning")
    job = replace(job, unlabeled=_asked_pool(job, folder))
    scan = scan_folder(job.data_dir, job.unlabeled)
    if not scan.records:
        raise SimimgError(
            f"no images found in {scan.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put images in class folders: <folder>/<class>/<image>"
        )
    if needs_upgrade(folder):
        upgrade(folder)
    kind = _asked_kind(job, folder)
    job = replace(job, index_kind=kind, on_disk=_asked_on_disk(job, folder))
    phase("loading the model")
    with open_engine(job, folder) as engine, writer_lock(folder.lock, f"index '{job.name}'", wait=job.wait):
        model = _model_for(job, folder)  # before the catalog exists: a first run that cannot get a model leaves none
        catalog = Catalog(folder.catalog)
        try:
            pending = catalog.version + 1
            rebuilt = _prepare_pending(catalog, model, scan.root)
            engine, gate = _with_precision(engine, model, catalog, scan.root, scan.records)
            records, excluded = _corrected(catalog, scan.records)
            plan = _plan(catalog.head(), records, scan.root, excluded)
            _record_plan(catalog, plan, pending)
            run = f"v{pending:06d}-{model.bundle.embedding}"
            work = _work(catalog, plan, pending, model)
            batches = engine.embed(model, scan.root, run, work)
            phase("embedding")
            embedded, failures = _apply(catalog, pending, model, scan.root, work, batches, job.chunk_size, progress)
            phase("publishing")
            version, total = _publish(catalog, folder, pending, model, kind, engine.encode_parts, job.on_disk)
            engine.finish(run)
            _tidy(catalog, folder)
        finally:
            catalog.close()
        atomic_write_bytes(folder.index_job, json.dumps(asdict(job), indent=2).encode())
    skipped = list(scan.skipped) + failures
    for s in skipped:
        log.info("skipped %s: %s", s.path, s.reason)
    return IndexReport(
        job.name,
        embedded,
        plan.deleted,
        total,
        skipped,
        round(time.perf_counter() - started, 3),
        engine.description,
        version,
        rebuilt,
        model.bundle.fingerprint,
        len(plan.to_relabel),
        len(excluded),
        gate,
    )


def _with_precision(
    engine: Engine, model: LoadedModel, catalog: Catalog, root: Path, records: Sequence[Record]
) -> tuple[Engine, dict[str, Any] | None]:
    """The engine embedding in the precision this run uses (int8 only behind its gate: jobs/int8.py), recorded
    with the index; and the gate's record when int8 was tried. The ray engine resolves its own (never int8)."""
    if not isinstance(engine, LocalEngine):
        return engine, None
    compute, gate = gated_compute(engine.settings.compute, model, catalog, root, [r.path for r in records])
    with catalog.transaction():
        record_precision(catalog, compute)
    return replace(engine, settings=replace(engine.settings, compute=compute)), gate


def _model_for(job: IndexJob, folder: IndexFolder) -> LoadedModel:
    """The model asked for, else the one the published (or interrupted first) version names, else a new one."""
    if job.model:
        return load_model(folder, resolve_fingerprint(folder, job.model))
    published, current = None, None
    if Catalog.initialised(folder.catalog):
        with reading(folder.catalog) as catalog:
            published = catalog.published()
            current = published.model if published else catalog.get_meta("pending_model")
    if current is not None and (published is not None or folder.model_dir(current).is_dir()):
        loaded = load_model(folder, current)
        _check_request_matches(job, loaded)
        return loaded
    loaded = build_model(job.arch, resolve_weights(job.weights or "imagenet"), job.image_size or 224)
    publish_model(folder, loaded.net, loaded.bundle)
    log.info(
        "new index '%s': %s (%s), model %s",
        job.name,
        loaded.bundle.arch,
        loaded.bundle.source,
        loaded.bundle.fingerprint,
    )
    return loaded


def _check_request_matches(job: IndexJob, loaded: LoadedModel) -> None:
    """Explicit flags that disagree with the index's model are a mistake, never a silent mix of two models."""
    b = loaded.bundle
    asked = {
        "--arch": (job.arch, b.arch),
        "--image-size": (job.image_size, b.preprocess.crop_size),
        "--weights": (job.weights, b.info.get("weights", job.weights)),
    }
    wrong = [
        f"{flag} {want} (it uses {have})" for flag, (want, have) in asked.items() if want is not None and want != have
    ]
    if wrong:
        raise SimimgError(
            f"fingerprint mismatch: index '{job.name}' serves {b.arch} ({b.source}, model "
            f"{b.fingerprint}), not {', '.join(wrong)}. Drop those flags to update it, "
            "or pick another --name for a new index."
        )


def _prepare_pending(catalog: Catalog, model: LoadedModel, root: Path) -> bool:
    """Record what the pending version is for; True when it changes the published version's embedding."""
    with catalog.transaction():
        published = catalog.published()
        rebuilt = False
        if published is not None and published.embedding != model.bundle.embedding:
            rebuilt = True
            log.info(
                "the model's embedding differs from version %d's: every image gets a vector of the new one",
                published.version,
            )
        catalog.set_meta(pending_model=model.bundle.fingerprint, data_root=str(root.resolve()))
    return rebuilt


def _corrected(catalog: Catalog, records: tuple[Record, ...]) -> tuple[tuple[Record, ...], frozenset[str]]:
    """The scan as the user's label edits have it (relabelled, excluded left out), and the paths it excludes;
    the edits of files that are gone go too (an edit follows its path while the file is there)."""
    corrections = read_corrections(catalog)
    present = {r.path for r in records}
    gone = {e.path for e in corrections.edits} - present
    if gone:
        with catalog.transaction():
            forget_paths(catalog, gone)
        log.info("dropped the label edits of %d files that are gone", len(gone))
    return corrections.apply(records), corrections.excluded & present


def _plan(
    head: dict[str, Row], records: tuple[Record, ...], root: Path, excluded: frozenset[str] = frozenset()
) -> Plan:
    """New files and changed contents get embedded; same size and mtime, or same hash, keep their vector, under
    their label now (a label edit only relabels)."""
    to_embed, to_remove, to_touch, to_relabel = [], [], [], []
    for rec in records:
        row = head.get(rec.path)
        if row is None:
            to_embed.append(rec)
            continue
        try:
            st = os.stat(root / rec.path)
        except OSError:
            st = None
        if st is not None:
            unchanged = (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns)
            if unchanged or (st.st_size == row.size and _sha256_file(root / rec.path) == row.sha256):
                to_touch += [] if unchanged else [(row.id, st.st_size, st.st_mtime_ns)]
                to_relabel += [(row.id, rec.label)] if row.label != rec.label else []
                continue
        to_remove.append(row.id)
        to_embed.append(rec)
    present = {rec.path for rec in records}
    gone = [row.id for path, row in head.items() if path not in present]
    deleted = sum(path not in present and path not in excluded for path in head)
    return Plan(to_embed, to_remove + gone, to_touch, deleted, to_relabel)


@dataclass
class _Chunk:
    """Embedded results waiting to be committed together: new image rows, and vectors for existing rows."""

    images: list[NewImage]
    image_vectors: list[np.ndarray]
    row_ids: list[int]
    row_vectors: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.images) + len(self.row_ids)


def _record_plan(catalog: Catalog, plan: Plan, pending: int) -> None:
    """Deleted and replaced rows leave the pending version; a new mtime over the same bytes keeps its row."""
    with catalog.transaction():
        catalog.remove(plan.to_remove, pending)
        for row_id, size, mtime_ns in plan.to_touch:
            catalog.touch(row_id, size, mtime_ns)
        catalog.relabel(plan.to_relabel, pending)


def _work(catalog: Catalog, plan: Plan, pending: int, model: LoadedModel) -> ToEmbed:
    """What needs a vector: new and changed files, then rows visible at `pending` lacking the target embedding."""
    return [*plan.to_embed, *catalog.missing_vectors(pending, model.bundle.embedding)]


def _apply(
    catalog: Catalog,
    pending: int,
    model: LoadedModel,
    root: Path,
    work: ToEmbed,
    batches: Iterator[EmbeddedBatch],
    chunk_size: int,
    progress: Progress | None,
) -> tuple[int, list[Skipped]]:
    """Ingest an engine's results for `work`, committing chunk by chunk; rows that became unreadable leave.

    Returns how many images got a vector, and the files passed over with the reason, in work order.
    """
    failures: list[tuple[int, Skipped]] = []
    chunk = _Chunk([], [], [], [])
    done = 0
    if progress:
        progress(0, len(work))
    for batch in batches:
        stats: Sequence[tuple[int, int] | None] = batch.stats or [None] * len(batch.positions)
        for pos, vector, sha, stat in zip(batch.positions, batch.vectors, batch.hashes, stats):
            failure = _collect(chunk, work[pos], root / work[pos].path, vector, sha, stat)
            failures += [(pos, failure)] if failure else []
        failures += [(pos, Skipped(work[pos].path, reason)) for pos, reason in batch.failures]
        lost = [item.id for pos, _ in batch.failures if isinstance(item := work[pos], Row)]
        if len(chunk) >= chunk_size or lost:
            _commit(catalog, chunk, lost, pending, model.bundle.embedding)
        done += len(batch.positions) + len(batch.failures)
        if progress:
            progress(done, len(work))
    _commit(catalog, chunk, [], pending, model.bundle.embedding)
    return len(work) - len(failures), [skipped for _, skipped in sorted(failures, key=lambda f: f[0])]


def _collect(
    chunk: _Chunk, item: Record | Row, file: Path, vector: np.ndarray, sha: str, stat: tuple[int, int] | None
) -> Skipped | None:
    """Add one embedded file to the chunk: a new row for a new file, a vector for a row that lacked one.

    `stat` is the (size, mtime_ns) the reader saw before reading the bytes; None: look now.
    """
    if isinstance(item, Row):
        chunk.row_ids.append(item.id)
        chunk.row_vectors.append(vector)
        return None
    if stat is None:
        try:
            st = os.stat(file)
        except OSError:
            return Skipped(item.path, "the file disappeared while it was being indexed")
        stat = (st.st_size, st.st_mtime_ns)
    chunk.images.append(NewImage(item.path, item.label, *stat, sha))
    chunk.image_vectors.append(vector)
    return None


def _commit(catalog: Catalog, chunk: _Chunk, lost: list[int], pending: int, embedding: str) -> None:
    """One transaction: the chunk's rows and vectors, and existing rows that could no longer be read leave."""
    if not len(chunk) and not lost:
        return
    with catalog.transaction():
        if chunk.images:
            catalog.add(chunk.images, np.stack(chunk.image_vectors), embedding, pending)
        if chunk.row_ids:
            catalog.add_vectors(embedding, chunk.row_ids, np.stack(chunk.row_vectors))
        catalog.remove(lost, pending)
    chunk.images.clear()
    chunk.image_vectors.clear()
    chunk.row_ids.clear()
    chunk.row_vectors.clear()


def _asked_pool(job: IndexJob, folder: IndexFolder) -> str | None:
    """The job's outside unlabeled folder, else the one the last run was given (a plain re-index keeps it)."""
    if job.unlabeled is not None:
        return job.unlabeled or None  # "" drops it
    recorded = read_index_job(folder)
    return recorded.unlabeled if recorded else None


def _asked_on_disk(job: IndexJob, folder: IndexFolder) -> bool | None:
    """The job's choice of on-disk lists, else the last run's; None: auto (ann_ivfpq.wants_disk)."""
    recorded = read_index_job(folder) if job.on_disk is None else None
    return job.on_disk if recorded is None else recorded.on_disk


def _asked_kind(job: IndexJob, folder: IndexFolder) -> str:
    """The job's index kind, else the one the last run was given, else auto; an unknown one fails before work."""
    recorded = read_index_job(folder) if job.index_kind is None else None
    return check_kind(job.index_kind or (recorded.index_kind if recorded else None) or "auto")


def _publish(
    catalog: Catalog,
    folder: IndexFolder,
    pending: int,
    model: LoadedModel,
    asked_kind: str = "auto",
    encode: PartEncoder = encode_here,
    on_disk: bool | None = None,
) -> tuple[int, int]:
    """Write the FAISS file (and list file) of the pending version, then make it the published one; (version,
    total). Published files are never written to: a new version gets new files, or links to unchanged ones."""
    published = catalog.published()
    emb = model.bundle.embedding
    added, removed = catalog.pending_changes(pending)
    previous = _reusable_index(catalog, folder, published, emb)
    total = catalog.count(pending)
    kind = index_kind_for(total, asked_kind)
    lists = _lists_of(folder, pending, kind, total, model.bundle.dim, on_disk)
    same = previous if published is not None and published.index_kind == kind else None
    if same is not None and lists_on_disk(same) and lists is None:
        same = None  # lists on disk are read-only: back in RAM means building afresh
    to_disk = same is not None and lists is not None and not lists_on_disk(same)
    if published is not None and same is not None and not (added or removed or to_disk):
        if published.model == model.bundle.fingerprint:
            return published.version, published.count
        if lists is not None:  # a new head on the same vectors: links to the same files
            atomic_copy(folder.lists(published.version), lists)
        atomic_copy(folder.faiss(published.version), folder.faiss(pending))
    else:
        index = _updated(catalog, same, pending, emb, total, lists, encode)
        if index is None:
            stored = catalog.stored_vectors(pending, emb)
            index = build_from_stored(stored.ids, stored, model.bundle.dim, kind, encode, lists)
        save_index(index, folder.faiss(pending))
    checksums = version_checksums(folder, pending)
    publish_step(f"version {pending} ready to commit")
    with catalog.transaction():
        catalog.publish(pending, model.bundle.fingerprint, emb, kind, checksums)
    publish_step(f"version {pending} committed")
    log.info(
        "published version %d of '%s': %d vectors (+%d, -%d), model %s%s",
        pending,
        folder.name,
        total,
        added,
        removed,
        model.bundle.fingerprint,
        ", lists on disk" if lists is not None else "",
    )
    return pending, total


def _lists_of(folder: IndexFolder, pending: int, kind: str, total: int, dim: int, asked: bool | None) -> Path | None:
    """The list file of the pending version when its lists go on disk, else None (they stay in the FAISS file)."""
    if kind != "ivfpq":
        if asked:
            log.info("lists stay in RAM: only compressed (ivfpq) indexes keep them on disk, this one is %s", kind)
        return None
    return folder.lists(pending) if wants_disk(total, dim, asked, physical_memory()) else None


def _updated(
    catalog: Catalog,
    previous: faiss.Index | None,
    pending: int,
    embedding: str,
    total: int,
    lists: Path | None = None,
    encode: PartEncoder = encode_here,
) -> faiss.Index | None:
    """The published index of the same kind with the pending version's changes applied, in RAM or merged into a
    new list file `lists`; None: build it afresh (there is none, it was trained for far fewer vectors, or it
    disagrees with the catalog)."""
    if previous is None:
        return None
    if outgrown(previous, total):
        log.info(
            "the index has outgrown the %d lists it was trained with: training it afresh for %d vectors",
            faiss.extract_index_ivf(previous).nlist,
            total,
        )
        return None
    if lists is None:
        new_ids, new_vectors = catalog.vectors(pending, embedding, where="added = :v")
        index = update_index(previous, new_ids, new_vectors, catalog.removed_ids(pending))
    else:
        added = catalog.stored_vectors(pending, embedding, where="added = :v")
        index = update_on_disk(previous, added.ids, added, catalog.removed_ids(pending), lists, encode)
    if index.ntotal != total:
        log.warning("the published FAISS file disagreed with the catalog; rebuilding it")
        return None
    return index


def _tidy(catalog: Catalog, folder: IndexFolder) -> None:
    """After a publish: drop FAISS and list files, models and vectors that no kept version needs, and sparse shards."""
    kept = catalog.kept_versions()
    oldest = min((v.version for v in kept), default=0)
    for files, first in ((folder.faiss_files(), folder.faiss(oldest)), (folder.list_files(), folder.lists(oldest))):
        for old in files:
            if old < first:  # a reader still serving it keeps its memory maps: unlinking never pulls pages away
                old.unlink(missing_ok=True)
    publish_step("old FAISS files removed")
    prune_models(folder, {v.model for v in kept})
    with catalog.transaction():
        dropped = catalog.drop_embeddings(kept_embeddings(folder) | {v.embedding for v in kept})
        compacted = catalog.compact()
    if dropped or compacted:
        log.info("dropped the vectors of %d unused embeddings, compacted %d shards", len(dropped), compacted)
    catalog.clean_files()


def _reusable_index(
    catalog: Catalog, folder: IndexFolder, published: Published | None, embedding: str
) -> faiss.Index | None:
    """The published FAISS index when it is intact and of this embedding; None means: build it from the catalog."""
    if published is None or published.embedding != embedding:
        return None
    if not faiss_whole(folder, catalog, published.version):
        log.warning(
            "the FAISS file of version %d does not match its checksum: rebuilding it from the vectors",
            published.version,
        )
        return None
    try:
        index = load_index(folder.faiss(published.version))
    except SimimgError as err:
        log.warning("%s: rebuilding it from the catalog", err)
        return None
    if index.ntotal != published.count:
        log.warning(
            "FAISS file of version %d holds %d vectors, the catalog %d: rebuilding it",
            published.version,
            index.ntotal,
            published.count,
        )
        return None
    return index


def _sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def switch_model(
    home: str | Path | None,
    name: str,
    model: str,
    data_dir: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    progress: Progress | None = None,
    precision: str = "auto",
    on_phase: Phase | None = None,
) -> IndexReport:
    """Publish a version of NAME answered by its kept `model`, over the index's own collection.

    The collection is the folder the index was last built from (index_job.json), else `data_dir`, else the
    folder the model was trained on. Only images with no vector of that model's embedding are embedded: none
    after a head-only run, all after a fine-tune. Waits for another writer rather than failing: it ends long jobs.
    """
    folder = IndexFolder.of(home, name)
    recorded = read_index_job(folder)
    data_dir = data_dir or read_model(folder, model).info.get("training", {}).get("split", {}).get("data_dir")
    if recorded is None and data_dir is None:
        raise SimimgError(
            f"index '{name}' records no collection folder (index_job.json is missing): "
            f"run `simimg index DATA_DIR --name {name}` once"
        )
    base = recorded or IndexJob(data_dir=str(data_dir), name=name, home=str(folder.root.parent))
    job = replace(
        base,
        name=name,
        home=str(folder.root.parent),
        arch=None,
        weights=None,
        image_size=None,
        device=device,
        precision=precision,
        workers=workers,
        model=model,
        wait=True,
        engine="local",
        address=None,
        ray_actors=None,
        ray_shards=None,
    )
    return run_index(job, progress, on_phase)
