"""`simimg index`: scan a folder, embed what is new or changed, and publish a new index version.

Crash-safe by construction: embeddings are committed to the catalog in chunks as a pending version, and a
version becomes visible only when its FAISS file is written and the catalog says so, in one transaction.
Re-running after a crash finds the pending rows and embeds only what is still missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import faiss
import torch

from simimg.catalog import Catalog, NewImage, Row
from simimg.device import resolve_device
from simimg.embed import EmbedSettings, embed_files
from simimg.errors import SimimgError
from simimg.fsutil import atomic_write_bytes
from simimg.faiss_index import build_index, index_kind_for, load_index, save_index, update_index
from simimg.layout import IndexFolder
from simimg.lock import writer_lock
from simimg.model import BUNDLE_JSON, LoadedModel, build_model, load_bundle, save_bundle
from simimg.scan import IMAGE_EXTENSIONS, Record, Skipped, scan_folder

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def default_workers() -> int:
    return min(os.cpu_count() or 1, 16)


def index_workers(requested: int | None, device: torch.device) -> int:
    """Decode processes for indexing: every core when they feed a GPU; none on the CPU, where they would steal
    cores from the forward (2 workers on 2 cores: 0.37x of model-only; decoding inline: 0.92x; benchmarks/)."""
    if requested is not None:
        return requested
    return default_workers() if device.type == "cuda" else 0


@dataclass(frozen=True)
class IndexJob:
    """Everything one `simimg index` run was asked to do; saved as index_job.json beside the index."""

    data_dir: str
    name: str
    home: str
    arch: str | None = None
    weights: str | None = None
    image_size: int | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    chunk_size: int = 512
    compile: bool = False


@dataclass(frozen=True)
class IndexReport:
    name: str
    indexed: int
    removed: int
    total: int
    skipped: list[Skipped]
    seconds: float
    device: str
    version: int
    rebuilt: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [asdict(s) for s in self.skipped]
        return d


@dataclass(frozen=True)
class Plan:
    """What this run must do to bring the catalog's head in line with the folder."""

    to_embed: list[Record]
    to_remove: list[int]
    to_touch: list[tuple[int, int, int]]
    deleted: int


