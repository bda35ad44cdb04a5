"""`simimg train`: fine-tune (or train from scratch) a backbone on class folders into a new model version.

Pretrained starts warm up the head with the backbone frozen, then unfreeze it at a lower learning rate; random
starts train everything at once with a longer schedule. Both use AdamW with warmup then cosine decay, label
smoothing, augmentation, class-weighted loss when classes are imbalanced, early stopping on validation loss
(keeping the best epoch), and a checkpoint every epoch that `resume` continues from.

A run writes nothing a reader uses: the best epoch becomes a new model folder (model_store) when the run ends,
and the index then embeds its collection with it into a pending version, published in one step. Queries answer
from the previous model until that step. `head_only` runs go to `head.py` instead.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from simimg.analysis.metrics import classification_metrics
from simimg.analysis.plots import confusion_png, curves_png
from simimg.dataset.splits import Split, TrainAugment, class_weights, split_dataset
from simimg.errors import SimimgError
from simimg.fsutil import atomic_target
from simimg.jobs.evaluate import predict_loader
from simimg.jobs.index import switch_model
from simimg.jobs.labels_config import corrections_for
from simimg.jobs.train_config import TrainConfig, TrainReport
from simimg.models.bundle import ModelBundle
from simimg.models.device import Compute, loader_workers, memory_format_for, resolve_compute
from simimg.models.encoder import FileItem, make_loader
from simimg.models.net import LoadedModel, Net, build_model, describe, set_memory_efficient, with_classes
from simimg.progress import EpochStats, Hooks
from simimg.store.layout import IndexFolder
from simimg.store.lock import writer_lock
from simimg.store.model_store import publish_model, resolve_weights

log = logging.getLogger(__name__)

MIN_IMPROVEMENT = 1e-4
# Patience counts only epochs whose learning rate is below this share of the peak: at a high one-cycle rate the
# validation loss is noisy by design (hymenoptera from scratch stopped at epoch 33 of 80, 78% of the peak rate).
ANNEALED = 0.5


@dataclass(frozen=True)
class Recipe:
    """The schedule and regularisation a run uses; defaults depend on whether the start is pretrained."""

    epochs: int
    lr: float
    freeze_epochs: int
    patience: int
    backbone_lr_factor: float
    warmup_fraction: float
    crop_scale: tuple[float, float]
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    jitter: float = 0.2


PRETRAINED_RECIPE = Recipe(
    epochs=15,
    lr=1e-3,
    freeze_epochs=3,
    patience=5,
    backbone_lr_factor=0.1,
    warmup_fraction=0.05,
    crop_scale=(0.35, 1.0),
)
SCRATCH_RECIPE = Recipe(
    epochs=80,
    lr=2e-3,
    freeze_epochs=0,
    patience=20,
    backbone_lr_factor=1.0,
    warmup_fraction=0.15,
    crop_scale=(0.25, 1.0),
)


def recipe_for(config: TrainConfig) -> Recipe:
    """The mode's defaults, with whatever the config sets explicitly."""
    base = SCRATCH_RECIPE if config.weights == "none" else PRETRAINED_RECIPE
    overrides: dict[str, Any] = {
        "epochs": config.epochs,
        "lr": config.lr,
        "freeze_epochs": config.freeze_epochs,
        "patience": config.patience,
    }
    recipe = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.epochs < 1 or recipe.lr <= 0 or recipe.patience < 1 or recipe.freeze_epochs < 0:
        raise SimimgError("--epochs and --patience must be at least 1, --lr above 0 and --freeze-epochs 0 or more")
    return recipe


def lr_factor(step: int, total: int, warmup: int) -> float:
    """One cycle: a linear warmup from 4% to the peak, then cosine decay towards zero."""
    if step < warmup:
        return 0.04 + 0.96 * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@dataclass
class _State:
    """What a checkpoint carries from one epoch to the next, and from an interrupted run to its resume."""

    epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_loss: float = math.inf
    best_confusion: list[list[int]] = field(default_factory=list)
    stale: int = 0
    stopped_early: bool = False


