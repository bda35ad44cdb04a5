"""`simimg predict`: classify every image under a folder into one file (csv, parquet or jsonl), a row per image.

Each row holds the image's path, its top labels and their probabilities (the serving model's classifier), the
margin between the first two, its nearest labelled image in the index (the published version's FAISS) with that
image's label and cosine, and an `uncertain` flag: a small margin, or a neighbour labelled otherwise. Unreadable
files are reported by path, never fatal.

The embed step is `simimg index`'s (jobs/engines.py: this process, or Ray Data with `engine="ray"`). Results go
into OUT.parts/ part by part (`chunk_size` images, each part written whole), so a killed run resumes: the next run
with the same index version, model and options embeds only what its parts lack (or what changed since), then
merges the parts in path order into OUT in one atomic step. Parts of another run (another model, version or
options) are removed first, never mixed in. Rows go to disk as they come; only paths are held per image.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simimg.choices import PREDICT_FORMATS
from simimg.dataset.scan import IMAGE_EXTENSIONS, Record, Skipped, scan_folder
from simimg.errors import SimimgError
from simimg.fsutil import atomic_target, atomic_write_bytes, size_and_mtime
from simimg.jobs.engines import Engine, open_engine
from simimg.jobs.index_config import IndexJob
from simimg.jobs.predict_config import COLUMNS, PredictJob, PredictReport
from simimg.models.device import resolve_compute
from simimg.models.encoder import EmbeddedBatch, ranked_classes
from simimg.models.net import LoadedModel
from simimg.progress import Phase, Progress
from simimg.store.ann import VectorSearcher
from simimg.store.catalog import Catalog, Snapshot, reading
from simimg.store.layout import IndexFolder
from simimg.store.lock import writer_lock
from simimg.store.model_store import load_model, no_classifier, serving_model
from simimg.store.served import open_searcher, positions_of, whole_snapshot

log = logging.getLogger(__name__)

FORMAT_OF_SUFFIX = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
NEIGHBOURS = 2  # hits searched per image: its own file (when the folder is indexed) and its nearest other image
MERGE_FAN_IN = 64  # parts read at once while merging; more are merged in rounds, so few files are open at once
PARQUET_ROW_GROUP = 65_536
PartRecord = dict[str, Any]  # a line of a part: path, size, mtime_ns, and the row, or the reason the file failed
Neighbour = tuple[str, str | None, float]  # (path, label, cosine) of a gallery image


def run_predict(job: PredictJob, progress: Progress | None = None, on_phase: Phase | None = None) -> PredictReport:
    """Classify every image under `job.data_dir` into `job.out`; resumes what a killed run of the same job left.

    `on_phase` hears each step as it starts: scanning, loading the model, classifying, writing.
    """
    started = time.perf_counter()
    phase = on_phase or (lambda _: None)
    out, fmt = output_target(job)
    folder = IndexFolder.of(job.home, job.name)
    serving_model(folder)  # no index, or no finished version: an error that says what to run
    phase("scanning")
    scan = scan_folder(job.data_dir)
    if not scan.records:
        raise SimimgError(f"no images found under {scan.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    root = scan.root.resolve()
    parts = Parts(out.with_name(out.name + ".parts"))
    phase("loading the model")
    with reading(folder.catalog) as catalog:
        version = Version.open(folder, catalog, job)
        # the engine keeps a run's resumable state under `folder.runs`, keyed by that folder: the parts folder gives
        # this output's runs a place and a key of their own, apart from the index's
        with open_engine(_engine_job(job), IndexFolder(parts.root)) as engine, writer_lock(parts.lock, f"{out}"):
            key = _run_key(job, root, folder, version)
            work = parts.resume(key, scan.records, root)
            resumed = len(scan.records) - len(work)
            phase("classifying")
            _classify(engine, version, root, work, job, parts, _Counter(progress, resumed, len(scan.records)))
            engine.finish(version.run)
            phase("writing")
            tally = write_output(parts.merged({r.path for r in scan.records}), out, fmt, version.columns(job.top_k))
            atomic_write_bytes(out.with_name(out.name + ".job.json"), json.dumps({**key, "job": asdict(job)}).encode())
            parts.remove()
    skipped = list(scan.skipped) + tally.skipped
    for s in skipped:
        log.info("skipped %s: %s", s.path, s.reason)
    return PredictReport(
        job.name,
        str(root),
        str(out),
        fmt,
        tally.rows,
        tally.uncertain,
        skipped,
        resumed,
        round(time.perf_counter() - started, 3),
        engine.description,
        version.snapshot.model,
        version.snapshot.version,
    )


def output_target(job: PredictJob) -> tuple[Path, str]:
    """The output file and its format (`job.format`, else OUT's extension); options that cannot work fail here."""
    out = Path(job.out).expanduser().absolute()
    fmt = job.format or FORMAT_OF_SUFFIX.get(out.suffix.lower())
    if fmt is None:
        raise SimimgError(
            f"cannot tell the format of {out.name} from its extension: pass --format ({', '.join(PREDICT_FORMATS)})"
        )
    if fmt not in PREDICT_FORMATS:
        raise SimimgError(f"unknown format {fmt!r}: use {', '.join(PREDICT_FORMATS)}")
    if job.top_k < 1 or job.chunk_size < 1 or job.batch_size < 1:
        raise SimimgError("top_k, chunk_size and batch_size must be at least 1")
    if not 0 <= job.uncertain_margin <= 1:
        raise SimimgError(f"uncertain_margin {job.uncertain_margin} is not a probability between 0 and 1")
    if out.is_dir():
        raise SimimgError(f"{out} is a folder: --out names the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, fmt


def _run_key(job: PredictJob, root: Path, folder: IndexFolder, version: Version) -> dict[str, Any]:
    """What the rows depend on: parts written under another key are never mixed into this run's output."""
    return {
        "data_dir": str(root),
        "index": str(folder.root.resolve()),
        "version": version.snapshot.version,
        "model": version.snapshot.model,
        "top_k": job.top_k,
        "uncertain_margin": job.uncertain_margin,
    }


def _engine_job(job: PredictJob) -> IndexJob:
    """The embed step's settings, as `simimg index` gives them to an engine."""
    return IndexJob(
        job.data_dir,
        job.name,
        job.home,
        device=job.device,
        precision=job.precision,
        batch_size=job.batch_size,
        workers=job.workers,
        chunk_size=job.chunk_size,
        engine=job.engine,
        address=job.address,
        ray_actors=job.ray_actors,
        ray_shards=job.ray_shards,
    )


# --- the version that answers: its model and its labelled images -------------------------------------------
@dataclass(frozen=True)
class Version:
    """The published version a run answers with: its model (which has a classifier) and its labelled images."""

    snapshot: Snapshot
    model: LoadedModel
    searcher: VectorSearcher
    labelled: np.ndarray | None  # ids of the labelled images when some have no label (the unlabelled pool)
    data_root: str  # the folder the version's paths are relative to, resolved: an image is not its own neighbour

    @classmethod
    def open(cls, folder: IndexFolder, catalog: Catalog, job: PredictJob) -> Version:
        snapshot = catalog.snapshot()
        if snapshot is None:
            raise SimimgError(f"index '{folder.name}' has no finished version yet: run `simimg index`")
        snapshot = whole_snapshot(folder, catalog, snapshot)
        model = load_model(folder, snapshot.model)
        if not model.bundle.has_classifier:
            raise no_classifier(folder)
        device = resolve_compute(job.device, job.precision).device
        searcher = open_searcher(folder, catalog, snapshot, device)
        has_label = np.array([label is not None for label in snapshot.labels], bool)
        labelled = None if has_label.all() else snapshot.ids[has_label]
        return cls(snapshot, model, searcher, labelled, catalog.get_meta("data_root", ""))

    @property
    def run(self) -> str:
        """The engine's name for this version's work (what a killed Ray run's shards are found under)."""
        return f"predict-{self.snapshot.model}-v{self.snapshot.version:06d}"

    def top(self, asked: int) -> int:
        """Top labels per row: as asked, or as many as the classifier has classes."""
        return min(asked, len(self.model.bundle.classes))

    def columns(self, asked: int) -> list[str]:
        tops = [f"{what}_{i}" for i in range(1, self.top(asked) + 1) for what in ("label", "probability")]
        return [*COLUMNS, *tops]

    def nearest(self, vectors: np.ndarray, files: Sequence[str]) -> list[Neighbour | None]:
        """Each vector's most similar labelled image, its own file (absolute `files`) aside; None when there is none."""
        if self.labelled is not None and not len(self.labelled):
            return [None] * len(files)
        scores, ids = self.searcher.search(vectors, NEIGHBOURS, self.labelled)
        found: list[Neighbour | None] = []
        for file, row_scores, row_positions in zip(files, scores.tolist(), positions_of(self.snapshot, ids).tolist()):
            hits = (
                (self.snapshot.paths[pos], self.snapshot.labels[pos], round(float(score), 6))
                for score, pos in zip(row_scores, row_positions)
                if pos >= 0 and os.path.join(self.data_root, self.snapshot.paths[pos]) != file
            )
            found.append(next(hits, None))
        return found


# --- embedded batches to rows ------------------------------------------------------------------------------
@dataclass
class _Counter:
    """The run's progress over the whole folder: what the parts already held counts as done."""

    progress: Progress | None
    done: int
    total: int

    def add(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)


def _classify(
    engine: Engine, version: Version, root: Path, work: list[Record], job: PredictJob, parts: Parts, counter: _Counter
) -> None:
    """Embed `work` on the engine and write a part every `chunk_size` images (rows and failures alike)."""
    counter.add(0)
    for batch in engine.embed(version.model, root, version.run, work, logits=True):
        parts.add(classify_batch(batch, work, root, version, job), job.chunk_size)
        counter.add(len(batch.positions) + len(batch.failures))
    parts.flush()


def classify_batch(
    batch: EmbeddedBatch, work: Sequence[Record], root: Path, version: Version, job: PredictJob
) -> list[PartRecord]:
    """One engine batch as part records: a row per embedded image, its reason per failed one."""
    records: list[PartRecord] = []
    paths = [work[pos].path for pos in batch.positions]
    if paths:
        assert batch.logits is not None, "the engine was asked for logits"
        values, order = ranked_classes(torch.from_numpy(batch.logits), max(version.top(job.top_k), 2))
        neighbours = version.nearest(batch.vectors, [os.path.join(root, path) for path in paths])
        stats: Sequence[tuple[int, int] | None] = batch.stats or [size_and_mtime(root / path) for path in paths]
        for path, probabilities, ranked, neighbour, stat in zip(
            paths, values.tolist(), order.tolist(), neighbours, stats
        ):
            row = make_row(path, probabilities, ranked, neighbour, version, job)
            records.append({"path": path, **_stamp(stat), "row": row})
    for pos, reason in batch.failures:
        path = work[pos].path
        records.append({"path": path, **_stamp(size_and_mtime(root / path)), "reason": reason})
    return records


def make_row(
    path: str,
    probabilities: list[float],
    ranked: list[int],
    neighbour: Neighbour | None,
    version: Version,
    job: PredictJob,
) -> dict[str, Any]:
    """One output row: `probabilities` and `ranked` are the best classes' probabilities and indices, best first."""
    classes = version.model.bundle.classes
    label = classes[ranked[0]]
    margin = probabilities[0] - (probabilities[1] if len(probabilities) > 1 else 0.0)
    near_path, near_label, near_score = neighbour or (None, None, None)
    disagrees = near_label is not None and near_label != label
    row: dict[str, Any] = {
        "path": path,
        "label": label,
        "probability": round(probabilities[0], 6),
        "margin": round(margin, 6),
        "neighbor": near_path,
        "neighbor_label": near_label,
        "neighbor_score": near_score,
        "uncertain": bool(margin < job.uncertain_margin or disagrees),
    }
    for i in range(version.top(job.top_k)):
        row[f"label_{i + 1}"] = classes[ranked[i]]
        row[f"probability_{i + 1}"] = round(probabilities[i], 6)
    return row


def _stamp(stat: tuple[int, int] | None) -> dict[str, int]:
    size, mtime_ns = stat or (-1, -1)
    return {"size": size, "mtime_ns": mtime_ns}


def _still(stamp: tuple[int, int] | None, file: Path) -> bool:
    """Whether a part's record of `file` still holds: the file has the size and mtime it had then."""
    return stamp is not None and size_and_mtime(file) == stamp


# --- OUT.parts/: what a killed run resumes from -----------------------------------------------------------
class Parts:
    """A run's results so far: `part-NNNNNN.jsonl` files of part records sorted by path, each written whole, and
    `job.json`, the run key they belong to. A path in several parts (a file that changed) counts in the newest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = root / "lock"
        self.key_file = root / "job.json"
        self.pending: list[PartRecord] = []
        self.next = 0

    def files(self) -> list[Path]:
        return sorted(self.root.glob("part-*.jsonl"))

    def resume(self, key: dict[str, Any], records: Sequence[Record], root: Path) -> list[Record]:
        """Keep the parts of the run `key` names (others are removed); returns the records they do not hold."""
        try:
            recorded = json.loads(self.key_file.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != key:
            if recorded is not None:
                changed = ", ".join(k for k in key if recorded.get(k) != key[k]) or "its record"
                log.warning("%s holds the parts of another run (%s differ): starting over", self.root, changed)
            self._clear()
            atomic_write_bytes(self.key_file, json.dumps(key).encode())
        files = self.files()
        self.next = int(files[-1].stem.split("-")[1]) + 1 if files else 0
        held = {rec["path"]: (rec["size"], rec["mtime_ns"]) for rec in self._read_all(files)}
        log.info("%s holds %d images of an interrupted run", self.root, len(held))
        return [rec for rec in records if not _still(held.get(rec.path), root / rec.path)]

    def add(self, records: Iterable[PartRecord], chunk_size: int) -> None:
        self.pending.extend(records)
        if len(self.pending) >= chunk_size:
            self.flush()

    def flush(self) -> None:
        """Write what is pending as the next part, in one atomic step."""
        if not self.pending:
            return
        lines = "".join(json.dumps(rec) + "\n" for rec in sorted(self.pending, key=lambda rec: str(rec["path"])))
        atomic_write_bytes(self.root / f"part-{self.next:06d}.jsonl", lines.encode())
        self.next += 1
        self.pending = []

    def merged(self, keep: set[str]) -> Iterator[PartRecord]:
        """Every path's newest record in path order, for the paths in `keep` (files deleted since are left out)."""
        files = self.files()
        round_ = 0
        while len(files) > MERGE_FAN_IN:  # merge groups of consecutive parts, so newer still means later
            groups = [files[i : i + MERGE_FAN_IN] for i in range(0, len(files), MERGE_FAN_IN)]
            files = [
                self._merge_to(group, self.root / f"merged-{round_}-{n:06d}.jsonl") for n, group in enumerate(groups)
            ]
            round_ += 1
        for record in _newest_first_merge(files):
            if record["path"] in keep:
                yield record

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _merge_to(self, group: list[Path], target: Path) -> Path:
        with open(target, "w") as f:
            for record in _newest_first_merge(group):
                f.write(json.dumps(record) + "\n")
        return target

    def _clear(self) -> None:
        """Remove everything but the lock (held while this runs)."""
        for child in self.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child != self.lock:
                child.unlink()

    @staticmethod
    def _read_all(files: Iterable[Path]) -> Iterator[PartRecord]:
        for file in files:
            yield from _read(file)


def _read(file: Path) -> Iterator[PartRecord]:
    with open(file) as f:
        for line in f:
            yield json.loads(line)


def _newest_first_merge(files: Sequence[Path]) -> Iterator[PartRecord]:
    """The records of path-sorted `files` in path order, each path once: its record in the latest file."""
    last = None
    streams = [_ranked(file, -n) for n, file in enumerate(files)]
    for path, _, record in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
        if path != last:
            last = path
            yield record


def _ranked(file: Path, rank: int) -> Iterator[tuple[str, int, PartRecord]]:
    for record in _read(file):
        yield record["path"], rank, record


# --- the output file ----------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What went into the output: rows, rows flagged uncertain, and the files that failed."""

    rows: int = 0
    uncertain: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def rows_of(self, records: Iterable[PartRecord]) -> Iterator[dict[str, Any]]:
        """The rows of `records`, counted; the failures are kept aside."""
        for record in records:
            if "reason" in record:
                self.skipped.append(Skipped(record["path"], record["reason"]))
                continue
            self.rows += 1
            self.uncertain += bool(record["row"]["uncertain"])
            yield record["row"]


def write_output(records: Iterable[PartRecord], out: Path, fmt: str, columns: list[str]) -> Tally:
    """Write the rows of `records` to `out` in `fmt`, in one atomic step (OUT is whole or as it was)."""
    tally = Tally()
    rows = tally.rows_of(records)
    with atomic_target(out) as tmp:
        if fmt == "csv":
            _write_csv(rows, columns, tmp)
        elif fmt == "jsonl":
            with open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            _write_parquet(rows, columns, tmp)
    return tally


def _write_csv(rows: Iterable[dict[str, Any]], columns: list[str], target: Path) -> None:
    """Empty cells for no neighbour; true/false for the flag."""
    import csv

    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "uncertain": "true" if row["uncertain"] else "false"})


def _write_parquet(rows: Iterable[dict[str, Any]], columns: list[str], target: Path) -> None:
    """Row groups of PARQUET_ROW_GROUP rows, so a large output never sits in memory whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {
        "probability": pa.float64(),
        "margin": pa.float64(),
        "neighbor_score": pa.float64(),
        "uncertain": pa.bool_(),
    }
    schema = pa.schema(
        [(c, types.get(c, pa.float64() if c.startswith("probability_") else pa.string())) for c in columns]
    )
    with pq.ParquetWriter(target, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= PARQUET_ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
