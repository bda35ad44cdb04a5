"""Where an index job's embed step runs: this process (`LocalEngine`), or Ray Data (engine_ray.py, imported only
then)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss

from simimg.errors import SimimgError
from simimg.jobs.index_config import IndexJob, ToEmbed
from simimg.models.device import loader_workers, resolve_compute
from simimg.models.encoder import EmbeddedBatch, EmbedSettings, embed_files
from simimg.models.net import LoadedModel
from simimg.store.ann_ivfpq import Part, encode_here
from simimg.store.layout import IndexFolder


class Engine(Protocol):
    """The one step that differs between engines: the work list in, embedded batches out (positions into it).

    Planning, ingesting (chunked commits into the pending version) and publishing are this module's, whatever
    the engine, so both give the same index. `run` names the pending version and embedding the work is for
    (`simimg predict`: its output and model). `logits` adds the head's logits to each batch.
    """

    @property
    def description(self) -> str: ...

    def embed(
        self, model: LoadedModel, root: Path, run: str, work: ToEmbed, logits: bool = False
    ) -> Iterator[EmbeddedBatch]: ...

    def finish(self, run: str) -> None:
        """Called once `run` is published: forget whatever the engine kept to resume it."""

    def encode_parts(self, trained: faiss.Index, parts: Iterator[Part]) -> Iterable[faiss.Index]:
        """A compressed index's parts, encoded where this engine runs work (compressed_index.PartEncoder)."""


@dataclass(frozen=True)
class LocalEngine:
    """This process: the decode loader feeding the model (embed.embed_files); nothing to resume but the catalog."""

    settings: EmbedSettings

    @property
    def description(self) -> str:
        return str(self.settings.compute)

    def embed(
        self, model: LoadedModel, root: Path, run: str, work: ToEmbed, logits: bool = False
    ) -> Iterator[EmbeddedBatch]:
        files = [root / item.path for item in work]
        return embed_files(model.net, files, model.bundle.preprocess, self.settings, logits) if files else iter(())

    encode_parts = staticmethod(encode_here)

    def finish(self, run: str) -> None:
        """Nothing to forget: an interrupted local run resumes from the catalog alone."""


def open_engine(job: IndexJob, folder: IndexFolder) -> AbstractContextManager[Engine]:
    """The engine `job` asks for, ready to embed; Ray is imported, and joined, only for the ray engine."""
    if job.engine == "ray":
        from simimg.jobs.engine_ray import RayEngine

        if job.precision == "int8":
            raise SimimgError("--precision int8 runs with the local engine only: drop --engine ray, or use bf16/fp32")
        return RayEngine.connect(job, folder)
    if job.engine != "local":
        raise SimimgError(f"unknown engine {job.engine!r}: use local or ray")
    ray_only = [
        flag
        for flag, value in (
            ("--address", job.address),
            ("--ray-actors", job.ray_actors),
            ("--ray-shards", job.ray_shards),
        )
        if value is not None
    ]
    if ray_only:
        raise SimimgError(f"{', '.join(ray_only)} only apply with --engine ray")
    compute = resolve_compute(job.device, job.precision, compile=job.compile)
    workers = loader_workers(job.workers, compute.device)
    return nullcontext(LocalEngine(EmbedSettings(compute, job.batch_size, workers, job.compile)))
