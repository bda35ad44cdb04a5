"""`simimg upgrade`: convert an index written by simimg 0.1 to this layout, in place, keeping every vector.

simimg 0.1 kept one model bundle at the index folder's root and each image's vector inside SQLite. Now models live
under models/<fingerprint>/ and vectors in shard files keyed by embedding. The conversion runs under the writer
lock; the catalog changes in one transaction, so an interrupted upgrade leaves the old layout, to be run again.
"""

from __future__ import annotations

import json
import logging
import sqlite3

import numpy as np
from safetensors.torch import load_file

from simimg.dataset.preprocess import Preprocess
from simimg.errors import SimimgError
from simimg.models.bundle import BUNDLE_JSON, BUNDLE_WEIGHTS, ModelBundle
from simimg.models.net import describe, embedding_fingerprint, net_from_state
from simimg.store.catalog import SCHEMA, SCHEMA_VERSION, Catalog, read_only_uri
from simimg.store.layout import IndexFolder
from simimg.store.lock import writer_lock
from simimg.store.model_store import publish_model

log = logging.getLogger(__name__)

OLD_EXTRAS = ("curves.png", "confusion.png", "train_job.json")
CHUNK = 4096


def needs_upgrade(folder: IndexFolder) -> bool:
    """An index folder in simimg 0.1's layout: a model.json at its root, or a catalog holding vectors."""
    if (folder.root / BUNDLE_JSON).is_file():
        return True
    if not folder.catalog.is_file():
        return False
    db = sqlite3.connect(read_only_uri(folder.catalog), uri=True)
    try:
        columns = [row[1] for row in db.execute("PRAGMA table_info(images)")]
    finally:
        db.close()
    return "vector" in columns


def upgrade(folder: IndexFolder) -> bool:
    """Convert the index in place; False when it was already in this layout."""
    with writer_lock(folder.lock, f"index '{folder.name}'"):
        if not needs_upgrade(folder):
            return False
        bundle = _keep_root_model(folder)
        _convert_catalog(folder, bundle)
        for name in (BUNDLE_JSON, BUNDLE_WEIGHTS, *OLD_EXTRAS):
            (folder.root / name).unlink(missing_ok=True)
    log.info("upgraded index '%s' to this simimg's layout (model %s)", folder.name, bundle.fingerprint)
    return True


def _keep_root_model(folder: IndexFolder) -> ModelBundle:
    """The 0.1 bundle (whose fingerprint named its trunk) as a kept model of this layout."""
    try:
        old = json.loads((folder.root / BUNDLE_JSON).read_text())
        state = load_file(str(folder.root / BUNDLE_WEIGHTS))
    except (OSError, ValueError) as err:
        raise SimimgError(
            f"cannot upgrade '{folder.name}': its simimg 0.1 model is unreadable ({err}); delete the "
            "folder and build the index again"
        ) from None
    net = net_from_state(old["arch"], len(old["classes"]), False, state, folder.root)
    preprocess = Preprocess.from_dict(old["preprocess"])
    if embedding_fingerprint(net, old["arch"], preprocess) != old["fingerprint"]:
        raise SimimgError(f"cannot upgrade '{folder.name}': its model's weights do not match its model.json")
    known = {"format", "arch", "classes", "preprocess", "source", "fingerprint", "embedding_dim"}
    kind = "fine-tuned" if "training" in old else "pretrained"
    bundle = describe(
        net,
        old["arch"],
        tuple(old["classes"]),
        preprocess,
        old["source"],
        kind,
        **{k: v for k, v in old.items() if k not in known},
    )
    extras = {name: (folder.root / name).read_bytes() for name in OLD_EXTRAS if (folder.root / name).is_file()}
    publish_model(folder, net, bundle, extras)
    return bundle


def _convert_catalog(folder: IndexFolder, bundle: ModelBundle) -> None:
    """Vectors out of SQLite into shards, versions renamed to the model that answers for them; one transaction."""
    if not folder.catalog.is_file():
        return
    catalog = Catalog(folder.catalog, legacy=True)
    try:
        with catalog.transaction():
            published = catalog.db.execute("SELECT version, fingerprint FROM versions ORDER BY version DESC").fetchone()
            pending = catalog.get_meta("pending_fingerprint") or (published[1] if published else bundle.embedding)
            catalog.db.execute("ALTER TABLE versions RENAME TO versions_v1")
            for statement in SCHEMA.split(";"):  # executescript would commit the transaction first
                catalog.db.execute(statement)
            _move_vectors(
                catalog, published[0] if published else 0, published[1] if published else pending, pending, bundle.dim
            )
            catalog.db.execute(
                "INSERT INTO versions SELECT version, ?, fingerprint, count, index_kind, created "
                "FROM versions_v1 WHERE fingerprint = ?",
                (bundle.fingerprint, bundle.embedding),
            )
            catalog.db.execute("DROP TABLE versions_v1")
            catalog.db.execute("ALTER TABLE images DROP COLUMN vector")
            catalog.db.execute("DELETE FROM meta WHERE key = 'pending_fingerprint'")
            catalog.set_meta(schema=SCHEMA_VERSION, pending_model=bundle.fingerprint)
    finally:
        catalog.close()
    writer = Catalog(folder.catalog)
    writer.clean_files()
    writer.close()


def _move_vectors(catalog: Catalog, published: int, published_embedding: str, pending_embedding: str, dim: int) -> None:
    """Each row's vector goes under the embedding that made it: the published version's, or the pending run's."""
    for embedding, where in ((published_embedding, "added <= ?"), (pending_embedding, "added > ?")):
        last = 0
        while True:
            rows = catalog.db.execute(
                f"SELECT id, vector FROM images WHERE {where} AND id > ? ORDER BY id LIMIT ?", (published, last, CHUNK)
            ).fetchall()
            if not rows:
                break
            vectors = np.stack([np.frombuffer(r[1], np.float32) for r in rows]).reshape(len(rows), dim)
            catalog.add_vectors(embedding, [r[0] for r in rows], vectors)
            last = rows[-1][0]
