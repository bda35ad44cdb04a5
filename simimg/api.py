"""simimg's public Python API: the functions `import simimg` offers. The CLI, the app and the HTTP server are thin
shells over these (and the public types simimg/__init__.py names), so there is one code path for every job.

    import simimg
    simimg.build_index("data/pets", weights="none")              # embed every image, publish version 1
    simimg.train("data/pets", "pets", head_only=True)           # a classifier in seconds, served at once
    pets = simimg.open_index("pets")
    pets.search("query.jpg", k=5)                               # neighbours and the predicted class
    simimg.serve(port=8000)                                     # the same, over HTTP (blocks)

Each function imports its job when called: `import simimg`, `simimg --help`, `simimg models` and `simimg info`
load neither torch nor OpenVINO.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from simimg.errors import SimimgError, checked_options
from simimg.store.layout import IndexFolder, resolve_home

if TYPE_CHECKING:
    from PIL import Image

    from simimg.dataset.splits import ClassCount
    from simimg.jobs.audit_config import AuditReport
    from simimg.jobs.index_config import IndexReport
    from simimg.jobs.labels_config import LabelsReport
    from simimg.jobs.predict_config import PredictReport
    from simimg.jobs.review import ReviewItem
    from simimg.jobs.train_config import TrainReport
    from simimg.jobs.verify import VerifyReport
    from simimg.models.heatmaps import Explanation
    from simimg.progress import Hooks, Phase, Progress
    from simimg.query.service import SearchService
    from simimg.store.model_store import ModelEntry


# --- jobs ---------------------------------------------------------------------------------------------
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
    "ivfpq"), on_disk (an ivfpq index's lists in a file per version; None: as last built, else auto);
    engine="ray" embeds on Ray Data (address, ray_actors, ray_shards). Only new or changed files are
    embedded.
    """
    from simimg.jobs.index import run_index
    from simimg.jobs.index_config import IndexJob

    job = checked_options(
        IndexJob, data_dir=str(data_dir), name=name or folder_name(data_dir), home=str(resolve_home(home)), **options
    )
    return run_index(job, progress, on_phase)


def make_demo(home: str | Path | None = None, data_dir: str | Path | None = None, progress: Progress | None = None):
    """Write a small generated collection (three classes of coloured scenes) and index it as 'demo': a fresh
    machine works with no data and no download. `data_dir` defaults to the first data root's demo/ folder."""
    from simimg.dataset.roots import data_roots
    from simimg.jobs.demo import DemoJob, build_demo

    folder = data_dir if data_dir is not None else data_roots()[0] / "demo"
    return build_demo(DemoJob(data_dir=str(folder), home=str(resolve_home(home))), progress)


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
    from simimg.jobs.train import run_training
    from simimg.jobs.train_config import TrainConfig
    from simimg.progress import Hooks

    config = checked_options(
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
    from simimg.jobs.evaluate import run_evaluation

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
    on_phase: Phase | None = None,
    **options: Any,
) -> AuditReport:
    """Likely label errors, exact and near duplicates (cross-class, cross-split), outliers and class imbalance of
    a labelled folder, judged with index NAME's serving model; kept as the index's audit.json.

    The folder must be NAME's collection folder or inside it (another collection is refused: index it and audit
    it with that index). Images the index does not hold yet are embedded on the fly and not added. `on_phase`
    hears "reading", "embedding" (only when some images need it; `progress` counts them), "fitting" and "saving".
    `options` are `AuditJob` fields: device, batch_size, workers, val_split, seed, folds.
    """
    from simimg.jobs.audit import run_audit
    from simimg.jobs.audit_config import AuditJob

    job = checked_options(
        AuditJob, data_dir=str(data_dir), name=name or folder_name(data_dir), home=str(resolve_home(home)), **options
    )
    return run_audit(job, progress, on_phase)


