"""The Review page's orderings, arrays in and arrays out: which images to ask the user about first.

Uncertainty sampling by margin (top-1 minus top-2 probability) is the order Label Studio and FiftyOne use for
active learning; "least typical" is an image's cosine to its class's mean embedding, lowest first.
"""

from __future__ import annotations

import numpy as np


def margins(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row (the top-1 itself with one class): small means unsure."""
    p = np.asarray(probabilities, np.float64)
    if p.shape[1] == 1:
        return np.array(p[:, 0])
    top = np.partition(p, -2, axis=1)
    return top[:, -1] - top[:, -2]


def least_certain_first(probabilities: np.ndarray) -> np.ndarray:
    """Row indices by margin, smallest first; ties keep their row order (a stable sort), so a queue is repeatable."""
    return np.argsort(margins(probabilities), kind="stable")


def typicality(vectors: np.ndarray) -> np.ndarray:
    """Each L2-normalised row's cosine to the normalised mean of all rows (one class's embeddings)."""
    v = np.asarray(vectors, np.float64)
    mean = v.mean(axis=0)
    norm = np.linalg.norm(mean)
    return v @ (mean / norm) if norm > 0 else np.zeros(len(v))


def least_typical_first(vectors: np.ndarray) -> np.ndarray:
    """Row indices by typicality, lowest first (stable)."""
    return np.argsort(typicality(vectors), kind="stable")
