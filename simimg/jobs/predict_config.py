"""What a `simimg predict` run was asked to do and what it reports; torch-free, so the CLI reads its defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from simimg.dataset.scan import Skipped

# the columns of every row, before the top labels (label_1, probability_1, ... label_k, probability_k)
COLUMNS = ("path", "label", "probability", "margin", "neighbor", "neighbor_label", "neighbor_score", "uncertain")


@dataclass(frozen=True)
class PredictJob:
    """Everything one `simimg predict` run was asked to do; saved as OUT.job.json beside its output."""

    data_dir: str
    name: str
    home: str
    out: str
    format: str | None = None  # csv, parquet or jsonl; None: from OUT's extension
    top_k: int = 3  # top labels per row (fewer when the classifier has fewer classes)
    uncertain_margin: float = 0.2  # a row is uncertain below this top-1 minus top-2 probability
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    chunk_size: int = 1024  # rows per part: what a killed run keeps
    engine: str = "local"  # "local" (this process) or "ray" (Ray Data), as `simimg index`
    address: str | None = None  # ray: the cluster; None: $RAY_ADDRESS, else a local instance
    ray_actors: int | None = None  # ray: embedding actors; None: one per GPU, else one per 4 CPUs
    ray_shards: str | None = None  # ray: where Ray's Parquet shards go; None: OUT.parts/runs


@dataclass(frozen=True)
class PredictReport:
    name: str
    data_dir: str
    out: str
    format: str
    rows: int  # images classified: one row each in `out`
    uncertain: int  # rows flagged uncertain
    skipped: list[Skipped]  # files that could not be classified, with the reason
    resumed: int  # rows (and skipped files) an interrupted run had already written
    seconds: float
    device: str  # where the model ran: "cpu (bf16)", "ray (2 CPU actors)"
    model: str  # the serving model's fingerprint
    version: int  # the index version whose images are the neighbours

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [asdict(s) for s in self.skipped]
        return d
