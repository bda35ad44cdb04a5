"""`simimg labels export`: the collection as its label edits have it, written out for other tools.

`imagefolder` copies each indexed image to OUT/[split/]LABEL/NAME (the unlabeled pool to OUT/unlabeled/), so any
ImageFolder reader sees the corrected classes; `move=True` moves the files instead and writes OUT/moves.jsonl, which
`undo_moves` reads to put every file back. `csv` and `parquet` write one row per image of the published version.
Excluded images are left out: they are not in the index.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from simimg.dataset.scan import SPLIT_NAMES
from simimg.errors import SimimgError
from simimg.fsutil import atomic_write_bytes
from simimg.jobs.labels_config import folder_labels
from simimg.store.catalog import reading
from simimg.store.edits import read_corrections
from simimg.store.layout import IndexFolder

log = logging.getLogger(__name__)

FORMATS = ("imagefolder", "csv", "parquet")
MOVES_LOG = "moves.jsonl"
COLUMNS = ("path", "label", "folder_label", "edited_by")


def export_labels(
    home: str | Path | None, name: str, out: str | Path, format: str = "imagefolder", move: bool = False
) -> dict[str, Any]:
    """Write the published version's images under their labels now; returns {out, format, images, moved}."""
    if format not in FORMATS:
        raise SimimgError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if move and format != "imagefolder":
        raise SimimgError("--move applies to --format imagefolder only")
    folder = IndexFolder.of(home, name)
    rows, root = _rows(folder)
    out = Path(out).expanduser()
    if format == "imagefolder":
        _write_tree(rows, root, out, move)
    else:
        _write_table(rows, out, format)
    log.info("exported %d images of '%s' to %s (%s)", len(rows), name, out, format)
    return {"out": str(out), "format": format, "images": len(rows), "moved": move}


def undo_moves(log_file: str | Path) -> int:
    """Move every file an `export --move` moved back where it was, newest first; returns how many."""
    moves = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    for move in reversed(moves):
        Path(move["from"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(move["to"], move["from"])
    Path(log_file).unlink()
    return len(moves)


def _rows(folder: IndexFolder) -> tuple[list[dict[str, Any]], Path]:
    """One row per image readers see now: its path, label, the label its folder gives, and who edited it."""
    with reading(folder.catalog) as catalog:
        snapshot = catalog.snapshot()
        if snapshot is None:
            raise SimimgError(f"index '{folder.name}' has no published version to export")
        root = Path(catalog.get_meta("data_root", "."))
        corrections = read_corrections(catalog)
    edited = {e.path: e.source for e in corrections.edits if e.action == "set"}
    original = folder_labels(snapshot.paths, root)
    rows = [
        {"path": path, "label": label, "folder_label": original[path], "edited_by": edited.get(path)}
        for path, label in zip(snapshot.paths, snapshot.labels)
    ]
    return rows, root


def _write_tree(rows: list[dict[str, Any]], root: Path, out: Path, move: bool) -> None:
    """Copy (or move, logging each) every image to OUT/[split/]LABEL/NAME; a taken name gets -2, -3, ..."""
    if out.exists() and any(out.iterdir()):
        raise SimimgError(f"{out} is not empty: export into a new folder")
    taken: set[Path] = set()
    out.mkdir(parents=True, exist_ok=True)
    with (out / MOVES_LOG).open("a") if move else contextlib.nullcontext() as moves:
        for row in rows:
            source = root / row["path"]
            target = _free(out / _target(row), taken)
            target.parent.mkdir(parents=True, exist_ok=True)
            if moves is None:
                shutil.copy2(source, target)
                continue
            moves.write(json.dumps({"from": str(source), "to": str(target)}) + "\n")  # logged before it moves
            moves.flush()
            shutil.move(source, target)


def _target(row: dict[str, Any]) -> Path:
    parts = Path(row["path"]).parts
    split = parts[0] if len(parts) > 2 and parts[0] in SPLIT_NAMES else None
    label = row["label"] if row["label"] is not None else "unlabeled"
    return Path(*filter(None, [split, label, parts[-1]]))


def _free(path: Path, taken: set[Path]) -> Path:
    candidate, n = path, 1
    while candidate in taken:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    taken.add(candidate)
    return candidate


def _write_table(rows: list[dict[str, Any]], out: Path, format: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in COLUMNS]))
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, out)
        return
    atomic_write_bytes(out, _csv_text(rows).encode())


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
