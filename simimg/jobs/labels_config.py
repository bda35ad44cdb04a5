"""What a label edit did (`LabelsReport`) and the edits an index holds, read torch-free: `simimg labels list`,
training, evaluation and the audit read them without loading a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simimg.dataset.corrections import Corrections, Edit
from simimg.dataset.scan import folder_label, label_depth
from simimg.store.catalog import Catalog, reading
from simimg.store.edits import read_corrections
from simimg.store.layout import IndexFolder


@dataclass(frozen=True)
class LabelsReport:
    """What one batch did: `edits` recorded (or undone), `relabelled` rows and `excluded` images in the version
    it published."""

    name: str
    action: str
    batch: int | None
    edits: int
    version: int
    relabelled: int
    excluded: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_edits(home: str | Path | None, name: str) -> list[Edit]:
    """The edits in force, oldest first (a later edit of a path's label or findings replaces an earlier one)."""
    folder = IndexFolder.of(home, name)
    with reading(folder.catalog) as catalog:
        return list(read_corrections(catalog).edits)


def corrections_for(home: str | Path | None, name: str, data_dir: str | Path) -> Corrections:
    """The label edits of index NAME when it is an index of `data_dir`, else none: what training, evaluation and
    the audit apply to the folder's labels."""
    folder = IndexFolder.of(home, name)
    if not Catalog.initialised(folder.catalog):
        return Corrections()
    with reading(folder.catalog) as catalog:
        root = catalog.get_meta("data_root")
        if root is None or Path(root) != Path(data_dir).expanduser().resolve():
            return Corrections()
        return read_corrections(catalog)


def folder_labels(paths: list[str], root: Path) -> dict[str, str | None]:
    """The label each path's folder gives it, as a scan of `root` would (None: the unlabeled pool, or a file
    outside the collection)."""
    depth = label_depth(root) if root.is_dir() else 1
    return {p: None if Path(p).is_absolute() else folder_label(Path(p).parts, depth) for p in paths}
