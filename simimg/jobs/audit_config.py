"""What an audit was asked to do (`AuditJob`) and what it found (`AuditReport`, kept as the index's audit.json):
torch-free, so the CLI reads its defaults and the app its last report without loading a model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from simimg.store.layout import IndexFolder


@dataclass(frozen=True)
class AuditJob:
    """Everything one `simimg audit` run was asked to do; saved in audit.json with its report."""

    data_dir: str
    name: str
    home: str
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    val_split: float = 0.2  # the seeded split `simimg train` would make, when there are no train/ and val/ folders
    seed: int = 0
    folds: int = 5


@dataclass(frozen=True)
class AuditReport:
    """`label_issues` {path, label, suggested, score, seen}, `duplicates` {paths, kind, score, labels, cross_class,
    cross_split, seen}, `outliers` {path, score, seen}, and a `summary` (its counts leave out what was seen: the
    findings the user dismissed); paths are relative to the audited folder."""

    label_issues: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_audit(folder: IndexFolder) -> AuditReport | None:
    """The last audit kept for this index, or None when there is none (or it cannot be read)."""
    try:
        d = json.loads(folder.audit.read_text())
        return AuditReport(d["label_issues"], d["duplicates"], d["outliers"], d["summary"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
