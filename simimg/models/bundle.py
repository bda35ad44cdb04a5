"""A model bundle's metadata (model.json): what rebuilds a model and its preprocessing, read without torch.

`simimg models`, `simimg info` and the app's model lists read only this; models/net.py rebuilds the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simimg.dataset.preprocess import Preprocess
from simimg.errors import SimimgError

BUNDLE_JSON = "model.json"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_FORMAT = 2
# What a model is: a backbone as loaded, a fully trained one, or a linear head fitted on stored embeddings.
KINDS = ("pretrained", "fine-tuned", "head")


@dataclass(frozen=True)
class ModelBundle:
    """Everything needed to rebuild a model and its preprocessing exactly; saved as model.json.

    Two identities: `embedding` names the embedding function (architecture, preprocessing, trunk weights), which
    is what stored vectors depend on; `fingerprint` names the whole model (the embedding plus its head and
    classes). A head fitted on stored vectors makes a new model with the same embedding.
    """

    arch: str
    classes: tuple[str, ...]
    preprocess: Preprocess
    source: str
    fingerprint: str
    embedding: str
    kind: str = "pretrained"
    created: str = ""
    unit_head: bool = False
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def has_classifier(self) -> bool:
        return len(self.classes) > 0

    @property
    def dim(self) -> int:
        return int(self.info["embedding_dim"])

    @property
    def random_features(self) -> bool:
        """Whether the embedding is a random-init trunk nothing trained (a head on one inherits it)."""
        return self.source.startswith("random-init") or bool(self.info.get("random_features"))

    @property
    def val_accuracy(self) -> float | None:
        accuracy: float | None = self.info.get("training", {}).get("metrics", {}).get("val_accuracy")
        return accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "arch": self.arch,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "source": self.source,
            "fingerprint": self.fingerprint,
            "embedding": self.embedding,
            "kind": self.kind,
            "created": self.created,
            "unit_head": self.unit_head,
            "embedding_dim": self.info.get("embedding_dim"),
            **{k: v for k, v in self.info.items() if k != "embedding_dim"},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelBundle:
        if d.get("format", 1) != BUNDLE_FORMAT:
            raise ValueError(f"bundle format {d.get('format', 1)}, this simimg reads format {BUNDLE_FORMAT}")
        known = {
            "format",
            "arch",
            "classes",
            "preprocess",
            "source",
            "fingerprint",
            "embedding",
            "kind",
            "created",
            "unit_head",
        }
        return cls(
            arch=d["arch"],
            classes=tuple(d["classes"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            source=d["source"],
            fingerprint=d["fingerprint"],
            embedding=d["embedding"],
            kind=d["kind"],
            created=d["created"],
            unit_head=bool(d["unit_head"]),
            info={k: v for k, v in d.items() if k not in known},
        )


def read_bundle(directory: str | Path) -> ModelBundle:
    """Just the metadata, cheap: for listings and checks."""
    path = Path(directory) / BUNDLE_JSON
    try:
        return ModelBundle.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise SimimgError(f"no model bundle at {path.parent} (model.json is missing)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise SimimgError(
            f"model bundle {path} is corrupt ({err}); delete that model folder, or rebuild it "
            "with `simimg train` or `simimg index`"
        ) from None
