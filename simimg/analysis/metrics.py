"""Classification and retrieval metrics: pure functions of labels, probabilities and embeddings.

The evaluate job, the training runs (per-epoch validation) and the head-only fit all score with these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MOST_CONFUSED = 20
QUERY_CHUNK = 256


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true class)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # 1.5 s to import: only here

    predicted = probs.argmax(axis=1)
    every = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=every, zero_division=0)
    present = support > 0
    return {
        "classes": list(classes),
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=every).tolist(),
    }


def most_confused(
    paths: Sequence[str], labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], limit: int = MOST_CONFUSED
) -> list[dict[str, Any]]:
    """Misclassified images, the most confidently wrong first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:limit]
    return prediction_rows(paths, labels, probs, classes, wrong)


def prediction_rows(
    paths: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    rows: Sequence[int] | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One {path, label, predicted, probability} per evaluated image (or per `rows`): what a confusion cell shows."""
    predicted = probs.argmax(axis=1)
    rows = range(len(paths)) if rows is None else rows
    return [
        {
            "path": paths[i],
            "label": classes[labels[i]],
            "predicted": classes[predicted[i]],
            "probability": round(float(probs[i, predicted[i]]), 6),
        }
        for i in rows
    ]


def retrieval_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    exclude: np.ndarray | None = None,
    k: int = 10,
) -> dict[str, float]:
    """P@1, P@k and mAP of cosine neighbours; a neighbour is relevant when its label matches.

    `exclude[i]` is the gallery position of query i itself (or -1), which is never counted as its neighbour.
    """
    exclude = np.full(len(queries), -1) if exclude is None else exclude
    g = torch.from_numpy(np.ascontiguousarray(gallery, np.float32))
    g_labels = torch.from_numpy(np.asarray(gallery_labels))
    p1, pk, ap = [], [], []
    for start in range(0, len(queries), QUERY_CHUNK):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + QUERY_CHUNK], np.float32))
        scores = q @ g.T
        own = torch.from_numpy(exclude[start : start + QUERY_CHUNK])
        rows = torch.nonzero(own >= 0).flatten()
        scores[rows, own[rows]] = -torch.inf
        order = scores.argsort(dim=1, descending=True, stable=True)
        relevant = (g_labels[order] == torch.from_numpy(query_labels[start : start + QUERY_CHUNK])[:, None]).float()
        relevant[rows, -1] = 0.0  # the excluded self sorts last
        hits = relevant.cumsum(dim=1)
        ranks = torch.arange(1, relevant.shape[1] + 1)
        p1.append(relevant[:, 0])
        pk.append(relevant[:, :k].sum(dim=1) / min(k, relevant.shape[1]))
        ap.append((hits / ranks * relevant).sum(dim=1) / relevant.sum(dim=1).clamp(min=1))
    return {
        "p_at_1": float(torch.cat(p1).mean()),
        f"p_at_{k}": float(torch.cat(pk).mean()),
        "map": float(torch.cat(ap).mean()),
    }
