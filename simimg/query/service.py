"""Query a built index: images in, their predicted class and nearest gallery images out.

`SearchService` holds one published version warm: its catalog snapshot, its FAISS index and the model that
version names. It notices a newly published version on the next query and loads it beside the current one, then
switches whole; queries meanwhile keep answering from the current version, so none waits or fails.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from simimg.analysis.neighbours import near_duplicates, project_2d, sample_positions, score_landmarks
from simimg.dataset.images import ImageInput, load_image, read_inputs, to_rgb
from simimg.errors import BadImageError, SimimgError
from simimg.models.bundle import ModelBundle
from simimg.models.device import Compute, resolve_compute
from simimg.models.encoder import Trunk, infer, prepare_net, ranked_classes
from simimg.models.net import LoadedModel
from simimg.store.ann import VectorSearcher
from simimg.store.catalog import Catalog, Snapshot, reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model, no_classifier
from simimg.store.precision import kept_int8, precision_info
from simimg.store.served import open_searcher, positions_of, whole_snapshot
from simimg.store.summary import summarize

if TYPE_CHECKING:
    from simimg.models.heatmaps import Explanation

log = logging.getLogger(__name__)

LOAD_ATTEMPTS = 5
QUERY_BATCH = 32
# A result at this cosine or above is the query itself (or a copy of it): the cosine is at its maximum there, so
# its gradient, and any map of it, vanishes. Random-init features put distinct images at 0.97-0.998; scores are
# rounded to 6 decimals, and a gallery file queried with itself reads 1.0.
SELF_MATCH_SCORE = 0.9999


@dataclass(frozen=True)
class Neighbor:
    path: str
    label: str | None
    score: float


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float
    top: list[dict[str, Any]]


@dataclass(frozen=True)
class QueryResult:
    query: str
    prediction: Prediction | None
    neighbors: list[Neighbor]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["error"] is None:
            del d["error"]
        return d


@dataclass(frozen=True)
class BrowsePage:
    """One page of the images an index holds: (path, label) pairs in catalog order."""

    items: list[tuple[str, str | None]]
    total: int  # images of the chosen label (or all)
    page: int
    pages: int


@dataclass(frozen=True)
class DuplicatePair:
    a: str
    b: str
    score: float


def predict(logits: torch.Tensor, classes: tuple[str, ...], top: int = 5) -> Prediction:
    """Softmax over one row of logits; the top classes, most probable first."""
    values, order = ranked_classes(logits, top)
    ranked = [{"label": classes[i], "probability": float(p)} for p, i in zip(values.tolist(), order.tolist())]
    return Prediction(ranked[0]["label"], ranked[0]["probability"], ranked)


def neighbors_from(scores: np.ndarray, ids: np.ndarray, snapshot: Snapshot, min_score: float | None) -> list[Neighbor]:
    """Map FAISS ids back to catalog rows, dropping padding (-1) and scores under `min_score`."""
    found = []
    for score, pos in zip(scores.tolist(), positions_of(snapshot, ids).tolist()):
        if pos < 0:
            continue
        score = round(float(score), 6)  # compared as shown, so a score a user copies passes its own filter
        if min_score is not None and score < min_score:
            continue
        found.append(Neighbor(snapshot.paths[pos], snapshot.labels[pos], score))
    return found


@dataclass(frozen=True)
class ServedVersion:
    """Everything one published version needs to answer queries; replaced whole, never changed."""

    snapshot: Snapshot
    model: LoadedModel
    trunk: Trunk  # the model's embedding function, prepared once for this service's device and precision
    searcher: VectorSearcher
    label_ids: dict[str | None, np.ndarray]
    data_root: Path  # the folder the version's catalog paths are relative to
    compute: Compute | None = None  # where and in what precision `trunk` runs (int8 when the index's gate passed)
    precision: dict[str, Any] = field(default_factory=dict)  # `precision` and `int8_gate` as recorded (precision.py)


class SearchService:
    """A warm model and index for one name; safe to share between threads (the app's sessions, a server)."""

    def __init__(self, home: str | Path | None, name: str, device: str = "auto", precision: str = "auto") -> None:
        self.folder = IndexFolder.of(home, name)
        if not self.folder.catalog.exists():
            raise SimimgError(
                f"no index named '{name}' in {self.folder.root.parent}: build it with "
                f"`simimg index DATA_DIR --name {name}`"
            )
        self.compute = resolve_compute(device, precision)
        self.device = self.compute.device
        self.catalog = Catalog(self.folder.catalog, readonly=True)
        self._refreshing = threading.Lock()  # one loader at a time; it also guards the catalog connection
        self._served: ServedVersion | None = None
        self._passed_over: int | None = None  # a newer version not served: its FAISS file fails its checksum
        self.refresh()

    @property
    def served(self) -> ServedVersion:
        served = self._served
        assert served is not None, "__init__ loads a version (refresh) or raises"
        return served

    @property
    def snapshot(self) -> Snapshot:
        return self.served.snapshot

    @property
    def model(self) -> LoadedModel:
        return self.served.model

    @property
    def data_root(self) -> Path:
        """Read with the version when it was loaded: a page never waits here while another thread loads a newer
        version (the app's pages ask for it often; waiting on the loader stalled a search behind a model load)."""
        return self.served.data_root

    def refresh(self, wait: bool = True) -> bool:
        """Switch to the newest published version if there is one; True when it switched.

        Without `wait`, a refresh already under way in another thread is left to finish while this caller goes
        on with the version it has.
        """
        if not self._refreshing.acquire(blocking=wait or self._served is None):
            return False
        try:
            if self._served is not None and self.catalog.version in (self._served.snapshot.version, self._passed_over):
                return False
            self._served = self._load_latest(self._served)
            return True
        finally:
            self._refreshing.release()

    def _load_latest(self, current: ServedVersion | None) -> ServedVersion:
        for _ in range(LOAD_ATTEMPTS):  # a writer may publish, and prune old files, while we read
            latest = self.catalog.snapshot()
            if latest is None:
                raise SimimgError(f"index '{self.folder.name}' has no finished version yet: run `simimg index`")
            try:
                snapshot = whole_snapshot(self.folder, self.catalog, latest)
                self._passed_over = latest.version if snapshot is not latest else None
                model, trunk, compute = self._model_for(snapshot.model, current)
                searcher = open_searcher(self.folder, self.catalog, snapshot, self.device)
            except SimimgError:
                if self.catalog.version == latest.version:
                    raise
                continue
            labels = np.array(snapshot.labels, dtype=object)
            label_ids = {lab: snapshot.ids[labels == lab] for lab in set(snapshot.labels)}
            log.info("serving version %d of '%s' with model %s", snapshot.version, self.folder.name, snapshot.model)
            data_root = Path(self.catalog.get_meta("data_root", "."))
            recorded = precision_info(self.catalog, snapshot.model)
            return ServedVersion(snapshot, model, trunk, searcher, label_ids, data_root, compute, recorded)
        raise SimimgError(f"index '{self.folder.name}' kept changing while loading; try again")

    def _model_for(self, fingerprint: str, current: ServedVersion | None) -> tuple[LoadedModel, Trunk, Compute]:
        """The model, its embedding function and the compute it runs on; the current ones when neither the model
        nor its precision changed (a `simimg index --precision int8` since may have passed its gate)."""
        same = current is not None and current.model.bundle.fingerprint == fingerprint
        model = current.model if current is not None and same else load_model(self.folder, fingerprint)
        compute, record = kept_int8(self.compute, self.catalog, model)
        if current is not None and same and current.compute == compute:
            return current.model, current.trunk, compute
        if self.compute.int8 == "asked" and compute.precision != "int8":
            log.warning(
                "int8 asked for, but index '%s' has %s for model %s: serving in %s",
                self.folder.name,
                "no passed int8 gate" if record is None or not record.get("passed") else "no kept int8 trunk",
                fingerprint,
                compute.precision,
            )
        return model, prepare_net(model.net, compute, model.bundle.preprocess), compute

    # --- the public API: images (paths or PIL) in ---------------------------------------------------
    def search(
        self,
        images: ImageInput | Sequence[ImageInput],
        k: int = 10,
        label: str | None = None,
        min_score: float | None = None,
    ) -> QueryResult | list[QueryResult]:
        """Nearest gallery images (and the predicted class, when the model has one) for a path, a PIL image, or
        a list of them; a list gets a list back, in order. In a list, an unreadable file gets a result with
        `error` set and the others are answered; a single unreadable file raises BadImageError."""
        inputs, single = read_inputs(images, self.draft_size)
        results: list[QueryResult | None] = [None] * len(inputs)
        decoded: list[tuple[int, Image.Image, str]] = []
        for i, item in enumerate(inputs):
            if item.image is not None:
                decoded.append((i, item.image, item.name))
            elif single:
                raise BadImageError(f"cannot query {item.name}: {item.reason}")
            else:
                results[i] = QueryResult(item.name, None, [], error=item.reason)
        for start in range(0, len(decoded), QUERY_BATCH):
            chunk = decoded[start : start + QUERY_BATCH]
            answers = self.query_batch([im for _, im, _ in chunk], k, label, min_score, [n for _, _, n in chunk])
            for (i, _, _), answer in zip(chunk, answers):
                results[i] = answer
        answered = [r for r in results if r is not None]
        assert len(answered) == len(results), "every image has its answer or its error"
        return answered[0] if single else answered

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction | None]:
        """The predicted class of each image (None for an unreadable one in a list); needs a trained classifier."""
        if not self.model.bundle.has_classifier:
            raise self._no_classifier()
        found = self.search(images, k=1)
        if isinstance(found, list):
            return [r.prediction for r in found]
        if found.prediction is None:  # a version without a classifier was published since the check above
            raise self._no_classifier()
        return found.prediction

    def _no_classifier(self) -> SimimgError:
        return no_classifier(self.folder)

    # --- decoded images in -------------------------------------------------------------------------
    @property
    def draft_size(self) -> int:
        """Decode queries as `simimg index` decoded the gallery (JPEG draft included): an indexed file scores 1.0."""
        return self.model.bundle.preprocess.resize_size

    def load(self, path: str | Path) -> Image.Image:
        return load_image(path, draft_size=self.draft_size)

    def query_file(
        self, path: str | Path, k: int = 10, label: str | None = None, min_score: float | None = None
    ) -> QueryResult:
        try:
            image = self.load(path)
        except BadImageError as err:
            raise BadImageError(f"cannot query {path}: {err.reason}") from None
        return self.query(image, k, label, min_score, query=str(path))

    def query(
        self, image: Image.Image, k: int = 10, label: str | None = None, min_score: float | None = None, query: str = ""
    ) -> QueryResult:
        """Classify (when the model has a head) and find the k most similar gallery images; any PIL mode is accepted."""
        return self.query_batch([image], k, label, min_score, [query])[0]

    def query_batch(
        self,
        images: Sequence[Image.Image],
        k: int = 10,
        label: str | None = None,
        min_score: float | None = None,
        names: Sequence[str] | None = None,
    ) -> list[QueryResult]:
        """Many decoded images in one forward pass and one search; the HTTP server's micro-batches come here."""
        self.refresh(wait=False)
        served = self.served
        embeddings, logits = self._embed(served, images)
        names = list(names or [""] * len(images))
        predictions = [_prediction(logits, i, served.model) for i in range(len(images))]
        allowed = None
        if label is not None:
            allowed = served.label_ids.get(label, np.empty(0, np.int64))
            if not len(allowed):
                return [QueryResult(n, p, []) for n, p in zip(names, predictions)]
        scores, ids = served.searcher.search(embeddings, k, allowed)
        return [
            QueryResult(n, p, neighbors_from(scores[i], ids[i], served.snapshot, min_score))
            for i, (n, p) in enumerate(zip(names, predictions))
        ]

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit-length embeddings (N x D float32) of decoded images, with the served version's model."""
        return self.embed_batch(images)[0]

    def embed_batch(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, ModelBundle]:
        """Embeddings and the model that made them, read from one served version even while a new one arrives."""
        self.refresh(wait=False)
        served = self.served
        return self._embed(served, images)[0], served.model.bundle

    def _embed(self, served: ServedVersion, images: Sequence[Image.Image]) -> tuple[np.ndarray, torch.Tensor | None]:
        preprocess = served.model.bundle.preprocess
        batch = torch.stack([preprocess.to_uint8(to_rgb(image)) for image in images])
        embeddings, logits = infer(
            served.model.net,
            batch,
            preprocess,
            self.compute,
            with_logits=served.model.bundle.has_classifier,
            trunk=served.trunk,
        )
        return embeddings.cpu().numpy(), None if logits is None else logits.cpu()

    def explain(
        self, image: ImageInput, neighbor: ImageInput | None = None, label: str | None = None, method: str = "gradcam"
    ) -> Explanation:
        """Where the served model looks in `image`: at the predicted class (or `label`), or, given a `neighbor`
        (a gallery path, any file or a PIL image), at what makes the two similar. The map has the decoded image's
        size; see simimg/models/heatmaps.py."""
        from simimg.models.heatmaps import explain_class, explain_similarity

        self.refresh(wait=False)
        model = self.served.model
        seen = self._decoded(image)
        if neighbor is None:
            return explain_class(model, seen, label, method, self.device)
        name = "<image>" if isinstance(neighbor, Image.Image) else str(neighbor)
        return explain_similarity(model, seen, self._decoded(neighbor), name, method, self.device)

    def explain_targets(self, result: QueryResult, query: str | Path | None = None) -> list[Neighbor]:
        """The results whose similarity to the query can be explained: all but the query itself, which is its
        own gallery file `query` (a "Find similar" query) or any result at SELF_MATCH_SCORE or above (a copy)."""
        own = None if query is None else self.gallery_file(query).resolve()
        return [
            n
            for n in result.neighbors
            if n.score < SELF_MATCH_SCORE and (own is None or self.gallery_file(n.path).resolve() != own)
        ]

    def _decoded(self, image: ImageInput) -> Image.Image:
        """A PIL image as it is; a path (a gallery path is relative to the indexed folder) decoded as queries are."""
        (item,), _ = read_inputs(image, self.draft_size, locate=self.gallery_file)
        if item.image is None:
            raise BadImageError(f"cannot explain {item.name}: {item.reason}")
        return item.image

    def gallery_file(self, path: str | Path) -> Path:
        """`path` itself, or the gallery file it names relative to the indexed folder (as results give them)."""
        path = Path(path)
        if not path.is_absolute() and not path.exists() and (self.data_root / path).exists():
            return self.data_root / path
        return path

    # --- the collection as a whole: what the app's Browse and Inspect pages show ---------------------------
    def browse(self, label: str | None = None, page: int = 1, per_page: int = 24) -> BrowsePage:
        """Page `page` (from 1) of the served images, all of them or those labelled `label` ("" for none)."""
        snapshot = self.snapshot
        rows = [(p, lab) for p, lab in zip(snapshot.paths, snapshot.labels) if label is None or (lab or "") == label]
        pages = max(1, math.ceil(len(rows) / per_page))
        page = min(max(page, 1), pages)
        first = (page - 1) * per_page
        return BrowsePage(rows[first : first + per_page], len(rows), page, pages)

    def vectors(self) -> tuple[Snapshot, np.ndarray]:
        """The published version's rows and their stored vectors, in one consistent read (no model involved)."""
        with reading(self.folder.catalog) as catalog:
            read = catalog.snapshot_with_vectors()
        if read is None:
            raise SimimgError(f"index '{self.folder.name}' has no finished version yet: run `simimg index`")
        return read

    def near_duplicates(
        self, threshold: float | None = None, limit: int = 500, sample: int = 20_000
    ) -> tuple[list[DuplicatePair], float]:
        """Pairs of near-identical images (up to `sample` images looked at), most similar first; and the cosine
        threshold used: by default the collection's own, the rule the audit applies (neighbours.near_duplicates).
        Exact copies (same content) pair at their cosine too."""
        snapshot, vectors = self.vectors()
        keep = sample_positions(len(snapshot.paths), sample)
        if threshold is None:  # the rule's threshold comes from distinct contents, as the audit computes it
            threshold = near_duplicates(vectors[keep], [snapshot.sha256[i] for i in keep], limit=0)[1]
        pairs, used = near_duplicates(vectors[keep], threshold=threshold, limit=limit)
        found = [DuplicatePair(snapshot.paths[keep[p.a]], snapshot.paths[keep[p.b]], p.score) for p in pairs]
        return found, used

    def score_landmarks(self) -> dict[str, float]:
        """What a score means in this index: the median cosine of an image's nearest neighbour, its 10th, and a
        random pair (neighbours.score_landmarks)."""
        return score_landmarks(self.vectors()[1])

    def map_2d(self, method: str = "pca", limit: int = 1000) -> dict[str, list[Any]]:
        """Columns x, y, label, path of up to `limit` served images (a fixed sample) projected to 2-D."""
        snapshot, vectors = self.vectors()
        keep = sample_positions(len(snapshot.paths), limit)
        xy = project_2d(vectors[keep], method)
        return {
            "x": xy[:, 0].tolist(),
            "y": xy[:, 1].tolist(),
            "label": [snapshot.labels[i] or "(none)" for i in keep],
            "path": [snapshot.paths[i] for i in keep],
        }

    def info(self) -> dict[str, Any]:
        """What the served version holds (store/summary.py: the same dict as `simimg.index_info`) and where the
        model runs."""
        served = self.served
        summary = summarize(self.folder.name, served.snapshot, served.model.bundle, served.data_root)
        return {**summary, **served.precision, "device": str(served.compute or self.compute)}

    def close(self) -> None:
        with self._refreshing:
            self.catalog.close()


def _prediction(logits: torch.Tensor | None, row: int, model: LoadedModel) -> Prediction | None:
    return None if logits is None else predict(logits[row], model.bundle.classes)
