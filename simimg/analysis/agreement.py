"""How far a cheaper forward's vectors stray from float32's: the int8 gate's figures, arrays in, figures out.

int8 is a large speed-up on a CPU, but how close its vectors stay depends on the features: on random-init
densenet121 features (every pair of images at cosine 0.98 or more) int8 kept a lowest cosine of 0.996 with float32
and yet only 12% of top-10 neighbour lists (issue 21). So the gate measures what a user sees, neighbour lists and
predicted classes, not only the cosine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# int8 serves only when every figure reaches its threshold (issue 21)
MIN_TOP10_AGREEMENT = 0.95
MIN_COSINE = 0.99
MIN_CLASSIFIER_AGREEMENT = 0.99
NEIGHBOURS = 10


@dataclass(frozen=True)
class GateFigures:
    """The gate's figures on a held-back sample; `classifier_agreement` is None for a model without a head."""

    top10_agreement: float
    min_cosine: float
    classifier_agreement: float | None
    passed: bool
    queries: int
    gallery: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The figures against their thresholds, as a log line or an error message says them."""
        head = "n/a" if self.classifier_agreement is None else f"{self.classifier_agreement:.3f}"
        return (
            f"top-10 agreement {self.top10_agreement:.3f} (needs {MIN_TOP10_AGREEMENT}), lowest cosine "
            f"{self.min_cosine:.4f} (needs {MIN_COSINE}), classifier agreement {head} (needs "
            f"{MIN_CLASSIFIER_AGREEMENT}) on {self.queries} held-back images"
        )


def gate_figures(
    reference: np.ndarray,
    candidate: np.ndarray,
    queries: np.ndarray,
    reference_logits: np.ndarray | None = None,
    candidate_logits: np.ndarray | None = None,
) -> GateFigures:
    """Compare `candidate` (say int8) unit vectors with `reference` (float32) ones, row for row.

    `queries` are the rows held back from calibration: the cosine and the classifier are judged on them, and each
    of them asks for its nearest neighbours among every row (itself left out) in each precision's own vectors, as
    an index embedded wholly in that precision would answer it.
    """
    cosines = np.sum(reference[queries] * candidate[queries], axis=1)
    agreement = top_k_agreement(reference, candidate, queries, NEIGHBOURS)
    head = None
    if reference_logits is not None and candidate_logits is not None:
        head = float(np.mean(reference_logits[queries].argmax(1) == candidate_logits[queries].argmax(1)))
    lowest = float(cosines.min())
    passed = (
        agreement >= MIN_TOP10_AGREEMENT and lowest >= MIN_COSINE and (head is None or head >= MIN_CLASSIFIER_AGREEMENT)
    )
    return GateFigures(round(agreement, 4), round(lowest, 6), head, passed, len(queries), len(reference))


def top_k_agreement(reference: np.ndarray, candidate: np.ndarray, queries: np.ndarray, k: int) -> float:
    """The share of `queries` whose `k` nearest rows (itself excluded; fewer when the rows are fewer) are the same
    set in both."""
    k = min(k, len(reference) - 1)
    if k < 1 or not len(queries):
        return 1.0
    same = [_top(reference, q, k) == _top(candidate, q, k) for q in queries]
    return float(np.mean(same))


def _top(vectors: np.ndarray, query: int, k: int) -> frozenset[int]:
    scores = vectors @ vectors[query]
    scores[query] = -np.inf
    return frozenset(np.argpartition(-scores, k - 1)[:k].tolist())
