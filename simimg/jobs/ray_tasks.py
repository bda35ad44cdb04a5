"""The ray engine's stages that run in Ray's CPU workers (decode, write a shard), and where a run keeps its files.

Nothing here imports torch, torchvision or faiss: Ray imports this module in every worker process that runs a decode
or a write task, and those processes never run a model (the embedding actors import jobs/engine_ray.py). Decoding
is the local engine's: the same read-once-and-hash (dataset/images.read_and_decode) and the same pixels
(Preprocess.to_array, which is Preprocess.to_uint8 without torch).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from simimg.dataset.images import read_and_decode
from simimg.dataset.preprocess import Preprocess
from simimg.errors import SimimgError
from simimg.fsutil import size_and_mtime

if TYPE_CHECKING:
    from simimg.jobs.index_config import ToEmbed

SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".parquet"


def decode_files(batch: dict[str, np.ndarray], root: str, preprocess: Preprocess) -> dict[str, np.ndarray]:
    """Stat, read once, hash and decode each file as the local engine does; a bad file keeps its reason."""
    n, crop = len(batch["path"]), preprocess.crop_size
    pixels = np.zeros((n, 3, crop, crop), np.uint8)
    stats = np.full((n, 2), -1, np.int64)
    hashes, reasons = np.full(n, "", object), np.full(n, "", object)
    for i, path in enumerate(batch["path"]):
        file = Path(root, path)
        stats[i] = size_and_mtime(file) or (-1, -1)  # before the bytes are read: a later change shows as a new mtime
        array, text = read_and_decode(file, preprocess.to_array, preprocess.resize_size)
        if array is None:
            reasons[i] = text
        else:
            pixels[i], hashes[i] = array, text
    return {
        "path": batch["path"],
        "label": batch["label"],
        "size": stats[:, 0],
        "mtime_ns": stats[:, 1],
        "sha256": hashes,
        "reason": reasons,
        "pixels": pixels,
    }


def write_shard(batch: dict[str, np.ndarray], run: str) -> dict[str, np.ndarray]:
    """One Parquet shard of results; sha256 and vector (and logits) are null for a skipped file, reason for an
    embedded one."""
    good = batch["reason"] == ""
    columns = {
        "path": pa.array(list(batch["path"]), pa.string()),
        "label": pa.array(list(batch["label"]), pa.string()),
        "size": pa.array(batch["size"], pa.int64()),
        "mtime_ns": pa.array(batch["mtime_ns"], pa.int64()),
        "sha256": pa.array([h if ok else None for h, ok in zip(batch["sha256"], good)], pa.string()),
        "reason": pa.array([None if ok else r for r, ok in zip(batch["reason"], good)], pa.string()),
    }
    for name in ("vector", "logits"):
        if name in batch:
            rows = batch[name]
            columns[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(rows.reshape(-1)), rows.shape[1], mask=pa.array(~good)
            )
    table = pa.table(columns)
    return {"shard": np.array([RunFolder(run).write(table)]), "rows": np.array([table.num_rows])}


# --- where runs keep their files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardStore:
    """The runs of one index under a location: a local folder, or any URI pyarrow reaches (s3://, gs://)."""

    location: str
    key: str

    @classmethod
    def at(cls, location: str | Path, key: str) -> ShardStore:
        location = str(location)
        return cls(location if "://" in location else str(Path(location).expanduser().resolve()), key)

    def run(self, run: str) -> RunFolder:
        return RunFolder(f"{self.location.rstrip('/')}/{self.key}-{run}")

    def clear(self) -> None:
        """Delete every run of this index: called once a version is published, which makes them all stale."""
        fs, base = _filesystem(self.location)
        for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith(f"{self.key}-"):
                fs.delete_dir(info.path)


@dataclass(frozen=True)
class RunFolder:
    """One run's manifest and shards, at `uri`."""

    uri: str

    def write_manifest(self, work: ToEmbed) -> str:
        """The work as JSON lines (path, label); returns its URI for `ray.data.read_json`."""
        lines = "".join(json.dumps({"path": item.path, "label": item.label}) + "\n" for item in work)
        return self._put("manifest.jsonl", lambda out: out.write(lines.encode()))

    def write(self, table: pa.Table) -> str:
        """A new shard, written aside then moved into place, so a listed shard is always whole; returns its name."""
        name = f"{SHARD_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}"
        self._put(f"shards/{name}", lambda out: pq.write_table(table, out))
        return name

    def shards(self) -> list[str]:
        fs, path = _filesystem(self.uri)
        found = fs.get_file_info(pafs.FileSelector(f"{path}/shards", allow_not_found=True))
        return sorted(
            f.base_name for f in found if f.base_name.startswith(SHARD_PREFIX) and f.base_name.endswith(SHARD_SUFFIX)
        )

    def read(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = _filesystem(self.uri)
        try:
            return pq.read_table(f"{path}/shards/{shard}", columns=columns, filesystem=fs)
        except FileNotFoundError:
            raise SimimgError(
                f"shard {shard} was written where this process cannot read it ({self.uri}): on a "
                "cluster of several machines, pass --ray-shards a location every node reaches "
                "(s3://..., gs://..., or a shared folder)"
            ) from None

    def _put(self, name: str, write: Callable[[pa.NativeFile], object]) -> str:
        fs, path = _filesystem(self.uri)
        final = f"{path}/{name}"
        parent, base = final.rsplit("/", 1)
        fs.create_dir(parent, recursive=True)
        aside = f"{parent}/.{base}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(aside) as out:
            write(out)
        fs.move(aside, final)
        return f"{self.uri}/{name}"


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    found: tuple[pafs.FileSystem, str] = pafs.FileSystem.from_uri(uri)
    return found
