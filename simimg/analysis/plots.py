"""The training report's pictures as PNG bytes: curves (loss and accuracy per epoch) and the confusion matrix.

Drawn on matplotlib `Figure` objects, never through pyplot, so no plotting backend is chosen for the process.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def curves_png(history: Sequence[dict[str, Any]], best_epoch: int | None = None) -> bytes:
    """Loss and accuracy per epoch, train against validation, with the kept epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", label="validation")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def confusion_png(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Counts, rows the true class and columns the predicted one, in `classes` order."""
    m = np.asarray(matrix)
    side = max(4.0, 0.5 * len(classes) + 2)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(m):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > m.max() / 2 else "black")
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
