"""Query a built index: an image in, its predicted class and nearest gallery images out.

`SearchService` loads the model and index once and answers many queries; it notices a newly published index
version on the next query and switches to it whole, so a reader never sees half of a re-index.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simimg.catalog import Catalog, Snapshot
from simimg.device import resolve_device
from simimg.embed import infer, prepare_net
from simimg.errors import BadImageError, SimimgError
from simimg.images import load_image, to_rgb
from simimg.faiss_index import Searcher, load_index, make_searcher
from simimg.layout import IndexFolder
from simimg.model import LoadedModel, load_bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbor:
    path: str
    label: str | None
    score: float


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float
    top: list[dict]


@dataclass(frozen=True)
class QueryResult:
    query: str
    prediction: Prediction | None
    neighbors: list[Neighbor]

    def to_dict(self) -> dict:
        return asdict(self)


def predict(logits: torch.Tensor, classes: tuple[str, ...], top: int = 5) -> Prediction:
    """Softmax over one row of logits; the top classes, most probable first."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, order = probs.topk(min(top, len(classes)))
    ranked = [{"label": classes[i], "probability": float(p)} for p, i in zip(values.tolist(), order.tolist())]
    return Prediction(ranked[0]["label"], ranked[0]["probability"], ranked)


def neighbors_from(scores: np.ndarray, ids: np.ndarray, snapshot: Snapshot, min_score: float | None) -> list[Neighbor]:
    """Map FAISS ids back to catalog rows, dropping padding (-1) and scores under `min_score`."""
    position = np.searchsorted(snapshot.ids, ids)
    found = []
    for score, row_id, pos in zip(scores.tolist(), ids.tolist(), position.tolist()):
        if row_id < 0 or pos >= len(snapshot.ids) or snapshot.ids[pos] != row_id:
            continue
        score = round(float(score), 6)  # compared as shown, so a score a user copies passes its own filter
        if min_score is not None and score < min_score:
            continue
        found.append(Neighbor(snapshot.paths[pos], snapshot.labels[pos], score))
    return found


@dataclass
class _Loaded:
    snapshot: Snapshot
    searcher: Searcher
    label_ids: dict[str | None, np.ndarray]


class SearchService:
    """A warm model and index for one name; safe to share between threads (the app's sessions)."""

    def __init__(self, home: str | Path | None, name: str, device: str = "auto") -> None:
        self.paths = IndexFolder.of(home, name)
        if not self.paths.catalog.exists():
            raise SimimgError(f"no index named '{name}' in {self.paths.root.parent}: build it with "
                              f"`simimg index DATA_DIR --name {name}`")
        self.device = resolve_device(device)
        self.model: LoadedModel = load_bundle(self.paths.root)
        prepare_net(self.model.net, self.device)
        self.catalog = Catalog(self.paths.catalog, readonly=True)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self.refresh()

    @property
    def snapshot(self) -> Snapshot:
        return self._loaded.snapshot

    @property
    def data_root(self) -> Path:
        return Path(self.catalog.get_meta("data_root", "."))

    def refresh(self) -> bool:
        """Switch to the newest published version if there is one; True when it switched."""
        with self._lock:
            version = self.catalog.version
            if self._loaded is not None and self._loaded.snapshot.version == version:
                return False
            self._loaded = self._load_latest()
            return True

    def _load_latest(self) -> _Loaded:
        for _ in range(5):  # a writer may publish, and prune an old FAISS file, while we read
            snapshot = self.catalog.snapshot()
            if snapshot is None:
                raise SimimgError(f"index '{self.paths.name}' has no finished version yet: run `simimg index`")
            if snapshot.fingerprint != self.model.bundle.fingerprint:
                raise SimimgError(f"index '{self.paths.name}' was built with another model than the one in its folder "
                                  f"(index {snapshot.fingerprint}, model {self.model.bundle.fingerprint}); "
                                  f"re-run `simimg index` on it to rebuild it")
            try:
                index = load_index(self.paths.faiss(snapshot.version))
            except SimimgError:
                if self.catalog.version == snapshot.version:
                    raise
                continue
            if index.ntotal != len(snapshot.ids):
                raise SimimgError(f"index '{self.paths.name}' is inconsistent (FAISS {index.ntotal} vectors, "
                                  f"catalog {len(snapshot.ids)}); re-run `simimg index` to repair it")
            labels = np.array(snapshot.labels, dtype=object)
            label_ids = {lab: snapshot.ids[labels == lab] for lab in set(snapshot.labels)}
            return _Loaded(snapshot, make_searcher(index, self.device), label_ids)
        raise SimimgError(f"index '{self.paths.name}' kept changing while loading; try again")

    def query_file(self, path: str | Path, k: int = 10, label: str | None = None,
                   min_score: float | None = None) -> QueryResult:
        try:
            image = self.load(path)
        except BadImageError as err:
            raise BadImageError(f"cannot query {path}: {err.reason}") from None
        return self.query(image, k, label, min_score, query=str(path))

    @property
    def draft_size(self) -> int:
        """Decode queries as `simimg index` decoded the gallery (JPEG draft included): an indexed file scores 1.0."""
        return self.model.bundle.preprocess.resize_size

    def load(self, path: str | Path) -> Image.Image:
        return load_image(path, draft_size=self.draft_size)

    def query(self, image: Image.Image, k: int = 10, label: str | None = None, min_score: float | None = None,
              query: str = "") -> QueryResult:
        """Classify (when the model has a head) and find the k most similar gallery images; any PIL mode is accepted."""
        self.refresh()
        loaded = self._loaded
        preprocess = self.model.bundle.preprocess
        batch = preprocess.to_uint8(to_rgb(image)).unsqueeze(0)
        embedding, logits = infer(self.model.net, batch, preprocess, self.device,
                                  with_logits=self.model.bundle.has_classifier)
        allowed = None
        if label is not None:
            allowed = loaded.label_ids.get(label, np.empty(0, np.int64))
            if not len(allowed):
                return QueryResult(query, _prediction(logits, self.model), [])
        scores, ids = loaded.searcher.search(embedding.cpu().numpy(), k, allowed)
        return QueryResult(query, _prediction(logits, self.model), neighbors_from(scores[0], ids[0], loaded.snapshot, min_score))

    def info(self) -> dict:
        b = self.model.bundle
        snap = self.snapshot
        counts: dict[str, int] = {}
        for lab in snap.labels:
            counts[lab or ""] = counts.get(lab or "", 0) + 1
        return {"name": self.paths.name, "total": len(snap.ids), "labels": dict(sorted(counts.items())),
                "arch": b.arch, "dim": b.info.get("embedding_dim"), "fingerprint": b.fingerprint,
                "source": b.source, "image_size": b.preprocess.crop_size, "classifier": b.has_classifier,
                "classes": list(b.classes), "version": snap.version, "index_kind": snap.index_kind,
                "data_root": str(self.data_root)}


def _prediction(logits: torch.Tensor | None, model: LoadedModel) -> Prediction | None:
    return None if logits is None else predict(logits[0].cpu(), model.bundle.classes)
