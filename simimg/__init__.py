"""simimg: fine-tune a DenseNet on your folders, embed every image, search them with FAISS.

Every public name loads on first use, so `import simimg` stays light and changes nothing process-wide:

    import simimg
    simimg.build_index("data/pets", weights="none")
    simimg.open_index("pets").search("photo.jpg", k=5)

`PUBLIC` is the one list of them: the functions of simimg/api.py, `serve` (simimg/http), the types they take
and return, and the choices a caller picks from. The CLI, the app and the HTTP server use these names only.
"""

from __future__ import annotations

import importlib
from typing import Any

from simimg.errors import BadImageError, SimimgError

__version__ = "0.2.0"


def _names(module: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, module)


PUBLIC: dict[str, str] = {
    **_names(
        "simimg.api",
        # jobs
        "build_index",
        "make_demo",
        "train",
        "evaluate",
        "audit",
        "last_audit",
        "predict",
        "use_model",
        "upgrade_index",
        "verify_index",
        # label edits
        "set_labels",
        "apply_labels",
        "exclude_images",
        "keep_one",
        "dismiss_findings",
        "accept_suggestions",
        "undo_labels",
        "label_edits",
        "export_labels",
        "undo_moves",
        "review_queue",
        # queries
        "open_index",
        "explain",
        # what an index holds and keeps, read without loading a model
        "list_indexes",
        "index_info",
        "serving_model",
        "collection_folder",
        "list_models",
        "export_model",
        "export_path",
        "model_info",
        "imagenet_weights",
        # folders
        "data_roots",
        "list_collections",
        "check_data_dir",
        "class_counts",
        "folder_name",
    ),
    **_names("simimg.http.server", "serve"),
    **_names("simimg.http.config", "ServeConfig", "is_loopback"),
    **_names("simimg.store.layout", "resolve_home", "IndexFolder"),
    **_names("simimg.dataset.images", "load_image", "ImageInput"),
    **_names("simimg.dataset.uploads", "validate_upload", "UPLOAD_TYPES", "DEFAULT_MAX_MB", "MAX_UPLOAD_PIXELS"),
    **_names("simimg.memory", "reuse_freed_memory"),
    **_names(
        "simimg.choices",
        "ARCHITECTURES",
        "DEFAULT_ARCH",
        "PRECISIONS",
        "RUNTIMES",
        "INDEX_KINDS",
        "ENGINES",
        "EXPLAIN_METHODS",
        "EXPORT_FORMATS",
        "PROJECTIONS",
        "PREDICT_FORMATS",
        "REVIEW_QUEUES",
    ),
    # types
    **_names("simimg.query.service", "SearchService", "QueryResult", "Neighbor", "Prediction", "BrowsePage"),
    **_names("simimg.query.service", "DuplicatePair"),
    **_names("simimg.models.encoder", "Encoder"),
    **_names("simimg.models.heatmaps", "Explanation"),
    # job configs: the options each job takes, with their defaults (the CLI's defaults come from these)
    **_names("simimg.jobs.index_config", "IndexJob", "IndexReport"),
    **_names("simimg.jobs.train_config", "TrainConfig", "TrainReport"),
    **_names("simimg.jobs.audit_config", "AuditJob", "AuditReport"),
    **_names("simimg.jobs.labels_config", "LabelsReport"),
    **_names("simimg.jobs.review", "ReviewItem"),
    **_names("simimg.jobs.verify", "VerifyReport", "DamagedFile"),
    **_names("simimg.jobs.predict_config", "PredictJob", "PredictReport"),
    **_names("simimg.progress", "Hooks", "EpochStats", "Progress", "Phase"),
    **_names("simimg.store.model_store", "ModelEntry"),
    **_names("simimg.dataset.splits", "ClassCount"),
    **_names("simimg.dataset.scan", "Skipped"),
}
__all__ = [*PUBLIC, "SimimgError", "BadImageError", "__version__"]


def __getattr__(name: str) -> Any:
    module = PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'simimg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