def predict(
    data_dir: str | Path,
    name: str,
    out: str | Path,
    home: str | Path | None = None,
    progress: Progress | None = None,
    on_phase: Phase | None = None,
    **options: Any,
) -> PredictReport:
    """Classify every image under DATA_DIR (any layout) with index NAME's serving model into the file `out`: a
    row per readable image with its top labels and probabilities, the margin between the first two, its nearest
    labelled image in the index with that image's label and cosine, and an `uncertain` flag. Unreadable files are
    reported (`.skipped`), never fatal; a killed run resumes where it stopped when called again the same way.

    `progress(done, total)` hears the images; `on_phase(step)` each step (scanning, loading the model,
    classifying, writing). `options` are `PredictJob` fields: format ("csv", "parquet", "jsonl"; default: from
    `out`'s extension), top_k, uncertain_margin, device, precision, batch_size, workers, chunk_size; engine="ray"
    classifies on Ray Data (address, ray_actors, ray_shards). The model needs a classifier (`train(...,
    head_only=True)` fits one in seconds).
    """
    from simimg.jobs.predict import run_predict
    from simimg.jobs.predict_config import PredictJob

    job = checked_options(
        PredictJob, data_dir=str(data_dir), name=name, home=str(resolve_home(home)), out=str(out), **options
    )
    return run_predict(job, progress, on_phase)


def last_audit(name: str, home: str | Path | None = None) -> AuditReport | None:
    """The audit last kept for index NAME (what `audit` returned then), or None when there is none."""
    from simimg.jobs.audit_config import read_audit

    return read_audit(IndexFolder.of(home, name))


# --- label edits: versioned data, one batch per call, each published as an index version -------------------
def set_labels(
    name: str, paths: list[str], to: str, home: str | Path | None = None, source: str = "user"
) -> LabelsReport:
    """Give each image (a file path, or its path in the index) the class `to`; the files stay where they are.

    `source` records who proposed it: "user", "audit" (an accepted suggestion) or "prediction".
    """
    from simimg.jobs.labels import edit_labels

    return edit_labels(home, name, paths, "set", to, source)


def apply_labels(
    name: str, labels: dict[str, str], home: str | Path | None = None, source: str = "user"
) -> LabelsReport:
    """Give each image its own class in one batch ({path: class}): accepted suggestions differ image by image."""
    from simimg.jobs.labels import apply_labels as apply

    return apply(home, name, labels, source)


def exclude_images(name: str, paths: list[str], home: str | Path | None = None) -> LabelsReport:
    """Take images out of the index, training and evaluation; they stay on disk (undo brings them back)."""
    from simimg.jobs.labels import edit_labels

    return edit_labels(home, name, paths, "exclude")


def keep_one(name: str, keep: str, group: list[str], home: str | Path | None = None) -> LabelsReport:
    """Of a group of duplicates, keep `keep` and exclude the others."""
    others = [p for p in group if p != keep]
    if len(others) == len(group):
        raise SimimgError(f"{keep!r} is not one of the group it should be kept from")
    return exclude_images(name, others, home)


def dismiss_findings(name: str, paths: list[str], home: str | Path | None = None) -> LabelsReport:
    """Judge these images fine as they are: later audits mark their findings as seen and do not count them."""
    from simimg.jobs.labels import edit_labels

    return edit_labels(home, name, paths, "dismiss")


def accept_suggestions(name: str, top: int | None = None, home: str | Path | None = None) -> LabelsReport:
    """Accept the last audit's suggested labels, its `top` highest-ranked (all by default), as one batch."""
    from simimg.jobs.labels import accept_suggestions as accept

    return accept(home, name, top)


def undo_labels(name: str, home: str | Path | None = None) -> LabelsReport:
    """Undo the latest batch of label edits not undone yet."""
    from simimg.jobs.labels import undo_labels as undo

    return undo(home, name)


def label_edits(name: str, home: str | Path | None = None) -> list[dict[str, Any]]:
    """The edits in force, oldest first: {path, action, old_label, new_label, source, batch, created}."""
    from dataclasses import asdict

    from simimg.jobs.labels_config import list_edits

    return [asdict(e) for e in list_edits(home, name)]


