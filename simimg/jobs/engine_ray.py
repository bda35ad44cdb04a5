"""`simimg index --engine ray`: the local index job with its embed step run on Ray Data, on one machine or many.

`indexing.run_index` scans, plans, ingests and publishes exactly as it does for the local engine; this module only
turns the work list into rows of (path, label, size, mtime_ns, sha256, vector, or the reason a file was skipped):

    manifest.jsonl, written first (Ray lists no files and reads no metadata: ray#40686)
      -> read_json -> hash + decode on CPU tasks (jobs/ray_tasks.py: the local engine's reader, without torch)
      -> embed on a fixed pool of actors (a GPU each, or CPUS_PER_ACTOR threads), `batch_size` rows per call
      -> Parquet shards written by tasks, each file appearing whole (written aside, then moved)
      -> the driver ingests each shard as it is reported, in the catalog's chunked transactions.

A run keeps its manifest and shards in `<location>/<index key>-<run>/` (location: HOME/NAME/runs, or
`--ray-shards`) until its version is published. A killed run's shards are its markers: the next attempt ingests
the rows that still match their file (size and mtime) and sends only the rest through Ray. The catalog stays the
truth: rows it already holds are not in the work list at all. Every node must see DATA_DIR at the same path.

A compressed (IVF-PQ) index is built on the cluster too: after training on a sample in the driver, each part of
the vectors is encoded by a Ray task (`RayEngine.encode_parts`) and the driver merges the parts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import torch

from simimg.errors import SimimgError
from simimg.fsutil import size_and_mtime
from simimg.jobs.ray_tasks import RunFolder, ShardStore, decode_files, write_shard
from simimg.models.device import resolve_compute
from simimg.models.encoder import EmbeddedBatch, infer, prepare_net
from simimg.models.net import LoadedModel
from simimg.store.ann_ivfpq import Part, encode_part
from simimg.store.layout import IndexFolder

try:
    import pyarrow as pa
    import ray
except ImportError:
    raise SimimgError("the ray engine needs Ray Data: pip install 'simimg[ray]'") from None

if TYPE_CHECKING:
    from simimg.jobs.index_config import IndexJob, ToEmbed

log = logging.getLogger(__name__)

CPUS_PER_ACTOR = 2  # torch threads of a CPU embedding actor, and the CPUs it reserves
BLOCK_BATCHES = 4  # manifest rows per decode task, in embedding batches
LOCAL_CPUS = 4  # logical CPUs of a local instance, at least: fewer can leave a stage waiting for a free slot
WRITER_CPUS = 0.25  # a shard writer mostly waits on the disk
CONNECT_TIMEOUT_S = 5
PARTS_IN_FLIGHT = 4  # compressed-index parts queued on the cluster at once: 4 GiB of vectors at 1024 dims


@dataclass(frozen=True)
class RayEngine:
    """Embeds a work list on the Ray cluster this process joined; see the module docstring for the pipeline."""

    job: IndexJob
    folder: IndexFolder
    store: ShardStore
    use_gpu: bool
    actors: int

    @classmethod
    @contextmanager
    def connect(cls, job: IndexJob, folder: IndexFolder) -> Iterator[RayEngine]:
        """Join the cluster (or start a local instance) for the block; leave it after, if this call joined it."""
        joined = _join(job.address)
        try:
            use_gpu, actors = _size_pool(job)
            yield cls(job, folder, ShardStore.at(job.ray_shards or folder.runs, _index_key(folder)), use_gpu, actors)
        finally:
            if joined:
                ray.shutdown()

    @property
    def description(self) -> str:
        return f"ray ({self.actors} {'GPU' if self.use_gpu else 'CPU'} actor{'s' * (self.actors > 1)})"

    def embed(
        self, model: LoadedModel, root: Path, run: str, work: ToEmbed, logits: bool = False
    ) -> Iterator[EmbeddedBatch]:
        """Batches for `work`: first what an interrupted attempt left in its shards, then Ray's new shards (with
        the head's logits when asked: a run always asks the same, so its shards hold them or not alike)."""
        waiting = {item.path: n for n, item in enumerate(work)}
        folder = self.store.run(run)
        reusable = _reusable(folder, root, waiting)
        reused = sum(map(len, reusable.values()))
        log.info(
            "%d of %d embeddings come from the shards of an interrupted run; %d go through Ray",
            reused,
            len(work),
            len(work) - reused,
        )
        for shard, paths in reusable.items():
            yield shard_batch(folder.read(shard), waiting, paths)
        rest = [item for item in work if item.path in waiting]
        if rest:
            for shard in self._shards(model, root, folder, rest, logits):
                yield shard_batch(folder.read(shard), waiting)

    def finish(self, run: str) -> None:
        self.store.clear()
        if not self.job.ray_shards and self.folder.runs.is_dir() and not any(self.folder.runs.iterdir()):
            self.folder.runs.rmdir()

    @staticmethod
    def encode_parts(trained: faiss.Index, parts: Iterator[Part]) -> Iterator[faiss.Index]:
        """A compressed index's parts encoded by Ray tasks, the vectors going through the object store (so no
        shared disk is needed), at most PARTS_IN_FLIGHT at once; the parts come back in order for the merge."""
        encode = ray.remote(num_cpus=1)(_encode_part)
        trained_ref = ray.put(faiss.serialize_index(trained))
        in_flight: deque[ray.ObjectRef[np.ndarray]] = deque()
        for ids, vectors in parts:
            in_flight.append(encode.remote(trained_ref, ids, vectors))
            if len(in_flight) >= PARTS_IN_FLIGHT:
                yield faiss.deserialize_index(ray.get(in_flight.popleft()))
        while in_flight:
            yield faiss.deserialize_index(ray.get(in_flight.popleft()))

    def _shards(self, model: LoadedModel, root: Path, run: RunFolder, work: ToEmbed, logits: bool) -> Iterator[str]:
        """Run `work` through Ray Data; yields each shard's name once it is written whole."""
        job = self.job
        ds = ray.data.read_json(
            run.write_manifest(work), override_num_blocks=math.ceil(len(work) / (job.batch_size * BLOCK_BATCHES))
        )
        ds.context.enable_progress_bars = False  # the indexer's own progress bar follows ingestion
        # ray types a batch function as one batch in, one out; fn_kwargs passes the rest (decode_files, write_shard)
        ds = ds.map_batches(
            decode_files,  # type: ignore[arg-type]
            batch_size=job.batch_size,
            batch_format="numpy",
            num_cpus=1,
            fn_kwargs={"root": str(root), "preprocess": model.bundle.preprocess},
        )
        ds = ds.map_batches(
            EmbedActor,
            batch_size=job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            fn_constructor_kwargs={
                "model": model,
                "use_gpu": self.use_gpu,
                "precision": job.precision,
                "compile": job.compile,
                "with_logits": logits,
            },
            num_gpus=1 if self.use_gpu else 0,
            num_cpus=1 if self.use_gpu else CPUS_PER_ACTOR,
        )
        ds = ds.map_batches(
            write_shard,  # type: ignore[arg-type]
            batch_size=job.chunk_size,
            batch_format="numpy",
            num_cpus=WRITER_CPUS,
            fn_kwargs={"run": run.uri},
        )
        try:
            for row in ds.iter_rows():
                yield row["shard"]
        except ray.exceptions.RayError as err:
            raise SimimgError(
                f"the Ray job failed ({_first_line(err)}); the shards written so far are kept: "
                "re-run the same command to go on"
            ) from None


