"""Label corrections: the edits a user made to a collection's labels, folded into what each file's label is now.

An edit follows a path, never the bytes: a file changed on disk keeps its edit, and the edit goes only when the file
does. Each path has two slots: its label (`set` gives it one, `exclude` takes it out of the index, training and
evaluation; the later of the two wins) and its audit findings (`dismiss`: judged fine, not counted again).
Pure: the catalog stores the edits (store/edits.py), the jobs apply them to what a scan found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from simimg.dataset.scan import UNLABELED_FOLDERS, Record
from simimg.errors import SimimgError

ACTIONS = ("set", "exclude", "dismiss")
SOURCES = ("user", "audit", "prediction")  # who proposed it: the user, an accepted audit suggestion or prediction
_SLOT = {"set": "label", "exclude": "label", "dismiss": "findings"}


@dataclass(frozen=True)
class Edit:
    """One label edit: `old_label` is what the path had before it (None: unlabeled)."""

    path: str
    action: str
    old_label: str | None = None
    new_label: str | None = None
    source: str = "user"
    batch: int = 0
    created: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise SimimgError(f"unknown label action {self.action!r}: use one of {', '.join(ACTIONS)}")
        if self.source not in SOURCES:
            raise SimimgError(f"unknown edit source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.action == "set":
            check_label(self.new_label)


@dataclass(frozen=True)
class Corrections:
    """The edits in force, latest per (path, slot): what `apply` does to a scan's records."""

    edits: tuple[Edit, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    excluded: frozenset[str] = frozenset()
    dismissed: frozenset[str] = frozenset()

    @classmethod
    def fold(cls, edits: Iterable[Edit]) -> Corrections:
        """Edits in the order they were made (undone ones left out) -> the ones in force."""
        latest: dict[tuple[str, str], Edit] = {}
        for edit in edits:
            latest[(edit.path, _SLOT[edit.action])] = edit
        in_force = tuple(sorted(latest.values(), key=lambda e: (e.batch, e.created, e.path)))
        return cls(
            in_force,
            {e.path: e.new_label for e in in_force if e.action == "set" and e.new_label is not None},
            frozenset(e.path for e in in_force if e.action == "exclude"),
            frozenset(e.path for e in in_force if e.action == "dismiss"),
        )

    def __bool__(self) -> bool:
        return bool(self.edits)

    def apply(self, records: Iterable[Record]) -> tuple[Record, ...]:
        """The records as the user corrected them: relabelled, excluded ones left out, and the images of an
        outside unlabeled folder (absolute paths) the user has labelled added, so training finds them."""
        kept = [replace(r, label=self.labels[r.path]) if r.path in self.labels else r for r in records]
        seen = {r.path for r in kept}
        outside = [Record(p, label) for p, label in self.labels.items() if p.startswith("/") and p not in seen]
        return tuple(r for r in kept + outside if r.path not in self.excluded)

    def label_of(self, path: str, folder_label: str | None) -> str | None:
        return self.labels.get(path, folder_label)


def check_label(label: str | None) -> str:
    """A class name a folder could have: what `export` writes as a folder name."""
    if not label or not label.strip() or "/" in label or "\\" in label or label in (".", "..") or label[0] == ".":
        raise SimimgError(f"{label!r} is not a class name: use a folder name (no '/', not empty, not hidden)")
    if label in UNLABELED_FOLDERS:
        raise SimimgError(f"{label!r} is the unlabeled pool's folder, not a class name")
    return label
