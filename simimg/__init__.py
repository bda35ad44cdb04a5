"""simimg: fine-tune a DenseNet on your folders, embed every image, search them with FAISS.

The public API (simimg/api.py) loads on first use, so `import simimg` stays light and changes nothing
process-wide:

    import simimg
    simimg.build_index("data/pets", weights="none")
    simimg.open_index("pets").search("photo.jpg", k=5)
"""

from __future__ import annotations

import importlib
from typing import Any

from simimg.errors import BadImageError, SimimgError

__version__ = "0.2.0"
_API = (
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
)
__all__ = [*_API, "SimimgError", "BadImageError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("simimg.api"), name)
    raise AttributeError(f"module 'simimg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