def export_labels(
    name: str, out: str | Path, format: str = "imagefolder", move: bool = False, home: str | Path | None = None
) -> dict[str, Any]:
    """Write the corrected collection: a class-folder tree under `out` (copies; `move=True` moves the files and
    writes an undo log), or one CSV or Parquet file of path, label, folder label and edits."""
    from simimg.jobs.label_export import export_labels as export

    return export(home, name, out, format, move)


def undo_moves(log_file: str | Path) -> int:
    """Put back every file an `export_labels(move=True)` moved (its OUT/moves.jsonl); returns how many."""
    from simimg.jobs.label_export import undo_moves as undo

    return undo(log_file)


def review_queue(
    name: str, queue: str = "issues", label: str | None = None, home: str | Path | None = None, limit: int | None = None
) -> list[ReviewItem]:
    """What to ask the user about, first to ask first: the last audit's open label "issues" or "duplicates", the
    "unlabeled" pool least certain first, or one "class" (`label`) least typical first."""
    from simimg.jobs.review import review_queue as queue_of

    return queue_of(home, name, queue, label, limit)


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
    from simimg.jobs.index import switch_model
    from simimg.store.model_store import resolve_fingerprint

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


def upgrade_index(name: str, home: str | Path | None = None) -> bool:
    """Convert an index made by simimg 0.1 to this layout in place; False when it already was in it."""
    from simimg.jobs.upgrade import upgrade

    folder = IndexFolder.of(home, name)
    if not folder.catalog.exists() and not folder.root.is_dir():
        raise SimimgError(f"no index named '{name}' in {folder.root.parent}")
    return upgrade(folder)


def verify_index(name: str, home: str | Path | None = None, repair: bool = False) -> VerifyReport:
    """Check every file of index `name` against the checksums taken when it was written: the damaged ones, with the
    images each affects. `repair` embeds damaged vector rows again from the original images, rebuilds a damaged
    FAISS file and removes what killed runs left, then checks again."""
    from simimg.jobs.verify import verify

    return verify(IndexFolder.of(home, name), repair)


# --- queries ------------------------------------------------------------------------------------------
def open_index(
    name: str, home: str | Path | None = None, device: str = "auto", precision: str = "auto"
) -> SearchService:
    """A warm index for queries: `.search(images, k, label, min_score)`, `.predict(images)`, `.info()`, and what
    the app shows: `.browse(label, page)`, `.near_duplicates()`, `.score_landmarks()`, `.map_2d(method)`.

    It follows newly published versions (and their models) by itself, without being opened again. `precision`
    "auto" runs the model in bf16 where the device has native bf16 units, else float32; "fp32" forces float32.
    """
    from simimg.query.service import SearchService

    return SearchService(home, name, device, precision)


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
    from simimg.dataset.images import load_image
    from simimg.fsutil import atomic_target

    service = open_index(name, home, device)
    try:
        result = service.explain(image, neighbor, label, method)
        full = image if not isinstance(image, (str, Path)) else load_image(service.gallery_file(image))
    finally:
        service.close()
    result = result.resized(full.size)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(out) as tmp:
            result.overlay(full).save(tmp, "PNG")
    return result


# --- what an index holds, without loading its model ----------------------------------------------------
def list_indexes(home: str | Path | None = None) -> list[str]:
    """The names of the indexes under HOME, most recently changed first."""
    from simimg.store.layout import list_indexes as folders

    return [folder.name for folder in folders(home)]


def index_info(name: str, home: str | Path | None = None) -> dict:
    """What index NAME serves: counts per label, its model (arch, kind, classes), version, FAISS kind and collection
    folder; read from the catalog and model.json only (no model, no FAISS: `simimg info`)."""
    from simimg.store.summary import read_summary

    return read_summary(IndexFolder.of(home, name))


def serving_model(name: str, home: str | Path | None = None) -> str | None:
    """The fingerprint of the model index NAME serves; None while its first build has not finished."""
    from simimg.store.model_store import serving_model as served

    folder = IndexFolder.of(home, name)
    if not folder.catalog.exists():
        raise SimimgError(f"no index named '{name}' in {folder.root.parent}")
    return served(folder, required=False)


