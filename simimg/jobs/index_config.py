"""What an index job was asked to do and what it reports: shared by the job, its engines and the jobs that read it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from simimg.dataset.scan import Record, Skipped
from simimg.store.catalog import Row
from simimg.store.layout import IndexFolder

ToEmbed = Sequence[Record | Row]  # what needs a vector: new files (Record) and catalog rows lacking one (Row)


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
    precision: str = "auto"  # bf16 where native, int8 where a kept gate passed on VNNI/AMX; or one asked (jobs/int8.py)
    batch_size: int = 64
    workers: int | None = None
    chunk_size: int = 512
    compile: bool = False
    model: str | None = None  # switch to this kept model (a fingerprint or a unique prefix of one)
    wait: bool = False  # wait for another writer instead of failing at once
    engine: str = "local"  # where the embed step runs: "local" (this process) or "ray" (Ray Data, ray_engine.py)
    address: str | None = None  # ray: the cluster (host:port, ray://host:port, auto); None starts a local instance
    ray_actors: int | None = None  # ray: embedding actors; None: one per GPU, else one per 4 CPUs of the cluster
    ray_shards: str | None = None  # ray: where the Parquet shards go (a folder or a URI); None: HOME/NAME/runs
    index_kind: str | None = None  # auto, flat, ivf or ivfpq (faiss_index.index_kind_for); None: as last built
    on_disk: bool | None = None  # ivfpq lists in a file per version (ann_ivfpq.wants_disk); None: as last, else auto
    unlabeled: str | None = None  # a folder of unlabeled images elsewhere (an unlabeled/ folder inside is found anyway)


@dataclass(frozen=True)
class IndexReport:
    name: str
    indexed: int
    removed: int
    total: int
    skipped: list[Skipped]
    seconds: float
    device: str  # where the model ran and in what precision: "cpu (bf16)", "cuda (bf16)", "cpu (fp32)"
    version: int
    rebuilt: bool
    model: str = ""
    relabelled: int = 0  # rows whose label changed (label edits), their vectors kept
    excluded: int = 0  # images on disk that label edits keep out of the index
    int8_gate: dict[str, Any] | None = None  # the int8 gate's figures when int8 was tried (jobs/int8.py)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [asdict(s) for s in self.skipped]
        return d


def read_index_job(folder: IndexFolder) -> IndexJob | None:
    """The job that last built this index, or None; unknown fields (from another simimg version) are dropped."""
    try:
        recorded = json.loads(folder.index_job.read_text())
    except (OSError, ValueError):
        return None
    known = {f.name for f in fields(IndexJob)}
    return IndexJob(**{k: v for k, v in recorded.items() if k in known})