# --- the pipeline's stages: they run in Ray workers -----------------------------------------------------------
def _encode_part(trained: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """One Ray task: a part of a compressed index, serialized (compressed_index.encode_part)."""
    return faiss.serialize_index(encode_part(faiss.deserialize_index(trained), ids, vectors))


class EmbedActor:
    """One model replica per actor: decoded pixels in, unit-length float32 vectors out (zeros for bad files), and
    the head's logits when asked."""

    def __init__(
        self, model: LoadedModel, use_gpu: bool, precision: str, compile: bool, with_logits: bool = False
    ) -> None:
        self.compute = resolve_compute("cuda" if use_gpu else "cpu", precision, compile=compile)
        if not use_gpu:
            torch.set_num_threads(CPUS_PER_ACTOR)  # this worker process's own setting: it reserved these CPUs
        self.model, self.with_logits = model, with_logits
        self.trunk = prepare_net(model.net, self.compute, model.bundle.preprocess, compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch["reason"] == "")
        net, n = self.model.net, len(batch["reason"])
        vectors = np.zeros((n, net.dim), np.float32)
        logits = np.zeros((n, net.head.out_features if net.head is not None else 0), np.float32)
        if len(good):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            embedded, scores = infer(
                net, pixels, self.model.bundle.preprocess, self.compute, self.with_logits, trunk=self.trunk
            )
            vectors[good] = embedded.cpu().numpy()
            if scores is not None:
                logits[good] = scores.cpu().numpy()
        out = {**{key: value for key, value in batch.items() if key != "pixels"}, "vector": vectors}
        return {**out, "logits": logits} if self.with_logits else out


# --- the driver's side: shards in, batches for the indexer out --------------------------------------------------
def shard_batch(table: pa.Table, waiting: dict[str, int], only: set[str] | None = None) -> EmbeddedBatch:
    """A shard's rows for paths still waiting (each taken out of `waiting`, so nothing is ingested twice)."""
    rows = table.select(["path", "size", "mtime_ns", "sha256", "reason"]).to_pylist()
    vectors = _vectors(table)
    logits = _vectors(table, "logits") if "logits" in table.column_names else None
    picked, failures = [], []
    for n, row in enumerate(rows):
        pos = waiting.pop(row["path"], None) if only is None or row["path"] in only else None
        if pos is None:
            continue
        if row["reason"] is None:
            picked.append((n, pos))
        else:
            failures.append((pos, row["reason"]))
    return EmbeddedBatch(
        [pos for _, pos in picked],
        vectors[[n for n, _ in picked]],
        [rows[n]["sha256"] for n, _ in picked],
        failures,
        [(rows[n]["size"], rows[n]["mtime_ns"]) for n, _ in picked],
        None if logits is None else logits[[n for n, _ in picked]],
    )


def _vectors(table: pa.Table, name: str = "vector") -> np.ndarray:
    """A fixed-size list column (the vectors, the logits) as rows x width float32, zeros where a file was skipped."""
    column = table.column(name).combine_chunks()
    out = np.zeros((len(column), column.type.list_size), np.float32)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    out[valid] = column.flatten().to_numpy().reshape(-1, column.type.list_size)
    return out


def _reusable(run: RunFolder, root: Path, waiting: dict[str, int]) -> dict[str, set[str]]:
    """{shard: paths} of embedded rows left by earlier attempts that still match their file's size and mtime."""
    chosen: dict[str, set[str]] = {}
    seen: set[str] = set()
    for shard in run.shards():
        rows = run.read(shard, ["path", "size", "mtime_ns", "reason"]).to_pylist()
        for row in rows:
            path = row["path"]
            if (
                row["reason"] is None
                and path in waiting
                and path not in seen
                and size_and_mtime(root / path) == (row["size"], row["mtime_ns"])
            ):
                chosen.setdefault(shard, set()).add(path)
                seen.add(path)
    return chosen


# --- joining the cluster ------------------------------------------------------------------------------------------
def _join(address: str | None) -> bool:
    """Join Ray unless this process already has; True when this call did (so it leaves after).

    No address and no RAY_ADDRESS starts a local instance with at least LOCAL_CPUS logical CPUs.
    """
    if ray.is_initialized():
        log.info("using the Ray instance this process already joined")
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target != "auto":
        _check_reachable(target)
    try:
        if target is None:
            ray.init(num_cpus=max(LOCAL_CPUS, os.cpu_count() or 1), log_to_driver=False)
        else:
            ray.init(address=target, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SimimgError(f"cannot join the Ray cluster at {target}: {_first_line(err)}") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port (ray.init retries for a long time)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise SimimgError(f"--address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise SimimgError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}): start it with "
            "`ray start --head`, or check --address"
        ) from None


def _size_pool(job: IndexJob) -> tuple[bool, int]:
    """(GPU actors?, how many): one per GPU; else one per 2 x CPUS_PER_ACTOR CPUs, leaving half to decode."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if job.device not in ("auto", "cpu") and not job.device.startswith("cuda"):
        raise SimimgError(f"unknown device {job.device!r}: use auto, cpu or cuda")
    use_gpu = job.device.startswith("cuda") or (job.device == "auto" and gpus > 0)
    actors = job.ray_actors or (max(gpus, 1) if use_gpu else max(1, cpus // (2 * CPUS_PER_ACTOR)))
    need, have = (actors, gpus) if use_gpu else (actors * CPUS_PER_ACTOR + 1, cpus)
    if need > have:
        log.warning(
            "the Ray cluster has %d %s now and %d actors need %d: the job waits for more nodes",
            have,
            "GPUs" if use_gpu else "CPUs",
            actors,
            need,
        )
    return use_gpu, actors


def _index_key(folder: IndexFolder) -> str:
    """Names this index's runs apart from another index's in a shared location."""
    return f"{folder.name}-{hashlib.sha256(str(folder.root.resolve()).encode()).hexdigest()[:8]}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
