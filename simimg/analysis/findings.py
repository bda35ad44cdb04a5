"""What is wrong with a labelled collection, arrays in and findings out: likely label errors, exact and near
duplicates, outliers and class imbalance. `auditing.py` reads the folder and the catalog; these only compute.

Label issues and outliers come from cleanlab: confident learning on out-of-fold predicted probabilities
(`cleanlab.filter.find_label_issues`, ranked by `cleanlab.rank.get_label_quality_scores`) and kNN outlier scores
(`cleanlab.outlier.OutOfDistribution`). Near-duplicates follow cleanlab Datalab's rule, with FAISS finding the
neighbours: two images are near-duplicates when their cosine distance is under NEAR_FACTOR times the collection's
median nearest-neighbour distance. The threshold thus adapts to the embedding's spread: random-init features put
every pair near 0.99 cosine and the threshold near 0.9995; trained features spread out and it drops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simimg.analysis.classifier import cross_validate
from simimg.analysis.neighbours import NEIGHBORS, near_duplicates as pairs_near
from simimg.dataset.splits import IMBALANCE_RATIO
from simimg.errors import SimimgError

log = logging.getLogger(__name__)

OUTLIER_IQR = 1 / 0.37037 - 1  # Datalab's outlier rule: average kNN distance above Q3 + 1.7 x IQR
RARE_SHARE = 0.1  # Datalab's class_imbalance rule: a class under a tenth of an even share is rare
MAX_FOLDS = 5


@dataclass(frozen=True)
class LabelIssue:
    """An image whose label is likely wrong; `score` is cleanlab's label quality (0 = surely wrong, 1 = fine)."""

    position: int
    suggested: int
    score: float


@dataclass(frozen=True)
class Duplicates:
    """Images with the same content ("exact": same sha256) or nearly the same ("near"), and their cosine."""

    positions: tuple[int, ...]
    kind: str
    score: float


@dataclass(frozen=True)
class Outlier:
    """An atypical image; `score` is cleanlab's outlier score (lower = further from everything else)."""

    position: int
    score: float


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, num_classes: int, folds: int = MAX_FOLDS, seed: int = 0
) -> np.ndarray:
    """N x classes probabilities, each row from a classifier that never saw that image: the head's kind (class-
    weighted logistic regression), at the C that the same folds' cross-validation picks."""
    folds = min(folds, int(np.bincount(y, minlength=num_classes).min()))
    if folds < 2:
        raise SimimgError(
            "finding label issues needs at least 2 images in every class: add images or remove the classes with one"
        )
    return cross_validate(x, y, num_classes, folds, seed).probabilities


def label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> list[LabelIssue]:
    """cleanlab's confident-learning label issues, most likely wrong first, each with the class it looks like."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, pred_probs)
    suggested = pred_probs.argmax(axis=1)
    return [LabelIssue(int(i), int(suggested[i]), float(quality[i])) for i in ranked]


def exact_duplicates(hashes: Sequence[str]) -> list[Duplicates]:
    """Groups of positions with the same content hash, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for position, sha in enumerate(hashes):
        groups.setdefault(sha, []).append(position)
    return [Duplicates(tuple(g), "exact", 1.0) for g in groups.values() if len(g) > 1]


def near_duplicates(vectors: np.ndarray, hashes: Sequence[str]) -> tuple[list[Duplicates], float]:
    """Pairs of different contents above the collection's own threshold (neighbours.near_duplicates, the rule the
    Inspect page shows too), most similar first; and the threshold."""
    pairs, threshold = pairs_near(vectors, hashes)
    return [Duplicates((p.a, p.b), "near", p.score) for p in pairs], threshold


def outliers(vectors: np.ndarray, neighbors: int = NEIGHBORS) -> list[Outlier]:
    """cleanlab's kNN outlier scores, flagged by Datalab's rule (an average neighbour distance above Q3 + 1.7 x
    IQR), most atypical first."""
    from cleanlab.outlier import OutOfDistribution

    if len(vectors) <= 2:
        return []
    ood = OutOfDistribution(params={"k": min(neighbors, len(vectors) - 1)})
    scores = ood.fit_score(features=np.asarray(vectors, np.float32), verbose=False)
    distance = -np.log(np.maximum(scores, np.finfo(np.float64).tiny))  # scores are exp(-distance / median)
    q1, q3 = np.quantile(distance, [0.25, 0.75])
    flagged = np.flatnonzero(distance > q3 + OUTLIER_IQR * (q3 - q1))
    return sorted((Outlier(int(i), float(scores[i])) for i in flagged), key=lambda o: o.score)


def class_balance(labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Counts per class; `imbalanced` where training would weight its loss; `rare` classes per cleanlab's rule."""
    counts = np.bincount(labels, minlength=len(classes))
    even = counts.sum() / max(len(classes), 1)
    ratio = float(counts.max() / max(counts.min(), 1)) if len(counts) else 1.0
    rare = [c for c, n in zip(classes, counts) if n < RARE_SHARE * even]
    return {
        "counts": {c: int(n) for c, n in zip(classes, counts)},
        "ratio": round(ratio, 3),
        "imbalanced": ratio >= IMBALANCE_RATIO,
        "rare": rare,
    }


def crosses(positions: Sequence[int], labels: Sequence[object], splits: Sequence[str]) -> tuple[bool, bool]:
    """(cross_class, cross_split): whether the images carry different labels, and lie in different splits."""
    return len({labels[i] for i in positions}) > 1, len({splits[i] for i in positions}) > 1
