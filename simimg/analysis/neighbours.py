"""Looking at a collection as a whole: a 2-D map of its embeddings, its near-duplicate pairs, confusion cells.

Arrays in, arrays out: the Inspect page reads the catalog and draws; these functions only compute.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from simimg.choices import PROJECTIONS

log = logging.getLogger(__name__)

NEIGHBORS = 10
NEAR_FACTOR = 0.13  # cleanlab Datalab's near_duplicate threshold, a fraction of the median nearest-neighbour distance


@dataclass(frozen=True)
class Pair:
    """Two catalog rows (positions in the arrays given) and their cosine similarity."""

    a: int
    b: int
    score: float


def sample_positions(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """At most `limit` of range(n), sorted, the same ones every time for the same seed."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def project_2d(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """N x 2 coordinates that keep similar images close: PCA (fast, linear) or t-SNE (slower, local structure).
    scikit-learn is imported here, not with the module: the query service imports this module, and a serving
    process would pay 1.5 s for it."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    vectors = np.asarray(vectors, np.float32)
    n = len(vectors)
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; use one of {PROJECTIONS}")
    if n < 3:
        return np.zeros((n, 2), np.float32)
    if method == "pca":
        pca: np.ndarray = PCA(n_components=2, random_state=seed).fit_transform(vectors).astype(np.float32)
        return pca
    reduced = PCA(n_components=min(50, n - 1, vectors.shape[1]), random_state=seed).fit_transform(vectors)
    perplexity = float(min(30, max(2, (n - 1) // 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    projected: np.ndarray = tsne.fit_transform(reduced).astype(np.float32)
    return projected


def near_duplicate_threshold(nn_similarity: np.ndarray, factor: float = NEAR_FACTOR) -> float:
    """The cosine above which two images are near-duplicates: 1 - factor x the median nearest-neighbour distance."""
    if not len(nn_similarity):
        return 1.0
    return 1.0 - factor * max(float(np.median(1.0 - nn_similarity)), 0.0)


def near_duplicates(
    vectors: np.ndarray,
    hashes: Sequence[str] | None = None,
    threshold: float | None = None,
    neighbors: int = NEIGHBORS,
    limit: int | None = None,
) -> tuple[list[Pair], float]:
    """Pairs of rows at or above `threshold`, most similar first (at most `limit`); and the threshold used.

    The one rule the audit and the Inspect page share: by default the threshold is the collection's own
    (`near_duplicate_threshold`, cleanlab Datalab's). Given content `hashes`, exact copies are left out: one image
    per content takes part, so copies neither pair up here nor pull the median distance to zero. Vectors must be
    unit length (as the catalog stores them); each row looks at its `neighbors` nearest only, so memory stays
    N x neighbors even when a low threshold matches nearly everything.
    """
    if hashes is None:
        firsts = np.arange(len(vectors))
    else:
        first: dict[str, int] = {}
        for position, sha in enumerate(hashes):
            first.setdefault(sha, position)
        firsts = np.array(sorted(first.values()), np.int64)
    scores, found = nearest(vectors[firsts], neighbors)
    if scores.shape[1] < 2:
        return [], 1.0 if threshold is None else threshold
    if threshold is None:
        others = np.where(found != np.arange(len(firsts))[:, None], scores, -np.inf)
        threshold = near_duplicate_threshold(others.max(axis=1))
    pairs = [Pair(int(firsts[p.a]), int(firsts[p.b]), p.score) for p in pairs_above(scores, found, threshold)]
    return pairs[:limit], threshold


def nearest(vectors: np.ndarray, neighbors: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), N x (neighbors + 1): each row's nearest rows by inner product, itself usually first."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    if len(vectors) < 2:
        return np.empty((len(vectors), 0), np.float32), np.empty((len(vectors), 0), np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index.search(vectors, min(neighbors + 1, len(vectors)))


def pairs_above(scores: np.ndarray, found: np.ndarray, threshold: float) -> list[Pair]:
    """The distinct pairs among `nearest`'s results that score >= threshold, most similar first."""
    best: dict[tuple[int, int], float] = {}
    for a, (row_scores, row_found) in enumerate(zip(scores.tolist(), found.tolist())):
        for score, b in zip(row_scores, row_found):
            if b >= 0 and b != a and score >= threshold:
                best[(min(a, b), max(a, b))] = score
    return sorted((Pair(a, b, s) for (a, b), s in best.items()), key=lambda p: (-p.score, p.a, p.b))


def score_landmarks(vectors: np.ndarray, sample: int = 500, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Median cosine of a sampled image's nearest neighbour, of its k-th, and of a random pair.

    What a score means depends on the embedding: with random-init features every pair is near 0.98, with trained
    ones unrelated images sit far lower. These landmarks put a threshold in the index's own terms.
    """
    vectors = np.ascontiguousarray(vectors, np.float32)
    n = len(vectors)
    if n < 3:
        return {}
    queries = vectors[sample_positions(n, sample, seed)]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, _ = index.search(queries, min(k + 1, n))  # the first hit is the image itself
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, (2, min(5000, n * 4)))
    keep = a != b
    pairs = np.einsum("ij,ij->i", vectors[a[keep]], vectors[b[keep]])
    return {
        "nearest": float(np.median(scores[:, 1])),
        f"neighbour_{min(k, n - 1)}": float(np.median(scores[:, -1])),
        "random_pair": float(np.median(pairs)),
    }