def run_index(job: IndexJob, progress: Progress | None = None) -> IndexReport:
    """Bring the named index up to date with `job.data_dir`; the one entry point for the CLI and the app."""
    started = time.perf_counter()
    paths = IndexFolder.of(job.home, job.name)
    scan = scan_folder(job.data_dir)
    if not scan.records:
        raise SimimgError(f"no images found in {scan.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                          "put images in class folders: <folder>/<class>/<image>")
    device = resolve_device(job.device)
    with writer_lock(paths.lock, f"index '{job.name}'"):
        model = _model_for(job, paths)
        catalog = Catalog(paths.catalog)
        try:
            pending = catalog.version + 1
            rebuilt = _prepare_pending(catalog, pending, model.bundle.fingerprint, scan.root)
            plan = _plan(catalog.head(), scan.records, scan.root)
            settings = EmbedSettings(device, job.batch_size, index_workers(job.workers, device), job.compile)
            failures = _apply(catalog, plan, pending, model, scan.root, settings, job.chunk_size, progress)
            version, total = _publish(catalog, paths, pending, model)
        finally:
            catalog.close()
        atomic_write_bytes(paths.index_job, json.dumps(asdict(job), indent=2).encode())
    skipped = list(scan.skipped) + failures
    for s in skipped:
        log.info("skipped %s: %s", s.path, s.reason)
    return IndexReport(job.name, len(plan.to_embed) - len(failures), plan.deleted, total, skipped,
                       round(time.perf_counter() - started, 3), str(device), version, rebuilt)


def _model_for(job: IndexJob, paths: IndexFolder) -> LoadedModel:
    """The index's own bundle if it has one (a trained model, or the backbone of an earlier run), else a new one."""
    if (paths.root / BUNDLE_JSON).exists():
        loaded = load_bundle(paths.root)
        _check_request_matches(job, loaded)
        return loaded
    if paths.catalog.exists():
        raise SimimgError(f"index '{job.name}' has lost its model ({paths.root / BUNDLE_JSON} is missing); restore "
                          "model.json and model.safetensors from a backup, or delete the folder to start over")
    loaded = build_model(job.arch, job.weights or "imagenet", job.image_size or 224)
    save_bundle(paths.root, loaded.net, loaded.bundle)
    log.info("new index '%s': %s (%s), fingerprint %s", job.name, loaded.bundle.arch, loaded.bundle.source,
             loaded.bundle.fingerprint)
    return loaded


def _check_request_matches(job: IndexJob, loaded: LoadedModel) -> None:
    """Explicit flags that disagree with the index's model are a mistake, never a silent mix of two models."""
    b = loaded.bundle
    asked = {"--arch": (job.arch, b.arch), "--image-size": (job.image_size, b.preprocess.crop_size),
             "--weights": (job.weights, b.info.get("weights", job.weights))}
    wrong = [f"{flag} {want} (it uses {have})" for flag, (want, have) in asked.items() if want is not None and want != have]
    if wrong:
        raise SimimgError(f"fingerprint mismatch: index '{job.name}' was built with {b.arch} ({b.source}, "
                          f"fingerprint {b.fingerprint}), not {', '.join(wrong)}. Drop those flags to update it, "
                          "or pick another --name for a new index.")


def _prepare_pending(catalog: Catalog, pending: int, fingerprint: str, root: Path) -> bool:
    """Resume an interrupted run of the same model; a different model discards it and retires every old row."""
    with catalog.transaction():
        if catalog.get_meta("pending_fingerprint") not in (None, fingerprint):
            log.info("discarding %d embeddings of an interrupted run with another model", catalog.discard_pending(pending))
        published = catalog.version_info(catalog.version)
        rebuilt = published is not None and published[0] != fingerprint
        if rebuilt:
            log.info("the model changed since version %d: rebuilding the index with the new one", catalog.version)
            catalog.retire_published(pending)
        catalog.set_meta(pending_fingerprint=fingerprint, data_root=str(root.resolve()))
    return rebuilt


def _plan(head: dict[str, Row], records: tuple[Record, ...], root: Path) -> Plan:
    """New files and changed contents get embedded; same size and mtime, or same hash, keep their vector."""
    to_embed, to_remove, to_touch = [], [], []
    for rec in records:
        row = head.get(rec.path)
        if row is None:
            to_embed.append(rec)
            continue
        try:
            st = os.stat(root / rec.path)
        except OSError:
            st = None
        if st is not None and row.label == rec.label:
            if (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns):
                continue
            if st.st_size == row.size and _sha256_file(root / rec.path) == row.sha256:
                to_touch.append((row.id, st.st_size, st.st_mtime_ns))
                continue
        to_remove.append(row.id)
        to_embed.append(rec)
    present = {rec.path for rec in records}
    gone = [row.id for path, row in head.items() if path not in present]
    return Plan(to_embed, to_remove + gone, to_touch, len(gone))


def _apply(catalog: Catalog, plan: Plan, pending: int, model: LoadedModel, root: Path, settings: EmbedSettings,
           chunk_size: int, progress: Progress | None) -> list[Skipped]:
    """Record removals, then embed and commit new vectors chunk by chunk (each chunk survives a crash)."""
    with catalog.transaction():
        catalog.remove(plan.to_remove, pending)
        for row_id, size, mtime_ns in plan.to_touch:
            catalog.touch(row_id, size, mtime_ns)
    files = [root / rec.path for rec in plan.to_embed]
    failures: list[Skipped] = []
    buffer: list[NewImage] = []
    done = 0
    if progress:
        progress(0, len(files))
    for batch in embed_files(model.net, files, model.bundle.preprocess, settings) if files else ():
        for pos, vector, sha in zip(batch.positions, batch.vectors, batch.hashes):
            rec = plan.to_embed[pos]
            try:
                st = os.stat(files[pos])
            except OSError:
                failures.append(Skipped(rec.path, "the file disappeared while it was being indexed"))
                continue
            buffer.append(NewImage(rec.path, rec.label, st.st_size, st.st_mtime_ns, sha, vector))
        failures += [Skipped(plan.to_embed[pos].path, reason) for pos, reason in batch.failures]
        if len(buffer) >= chunk_size:
            _commit(catalog, buffer, pending)
        done += len(batch.positions) + len(batch.failures)
        if progress:
            progress(done, len(files))
    _commit(catalog, buffer, pending)
    return failures


def _commit(catalog: Catalog, buffer: list[NewImage], pending: int) -> None:
    if buffer:
        with catalog.transaction():
            catalog.add(buffer, pending)
        buffer.clear()


def _publish(catalog: Catalog, paths: IndexFolder, pending: int, model: LoadedModel) -> tuple[int, int]:
    """Write the FAISS file for the pending version, then make it the published one; (version, total)."""
    fp = model.bundle.fingerprint
    current = catalog.version
    published = catalog.version_info(current)
    added, removed = catalog.pending_changes(pending)
    previous = _reusable_index(paths, current, published, fp)
    if previous is not None and not added and not removed:
        return current, published[1]
    total = catalog.count(pending)
    kind = index_kind_for(total)
    index = None
    if previous is not None and published[2] == kind:
        new_ids, new_vectors = catalog.vectors(pending, where="added = :v")
        index = update_index(previous, new_ids, new_vectors, catalog.removed_ids(pending))
        if index.ntotal != total:
            log.warning("FAISS file of version %d disagreed with the catalog; rebuilding it", current)
            index = None
    if index is None:
        ids, vectors = catalog.vectors(pending)
        index = build_index(ids, vectors, model.net.dim, kind)
    save_index(index, paths.faiss(pending))
    with catalog.transaction():
        catalog.publish(pending, fp, kind)
    for old in paths.faiss_files():
        if old < paths.faiss(pending - 1):
            old.unlink(missing_ok=True)
    log.info("published version %d of '%s': %d vectors (+%d, -%d)", pending, paths.name, total, added, removed)
    return pending, total


def _reusable_index(paths: IndexFolder, version: int, published: tuple[str, int, str] | None,
                    fingerprint: str) -> faiss.Index | None:
    """The published FAISS index when it is intact and of this model; None means: rebuild it from the catalog."""
    if published is None or published[0] != fingerprint:
        return None
    try:
        index = load_index(paths.faiss(version))
    except SimimgError as err:
        log.warning("%s: rebuilding it from the catalog", err)
        return None
    if index.ntotal != published[1]:
        log.warning("FAISS file of version %d holds %d vectors, the catalog %d: rebuilding it", version,
                    index.ntotal, published[1])
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