def collection_folder(name: str, home: str | Path | None = None) -> Path | None:
    """The folder index NAME was built from (what `train --head-only` and `audit` hold it to); None if unknown."""
    from simimg.jobs.train_head import collection_folder as recorded

    folder = IndexFolder.of(home, name)
    return recorded(folder) if folder.catalog.exists() else None


def list_models(name: str, home: str | Path | None = None) -> list[ModelEntry]:
    """Every model NAME keeps, newest first, with the one its published version serves marked `serving`."""
    from simimg.store.model_store import list_models as kept

    folder = IndexFolder.of(home, name)
    return kept(folder, serving_model(name, home))


def export_model(
    name: str,
    out: str | Path | None = None,
    format: str = "onnx",
    home: str | Path | None = None,
    model: str | None = None,
) -> dict:
    """Write NAME's serving model (or the kept `model`) to `out` (default: `export_path`): ONNX checked against
    onnxruntime, or the safetensors bundle folder as a zip. Returns what was written and checked."""
    from simimg.choices import EXPORT_FORMATS
    from simimg.models.export import export_bundle, export_onnx
    from simimg.store.model_store import load_model, resolve_fingerprint, serving_model as served

    if format not in EXPORT_FORMATS:
        raise SimimgError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    folder = IndexFolder.of(home, name)
    fingerprint = resolve_fingerprint(folder, model) if model else served(folder)
    target = Path(out) if out is not None else export_path(name, fingerprint, format, home)
    target.parent.mkdir(parents=True, exist_ok=True)
    if format == "bundle":
        return {"model": fingerprint, **export_bundle(folder.model_dir(fingerprint), target)}
    return {"model": fingerprint, **export_onnx(load_model(folder, fingerprint), target)}


def export_path(name: str, model: str, format: str = "onnx", home: str | Path | None = None) -> Path:
    """Where `export_model` writes a kept model by default: HOME/NAME/exports/<fingerprint>/model.onnx (or .zip)."""
    return IndexFolder.of(home, name).export_dir(model) / ("model.onnx" if format == "onnx" else "model.zip")


def model_info(
    arch: str, image_size: int = 224, device: str = "auto", batch_size: int = 32, memory_efficient: bool = False
) -> dict:
    """Parameters, GFLOPs per image, embedding size and, on CUDA, peak training memory of a backbone."""
    from simimg.models.info import model_info as measure

    return measure(arch, image_size, device, batch_size, memory_efficient)


def imagenet_weights(arch: str) -> tuple[Path, bool]:
    """Where torchvision keeps `arch`'s ImageNet weights, and whether the file is on this machine."""
    from simimg.models.net import imagenet_cached, weights_file

    return weights_file(arch), imagenet_cached(arch)


# --- folders ------------------------------------------------------------------------------------------
def data_roots() -> list[Path]:
    """The folders a shell may read collections from: ./data, plus $SIMIMG_DATA_ROOTS (os.pathsep-separated)."""
    from simimg.dataset.roots import data_roots as roots

    return roots()


def list_collections() -> list[Path]:
    """The folders of class folders found directly under the data roots."""
    from simimg.dataset.roots import data_roots as roots, list_collections as found

    return found(roots())


def check_data_dir(text: str) -> Path:
    """The folder `text` names, resolved, only when it lies under a data root; else a SimimgError saying why."""
    from simimg.dataset.roots import data_roots as roots, resolve_data_dir

    return resolve_data_dir(text, roots())


def class_counts(data_dir: str | Path, val_split: float | None = None) -> tuple[str, list[ClassCount]]:
    """How a training run would split DATA_DIR: where its validation images come from, and per class the train
    and validation counts of the files that open as images (headers only) and the paths of those that do not."""
    from simimg.dataset.splits import class_counts as count, split_dataset
    from simimg.jobs.train_config import TrainConfig

    share = TrainConfig.val_split if val_split is None else val_split
    split = split_dataset(data_dir, share)
    return split.source(share), count(split)


def folder_name(data_dir: str | Path) -> str:
    """The default index name: the folder's own name (`data/pets` -> `pets`)."""
    return Path(data_dir).resolve().name