@dataclass
class _Run:
    """One training run's moving parts, wired once by `_open_run`."""

    config: TrainConfig
    recipe: Recipe
    split: Split
    folder: IndexFolder
    compute: Compute
    model: LoadedModel
    source: str
    optimizer: torch.optim.Optimizer
    criterion: nn.CrossEntropyLoss
    train_loader: DataLoader[FileItem]
    val_loader: DataLoader[FileItem]
    state: _State
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def run_training(config: TrainConfig, hooks: Hooks = Hooks()) -> TrainReport:
    """Train a new model of the named index and, unless told not to, serve it; the one entry point for all callers.

    Holds the index's training lock (one run at a time); readers and `simimg index` runs go on meanwhile.
    """
    started = time.perf_counter()
    folder = IndexFolder.of(config.home, config.name)
    hooks.on_phase("loading")
    corrections = corrections_for(config.home, config.name, config.data_dir)
    split = split_dataset(config.data_dir, config.val_split, config.seed, corrections)
    compute = resolve_compute(config.device, config.precision, training=not config.head_only)
    with writer_lock(folder.train_lock, f"training of '{config.name}'"):
        if config.head_only:
            from simimg.jobs.train_head import train_head

            report = train_head(config, split, folder, compute, hooks)
        else:
            report = _fine_tune(config, split, folder, compute, hooks)
    index = None
    if report.model and config.index and not report.cancelled:
        hooks.on_phase("indexing")
        index = switch_model(
            config.home,
            config.name,
            report.model,
            config.data_dir,
            config.device,
            config.workers,
            hooks.progress,
            config.precision,
        )
    return replace(report, seconds=round(time.perf_counter() - started, 3), index=index)


def _fine_tune(config: TrainConfig, split: Split, folder: IndexFolder, compute: Compute, hooks: Hooks) -> TrainReport:
    """Epochs until done, stopped early or cancelled; the best one is kept as a model version."""
    run = _open_run(config, split, folder, compute)
    cancelled = False
    while run.state.epoch < run.recipe.epochs and not run.state.stopped_early and not cancelled:
        stats = _run_epoch(run, hooks)
        cancelled = stats is None
        if stats is not None:
            hooks.on_epoch(stats)
    hooks.on_phase("saving")
    bundle = _keep_best(run, cancelled)
    state = run.state
    best = state.history[state.best_epoch - 1] if state.best_epoch else None
    skipped = [{"path": s.path, "reason": s.reason} for s in split.skipped]
    skipped += [{"path": p, "reason": r} for p, r in sorted(run.skipped.items())]
    return TrainReport(
        config.name,
        state.best_epoch,
        best.val_accuracy if best else 0.0,
        list(state.history),
        0.0,
        str(compute),
        state.stopped_early,
        cancelled,
        skipped,
        bundle.fingerprint if bundle else "",
        "fine-tuned",
    )


def _open_run(config: TrainConfig, split: Split, folder: IndexFolder, compute: Compute) -> _Run:
    """Build (or, with resume, restore) the model, optimizer and loaders."""
    device = compute.device
    recipe = recipe_for(config)
    torch.manual_seed(config.seed)
    checkpoint = _read_checkpoint(folder, split, config) if config.resume else None
    if checkpoint is None:
        base = build_model(config.arch, resolve_weights(config.weights), config.image_size)
        source = base.bundle.source
    else:
        base = build_model(checkpoint["meta"]["arch"], "none", config.image_size)
        source = checkpoint["meta"]["source"]
    model = with_classes(base, split.classes)
    set_memory_efficient(model.net, config.memory_efficient)
    # torch's Module.to overloads lack (device, memory_format=...), which it takes
    model.net.to(device, memory_format=memory_format_for(device))  # type: ignore[call-overload]
    workers = loader_workers(config.workers, device)
    optimizer = _optimizer(model.net, recipe)
    labels = split.labels(split.train)
    weights = class_weights(labels, len(split.classes))
    if weights is not None:
        log.info("classes are imbalanced: weighting the loss by %s", np.round(weights.numpy(), 3).tolist())
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=recipe.label_smoothing).to(device)
    augment = TrainAugment(config.image_size, recipe.crop_scale, recipe.jitter)
    train_loader = make_loader(
        split.files(split.train),
        augment,
        config.batch_size,
        workers,
        device,
        shuffle=True,
        seed=config.seed,
        drop_last=len(split.train) > config.batch_size,
    )
    val_loader = make_loader(split.files(split.val), model.bundle.preprocess, config.batch_size, workers, device)
    run = _Run(
        config, recipe, split, folder, compute, model, source, optimizer, criterion, train_loader, val_loader, _State()
    )
    if checkpoint is not None:
        _restore(run, checkpoint)
    return run


