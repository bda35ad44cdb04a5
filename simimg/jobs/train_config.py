"""What a training run was asked to do (`TrainConfig`) and what it reports (`TrainReport`): shared by the fine-tune
and the head-only fit, and saved beside the model they make."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from simimg.jobs.index_config import IndexReport
from simimg.progress import EpochStats


@dataclass(frozen=True)
class TrainConfig:
    """Everything one `simimg train` run was asked to do; saved as train_job.json beside the bundle."""

    data_dir: str
    name: str
    home: str
    arch: str | None = None
    weights: str = "imagenet"
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    image_size: int = 224
    val_split: float = 0.2
    freeze_epochs: int | None = None
    patience: int | None = None
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA with bf16, else fp32 (device.resolve_compute); or either
    seed: int = 0
    resume: bool = False
    workers: int | None = None  # decode processes: all cores feeding a GPU, none on the CPU (device.loader_workers)
    memory_efficient: bool = False
    head_only: bool = False  # fit a classifier on the catalog's stored embeddings instead (head.py)
    embed_missing: bool = False  # head_only: embed images the index does not hold (not added), rather than refuse
    index: bool = True  # end by serving the new model: embed the index's collection with it and publish


@dataclass(frozen=True)
class TrainReport:
    name: str
    best_epoch: int
    val_accuracy: float
    history: list[EpochStats]
    seconds: float
    device: str  # where it ran and in what precision: "cpu (bf16)", "cuda (bf16)", "cpu (fp32)"
    stopped_early: bool
    cancelled: bool
    skipped: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""  # the new model's fingerprint; "" when no epoch finished
    kind: str = "fine-tuned"
    index: IndexReport | None = None  # the version that serves the new model, unless `index` was off
    head: dict[str, Any] | None = None  # head-only runs: the chosen C, and how many embeddings came from the catalog

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["index"] = self.index.to_dict() if self.index else None
        return d
