"""Checksums of what an index folder holds, taken as each piece is written, so `simimg verify` can tell a damaged
file (a bad disk, a partial copy, a stray edit) from a good one, and name the images it affects.

CRC-32 (zlib): it catches torn writes and flipped bits, which is what is asked of it here, at 2-4 GB/s on this
2-core box (2 us per 4 KB vector row, whose forward takes ~10 ms). It is no defence against a forged file.

- a vector row: its bytes as appended to its shard (`row_checksums`), in the catalog beside the row's location;
- a FAISS file (and its list file): the whole file, in the catalog beside the version that serves it;
- a model folder: every file in it, in `checksums.json`, written inside the folder before it is published.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from simimg.store.layout import IndexFolder

MANIFEST = "checksums.json"
BLOCK = 1 << 22


def row_checksums(vectors: np.ndarray) -> list[int]:
    """The CRC-32 of each row's float32 bytes, as a shard stores them."""
    rows = np.ascontiguousarray(vectors, np.float32)
    return [zlib.crc32(row.data) for row in rows]


def file_checksum(path: Path) -> int | None:
    """The CRC-32 of a whole file, read in blocks; None when it cannot be read."""
    crc = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(BLOCK):
                crc = zlib.crc32(block, crc)
    except OSError:
        return None
    return crc


def write_manifest(folder: Path) -> None:
    """`checksums.json` in `folder`: every file's checksum; call before the folder is published."""
    sums = {p.name: file_checksum(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(sums, indent=1))


def manifest_problems(folder: Path) -> list[str] | None:
    """The files of `folder` that no longer match its manifest (missing ones included); None: it has no manifest
    (a folder made before checksums)."""
    try:
        sums = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return [MANIFEST]
    return [name for name, crc in sums.items() if file_checksum(folder / name) != crc]


def version_checksums(folder: IndexFolder, version: int) -> tuple[int | None, int | None]:
    """The checksums of a version's FAISS file and of its list file (None: it keeps its lists inside). Readers
    check the FAISS file as they open a version; the list file, which may be larger than RAM, `simimg verify`."""
    lists = folder.lists(version)
    return file_checksum(folder.faiss(version)), file_checksum(lists) if lists.exists() else None