def _optimizer(net: Net, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW with the backbone and the head in their own groups; `base_lr` is each group's peak."""
    assert net.head is not None, "training's net has its classes' head (with_classes)"
    groups = [
        {"params": list(net.trunk.parameters()), "base_lr": recipe.lr * recipe.backbone_lr_factor},
        {"params": list(net.head.parameters()), "base_lr": recipe.lr},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _phase(run: _Run, epoch: int) -> str:
    if run.config.weights == "none" and run.recipe.freeze_epochs == 0:
        return "scratch"
    return "frozen" if epoch <= run.recipe.freeze_epochs else "finetune"


def _run_epoch(run: _Run, hooks: Hooks) -> EpochStats | None:
    """Train one epoch, validate, keep the best weights and write a checkpoint; None when cancelled."""
    epoch = run.state.epoch + 1
    phase = _phase(run, epoch)
    started = time.perf_counter()
    hooks.on_phase("training")
    trained = _train_epoch(run, epoch, phase, hooks.progress, hooks.should_stop)
    if trained is None:
        return None
    train_loss, train_accuracy, images = trained
    train_seconds = time.perf_counter() - started
    hooks.on_phase("validating")
    val = predict_loader(run.model.net, run.val_loader, run.model.bundle.preprocess, run.compute, hooks.progress)
    run.skipped.update({run.split.val[i].path: why for i, why in val.failures})
    labels = run.split.labels(run.split.val)[val.positions]
    with torch.no_grad():
        device = run.compute.device
        val_loss = float(run.criterion(val.logits.to(device), torch.from_numpy(labels).to(device)))
    metrics = classification_metrics(labels, torch.softmax(val.logits, 1).numpy(), run.split.classes)
    lr = max(g["lr"] for g in run.optimizer.param_groups)
    stats = EpochStats(
        epoch,
        phase,
        round(train_loss, 6),
        round(train_accuracy, 6),
        round(val_loss, 6),
        round(metrics["accuracy"], 6),
        float(f"{lr:.6g}"),
        round(images / train_seconds, 2),
        round(time.perf_counter() - started, 3),
    )
    _record(run, stats, metrics["confusion_matrix"])
    log.info(
        "epoch %d (%s): train loss %.4f acc %.3f, val loss %.4f acc %.3f, lr %.2e, %.1f img/s",
        epoch,
        phase,
        stats.train_loss,
        stats.train_accuracy,
        stats.val_loss,
        stats.val_accuracy,
        stats.lr,
        stats.images_per_s,
    )
    return stats


def _train_epoch(
    run: _Run, epoch: int, phase: str, progress: Callable[[int, int], None], should_stop: Callable[[], bool]
) -> tuple[float, float, int] | None:
    """(mean loss, accuracy, images) over one pass of the training images; None when should_stop() said so."""
    net, device, preprocess = run.model.net, run.compute.device, run.model.bundle.preprocess
    net.train()
    net.trunk.requires_grad_(phase != "frozen")
    if phase == "frozen":
        net.trunk.eval()  # a frozen backbone keeps its batch-norm statistics too
    autocast, layout = run.compute.autocast, memory_format_for(device)
    labels = torch.from_numpy(run.split.labels(run.split.train))
    total = len(run.train_loader)
    steps_per_epoch, step = total, (epoch - 1) * total
    warmup = round(run.recipe.warmup_fraction * run.recipe.epochs * steps_per_epoch)
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    run.train_loader.generator.manual_seed(run.config.seed * 100_003 + epoch)
    for done, (positions, batch, _, failures) in enumerate(run.train_loader, 1):
        run.skipped.update({run.split.train[i].path: why for i, why in failures})
        if len(positions) > 1:  # batch norm needs two samples
            _set_lr(run.optimizer, lr_factor(step, run.recipe.epochs * steps_per_epoch, warmup))
            y = labels[positions].to(device, non_blocking=True)
            x = preprocess.normalize(batch.to(device, non_blocking=True)).contiguous(memory_format=layout)
            with autocast():
                logits = net(x)
            loss = run.criterion(logits.float(), y)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            loss_sum += loss.detach() * len(positions)
            correct += (logits.argmax(1) == y).sum()
            seen += len(positions)
        step += 1
        progress(done, total)
        if should_stop():
            log.info("training cancelled during epoch %d", epoch)
            return None
    if seen == 0:
        raise SimimgError("no training image could be read; see the skipped files")
    return float(loss_sum) / seen, float(correct) / seen, seen


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def _record(run: _Run, stats: EpochStats, confusion: list[list[int]]) -> None:
    """Add the epoch; on a new best, keep its weights (in memory and in the checkpoint); then the checkpoint."""
    state = run.state
    state.history.append(stats)
    state.epoch = stats.epoch
    if stats.val_loss < state.best_loss - MIN_IMPROVEMENT:
        state.best_epoch, state.best_loss, state.best_confusion, state.stale = stats.epoch, stats.val_loss, confusion, 0
        run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.net.state_dict().items()}
    else:
        state.stale += int(stats.lr < ANNEALED * run.recipe.lr)
        state.stopped_early = state.stale >= run.recipe.patience and state.epoch < run.recipe.epochs
        if state.stopped_early:
            log.info("validation loss has not improved for %d annealed epochs: stopping early", state.stale)
    _write_checkpoint(run)


def _keep_best(run: _Run, cancelled: bool) -> ModelBundle | None:
    """Publish the best epoch as a new model version with its curves, confusion and job; None if no epoch ended.

    A finished run drops its checkpoint (the size of three models); a cancelled one keeps it for `resume`.
    """
    state = run.state
    if not state.best_epoch:
        return None
    net = run.model.net
    net.load_state_dict(run.best_weights)
    best = state.history[state.best_epoch - 1]
    info: dict[str, Any] = {
        "weights": run.config.weights,
        "training": {
            "config": asdict(run.config),
            "recipe": asdict(run.recipe),
            "device": str(run.compute),
            "best_epoch": state.best_epoch,
            "stopped_early": state.stopped_early,
            "cancelled": cancelled,
            "metrics": {k: getattr(best, k) for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")},
            "history": [asdict(h) for h in state.history],
            "split": run.split.describe(),
            "class_weights": None if run.criterion.weight is None else run.criterion.weight.cpu().tolist(),
        },
    }
    bundle = describe(
        net,
        run.model.bundle.arch,
        run.split.classes,
        run.model.bundle.preprocess,
        f"trained from {run.source}",
        "fine-tuned",
        **info,
    )
    extras = {
        "curves.png": curves_png([asdict(h) for h in state.history], state.best_epoch),
        "confusion.png": confusion_png(state.best_confusion, run.split.classes),
        "train_job.json": json.dumps(asdict(run.config), indent=2).encode(),
    }
    publish_model(run.folder, net, bundle, extras)
    if not cancelled:
        run.folder.checkpoint.unlink(missing_ok=True)
    return bundle


def _write_checkpoint(run: _Run) -> None:
    """Model, optimizer, best weights and the run's state, atomically; loadable with weights_only=True."""
    payload = {
        "model": run.model.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "best_model": run.best_weights,
        "state": asdict(run.state),
        "meta": {
            "arch": run.model.bundle.arch,
            "classes": list(run.split.classes),
            "source": run.source,
            "image_size": run.config.image_size,
        },
    }
    with atomic_target(run.folder.checkpoint) as tmp:
        torch.save(payload, tmp)


def _read_checkpoint(folder: IndexFolder, split: Split, config: TrainConfig) -> dict[str, Any]:
    path = folder.checkpoint
    if not path.is_file():
        raise SimimgError(f"nothing to resume: no checkpoint at {path}; run without --resume to start training")
    try:
        checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint means the same to the user
        raise SimimgError(f"checkpoint {path} is unreadable ({err}); run without --resume to start again") from None
    meta = checkpoint["meta"]
    if (
        tuple(meta["classes"]) != split.classes
        or meta["image_size"] != config.image_size
        or (config.arch and config.arch != meta["arch"])
    ):
        raise SimimgError(
            f"cannot resume: the checkpoint is a {meta['arch']} at {meta['image_size']} px for classes "
            f"{', '.join(meta['classes'])}; match those, or run without --resume to start again"
        )
    return checkpoint


def _restore(run: _Run, checkpoint: dict[str, Any]) -> None:
    run.model.net.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.best_weights = checkpoint["best_model"]
    saved = dict(checkpoint["state"])
    saved["history"] = [EpochStats(**h) for h in saved["history"]]
    run.state = _State(**saved)
    log.info("resuming '%s' after epoch %d (best %d)", run.config.name, run.state.epoch, run.state.best_epoch)
