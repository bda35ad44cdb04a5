"""Every model an index has used or trained, kept under its fingerprint: HOME/NAME/models/<fingerprint>/.

A model folder holds the bundle (model.json + model.safetensors) and what its run produced (curves.png,
confusion.png, train_job.json). It is written beside its final place and renamed there in one step, so a reader
never sees half of one, and it never changes afterwards. Pruning removes whole folders the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from simimg.errors import SimimgError
from simimg.faults import publish_step
from simimg.models.bundle import BUNDLE_JSON, ModelBundle, read_bundle
from simimg.store.catalog import reading
from simimg.store.checksums import write_manifest
from simimg.store.layout import IndexFolder

if TYPE_CHECKING:  # torch loads only to save or load weights: listings read model.json alone
    from simimg.models.net import LoadedModel, Net

log = logging.getLogger(__name__)

KEEP_UNUSED = 3


@dataclass(frozen=True)
class ModelEntry:
    """One kept model, as `simimg models` lists it."""

    fingerprint: str
    created: str
    arch: str
    kind: str
    source: str
    val_accuracy: float | None
    classes: list[str]
    embedding: str
    serving: bool
    path: str = ""  # the model's folder: what `--weights` (or `weights=`) takes to start a new model from it


def publish_model(folder: IndexFolder, net: Net, bundle: ModelBundle, extras: dict[str, bytes] | None = None) -> Path:
    """Write the model's folder atomically (a no-op when that fingerprint is already kept); returns its path."""
    target = folder.model_dir(bundle.fingerprint)
    if target.is_dir():
        return target
    folder.models.mkdir(parents=True, exist_ok=True)
    staging = folder.models / f".staging-{bundle.fingerprint}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    from simimg.models.net import save_bundle

    try:
        save_bundle(staging, net, bundle)
        for name, data in (extras or {}).items():
            (staging / name).write_bytes(data)
        write_manifest(staging)
        _fsync_dir(staging)
        publish_step(f"model {bundle.fingerprint} staged")
        os.rename(staging, target)
        _fsync_dir(folder.models)
        publish_step(f"model {bundle.fingerprint} in place")
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("kept model %s (%s, %s) in %s", bundle.fingerprint, bundle.kind, bundle.arch, target)
    return target


def load_model(folder: IndexFolder, fingerprint: str) -> LoadedModel:
    directory = folder.model_dir(fingerprint)
    if not (directory / BUNDLE_JSON).is_file():
        raise SimimgError(
            f"index '{folder.name}' keeps no model {fingerprint} (in {folder.models}); "
            f"`simimg models --name {folder.name}` lists the ones it has"
        )
    from simimg.models.net import load_bundle

    return load_bundle(directory)


def read_model(folder: IndexFolder, fingerprint: str) -> ModelBundle:
    """The bundle's description alone: cheap, for listings and checks."""
    return read_bundle(folder.model_dir(fingerprint))


def model_fingerprints(folder: IndexFolder) -> list[str]:
    """Every kept model's fingerprint, newest first (by the time recorded in each model.json)."""
    if not folder.models.is_dir():
        return []
    found = []
    for path in folder.models.iterdir():
        if path.is_dir() and not path.name.startswith(".") and (path / BUNDLE_JSON).is_file():
            try:
                found.append((read_bundle(path).created, path.name))
            except SimimgError as err:
                log.warning("ignoring a damaged model folder: %s", err)
    return [fp for _, fp in sorted(found, reverse=True)]


def list_models(folder: IndexFolder, serving: str | None) -> list[ModelEntry]:
    """One entry per kept model, newest first; `serving` is the fingerprint the published version names."""
    entries = []
    for fp in model_fingerprints(folder):
        b = read_model(folder, fp)
        entries.append(
            ModelEntry(
                fp,
                b.created,
                b.arch,
                b.kind,
                b.source,
                b.val_accuracy,
                list(b.classes),
                b.embedding,
                fp == serving,
                str(folder.model_dir(fp)),
            )
        )
    return entries


def resolve_fingerprint(folder: IndexFolder, prefix: str) -> str:
    """A kept model's full fingerprint from a unique prefix of it (as `git` takes short hashes)."""
    matches = [fp for fp in model_fingerprints(folder) if fp.startswith(prefix.strip())]
    if len(matches) == 1 and prefix.strip():
        return matches[0]
    known = ", ".join(model_fingerprints(folder)) or "none"
    what = "matches several models" if matches else "matches no kept model"
    raise SimimgError(f"{prefix!r} {what} of index '{folder.name}' (kept: {known})")


def prune_models(folder: IndexFolder, in_use: set[str], keep: int = KEEP_UNUSED) -> list[str]:
    """Remove models that no kept index version uses, beyond the newest `keep` of them; returns what went."""
    unused = [fp for fp in model_fingerprints(folder) if fp not in in_use]
    gone = unused[keep:]
    for fp in gone:
        trash = folder.models / f".trash-{fp}-{os.getpid()}"
        os.rename(folder.model_dir(fp), trash)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(folder.export_dir(fp), ignore_errors=True)
        log.info("pruned model %s of '%s'", fp, folder.name)
    return gone


def kept_embeddings(folder: IndexFolder) -> set[str]:
    """The embeddings some kept model computes: their stored vectors are worth keeping."""
    return {read_model(folder, fp).embedding for fp in model_fingerprints(folder)}


@overload
def serving_model(folder: IndexFolder, required: Literal[True] = True) -> str: ...
@overload
def serving_model(folder: IndexFolder, required: bool) -> str | None: ...
def serving_model(folder: IndexFolder, required: bool = True) -> str | None:
    """The fingerprint of the model the index's published version names: the one answer to "which model serves
    this index" (queries, evaluation, head-only training, the audit, export, `simimg models`).

    Without a published version it is None, or, when `required`, a user error that says what to run.
    """
    if not folder.root.is_dir() and required:
        raise SimimgError(
            f"no index named '{folder.name}' in {folder.root.parent}: build it with "
            f"`simimg index DATA_DIR --name {folder.name}`"
        )
    published = None
    if folder.catalog.exists():  # a folder with kept models but no catalog yet: trained with --no-index
        with reading(folder.catalog) as catalog:
            published = catalog.published()
    if published is None and required:
        raise SimimgError(
            f"index '{folder.name}' has no finished version yet, so no model serves it: run `simimg index` on it, "
            f"`simimg use MODEL --name {folder.name}`, or pass --model"
        )
    return published.model if published else None


def no_classifier(folder: IndexFolder) -> SimimgError:
    """The error of a job that needs the serving model's classifier when it has none: it says how to get one."""
    return SimimgError(
        f"index '{folder.name}' serves a model with no classifier: train one with "
        f"`simimg train DATA_DIR --name {folder.name} --head-only` (seconds)"
    )


def resolve_weights(weights: str) -> str:
    """`--weights` may name an index folder: it then means the model that index serves."""
    path = Path(weights).expanduser()
    index = IndexFolder(path)
    if weights in ("imagenet", "none") or not index.catalog.is_file():
        return weights
    serving = serving_model(index, required=False)
    if serving is None:
        raise SimimgError(f"--weights {weights}: that index has no published version yet, so no model to start from")
    return str(index.model_dir(serving))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
