"""simimg's public Python API: the names `import simimg` offers. The CLI, the app and the HTTP server are thin
shells over these, so there is one code path for every job.

    import simimg
    simimg.build_index("data/pets", weights="none")              # embed every image, publish version 1
    simimg.train("data/pets", "pets", head_only=True)           # a classifier in seconds, served at once
    pets = simimg.open_index("pets")
    pets.search("query.jpg", k=5)                               # neighbours and the predicted class
    simimg.serve(port=8000)                                     # the same, over HTTP (blocks)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from simimg.dataset.images import load_image
from simimg.errors import SimimgError
from simimg.fsutil import atomic_target
from simimg.jobs.audit import AuditJob, AuditReport, run_audit
from simimg.jobs.evaluate import run_evaluation
from simimg.jobs.index import run_index, switch_model
from simimg.jobs.index_config import IndexJob, IndexReport
from simimg.jobs.train import run_training
from simimg.jobs.train_config import TrainConfig, TrainReport
from simimg.models.encoder import Encoder
from simimg.models.heatmaps import Explanation, overlay
from simimg.progress import Hooks, Phase, Progress
from simimg.query.service import SearchService
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder, resolve_home
from simimg.store.model_store import (
    ModelEntry,
    list_models as _list_models,
    load_model,
    resolve_fingerprint,
    serving_model,
)

__all__ = [  # noqa: RUF022 - as simimg._API lists them: the functions in the order defined here, then types
    "build_index",
    "open_index",
    "train",
    "evaluate",
    "audit",
    "explain",
    "list_models",
    "use_model",
    "export_model",
    "serve",
    "Encoder",
    "SearchService",
    "IndexReport",
    "TrainReport",
    "AuditReport",
    "Explanation",
    "Hooks",
]


def build_index(
    data_dir: str | Path,
    name: str | None = None,
    home: str | Path | None = None,
    progress: Progress | None = None,
    on_phase: Phase | None = None,
    **options: Any,
) -> IndexReport:
    """Build or update the index NAME (default: the folder's name) of a folder of class folders.

    `progress(done, total)` hears the embedding; `on_phase(step)` each step as it starts.

    `options` are `IndexJob` fields: arch, weights ("imagenet", "none" or a path), image_size, device, precision
    ("auto", "bf16", "fp32"), batch_size, workers, chunk_size, compile, index_kind ("auto", "flat", "ivf",
    "ivfpq"); engine="ray" embeds on Ray Data (address, ray_actors, ray_shards). Only new or changed files are
    embedded.
    """
    job = _config(
        IndexJob, data_dir=str(data_dir), name=name or folder_name(data_dir), home=str(resolve_home(home)), **options
    )
    return run_index(job, progress, on_phase)


def open_index(
    name: str, home: str | Path | None = None, device: str = "auto", precision: str = "auto"
) -> SearchService:
    """A warm index for queries: `.search(images, k, label, min_score)`, `.predict(images)`, `.info()`.

    It follows newly published versions (and their models) by itself, without being opened again. `precision`
    "auto" runs the model in bf16 where the device has native bf16 units, else float32; "fp32" forces float32.
    """
    return SearchService(home, name, device, precision)


def train(
    data_dir: str | Path,
    name: str | None = None,
    home: str | Path | None = None,
    head_only: bool = False,
    hooks: Hooks | None = None,
    embed_missing: bool = False,
    **options: Any,
) -> TrainReport:
    """Train a new model of index NAME on class folders and, unless `index=False`, serve it when done.

    `head_only` fits a classifier on the embeddings the index already stores (seconds, nothing re-embedded). It
    refuses, before embedding anything, a folder with readable images the index does not hold (new, changed, or
    another collection's) unless `embed_missing`, which embeds them with the serving model (not added; the hooks
    hear an "embedding" phase and its progress). Otherwise the backbone is fine-tuned (or trained from scratch with
    weights="none"). `options` are `TrainConfig` fields (arch, weights, epochs, lr, image_size, batch_size, device,
    precision, resume, ...).
    """
    config = _config(
        TrainConfig,
        data_dir=str(data_dir),
        name=name or folder_name(data_dir),
        home=str(resolve_home(home)),
        head_only=head_only,
        embed_missing=embed_missing,
        **options,
    )
    return run_training(config, hooks or Hooks())


def evaluate(
    data_dir: str | Path | None,
    name: str,
    home: str | Path | None = None,
    model: str | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> dict:
    """Accuracy, macro-F1, per-class metrics, confusion and retrieval (P@1, P@10, mAP) of NAME's serving model
    (or the kept `model`) on DATA_DIR/val, or on the validation images the model recorded when DATA_DIR is None."""
    return run_evaluation(
        name,
        str(resolve_home(home)),
        None if data_dir is None else str(data_dir),
        model=model,
        progress=progress,
        **options,
    )


def audit(
    data_dir: str | Path,
    name: str | None = None,
    home: str | Path | None = None,
    progress: Progress | None = None,
    on_phase: Callable[[str], None] | None = None,
    **options: Any,
) -> AuditReport:
    """Likely label errors, exact and near duplicates (cross-class, cross-split), outliers and class imbalance of
    a labelled folder, judged with index NAME's serving model; kept as the index's audit.json.

    The folder must be NAME's collection folder or inside it (another collection is refused: index it and audit
    it with that index). Images the index does not hold yet are embedded on the fly and not added. `on_phase`
    hears "reading", "embedding" (only when some images need it; `progress` counts them), "fitting" and "saving".
    `options` are `AuditJob` fields: device, batch_size, workers, val_split, seed, folds.
    """
    job = _config(
        AuditJob, data_dir=str(data_dir), name=name or folder_name(data_dir), home=str(resolve_home(home)), **options
    )
    return run_audit(job, progress, on_phase)


def explain(
    image: str | Path | Image.Image,
    name: str,
    home: str | Path | None = None,
    neighbor: str | Path | Image.Image | None = None,
    label: str | None = None,
    out: str | Path | None = None,
    method: str = "gradcam",
    device: str = "auto",
) -> Explanation:
    """Where NAME's serving model looks in `image`: a class activation map of the predicted class (or `label`),
    or, given a `neighbor`, of the two images' cosine similarity (no classifier needed). The map has the image's
    own size; `out` also writes it over the image as a PNG of that size."""
    service = open_index(name, home, device)
    try:
        result = service.explain(image, neighbor, label, method)
        full = image if isinstance(image, Image.Image) else load_image(service.gallery_file(image))
    finally:
        service.close()
    result = result.resized(full.size)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(out) as tmp:
            overlay(full, result.heatmap).save(tmp, "PNG")
    return result


def list_models(name: str, home: str | Path | None = None) -> list[ModelEntry]:
    """Every model NAME keeps, newest first, with the one its published version serves marked `serving`."""
    folder = IndexFolder.of(home, name)
    if not folder.catalog.exists():
        raise SimimgError(f"no index named '{name}' in {folder.root.parent}")
    with reading(folder.catalog) as catalog:
        published = catalog.published()
    return _list_models(folder, published.model if published else None)


def use_model(
    model: str,
    name: str,
    home: str | Path | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    precision: str = "auto",
    on_phase: Phase | None = None,
) -> IndexReport:
    """Serve a kept model (a fingerprint, or a unique prefix of one), embedding only what it has no vectors for."""
    folder = IndexFolder.of(home, name)
    return switch_model(
        str(resolve_home(home)),
        name,
        resolve_fingerprint(folder, model),
        device=device,
        progress=progress,
        precision=precision,
        on_phase=on_phase,
    )


def export_model(
    name: str, out: str | Path, format: str = "onnx", home: str | Path | None = None, model: str | None = None
) -> dict:
    """Write NAME's serving model (or the kept `model`) to `out`: ONNX checked against onnxruntime, or the
    safetensors bundle folder as a zip. Returns what was written and checked."""
    from simimg.models.export import FORMATS, export_bundle, export_onnx

    if format not in FORMATS:
        raise SimimgError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    folder = IndexFolder.of(home, name)
    fingerprint = resolve_fingerprint(folder, model) if model else serving_model(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "bundle":
        return {"model": fingerprint, **export_bundle(folder.model_dir(fingerprint), out)}
    return {"model": fingerprint, **export_onnx(load_model(folder, fingerprint), out)}


def serve(
    home: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    token: str | None = None,
    **options: Any,
) -> None:
    """Serve HOME's indexes over HTTP until interrupted (`simimg serve`); see the README's "The HTTP API".

    `token` (default `$SIMIMG_API_TOKEN`) makes every request but /healthz need `Authorization: Bearer <token>`;
    without one only a loopback `host` is allowed. `options` are `ServeConfig` fields (device, max_batch,
    max_wait_ms, max_queue, timeout_s, max_mb, max_pixels, max_files, threads, access_log).
    """
    from simimg.http.server import TOKEN_ENV, ServeConfig, run_server  # FastAPI and uvicorn load only for a server

    config = _config(ServeConfig, home=str(resolve_home(home)), host=host, port=port, workers=workers, **options)
    run_server(config, token or os.environ.get(TOKEN_ENV) or None)


def folder_name(data_dir: str | Path) -> str:
    """The default index name: the folder's own name (`data/pets` -> `pets`)."""
    return Path(data_dir).resolve().name


def _config(cls: type, **values: Any) -> Any:
    """A job config from keyword options; an unknown option is a user error that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SimimgError(f"unknown option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return cls(**values)
