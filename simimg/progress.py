"""How a caller follows and steers a job: the one set of callback types every job, shell and notebook shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Progress = Callable[[int, int], None]  # (done, total) within the current step
Phase = Callable[[str], None]  # told the step a job has reached ("scanning", "loading the model", "training", ...)


@dataclass(frozen=True)
class EpochStats:
    """What a training run reports after each epoch (the app's curves, the CLI's epoch lines)."""

    epoch: int
    phase: str
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_s: float
    seconds: float


def _nothing(*_: object) -> None:
    return None


def _keep_going() -> bool:
    return False


@dataclass(frozen=True)
class Hooks:
    """How a caller follows and steers a run (the CLI's bars, the app's page); every hook is optional."""

    on_epoch: Callable[[EpochStats], None] = _nothing
    progress: Progress = _nothing  # (done, total) within the current phase
    # index: "scanning", "loading the model", "embedding", ...; train: "loading", ("embedding": head-only with
    # embed_missing), "training", "validating", "saving", "indexing"
    on_phase: Phase = _nothing
    should_stop: Callable[[], bool] = _keep_going
