"""The int8 gate's figures (simimg/analysis/agreement.py): arrays in, figures out."""

from __future__ import annotations

import numpy as np
import pytest

from simimg.analysis.agreement import MIN_COSINE, gate_figures, top_k_agreement


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def vectors() -> np.ndarray:
    return unit(np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32))


def test_identical_vectors_pass(vectors):
    logits = vectors[:, :3]
    figures = gate_figures(vectors, vectors.copy(), np.arange(10), logits, logits.copy())
    assert figures.passed
    assert (figures.top10_agreement, figures.classifier_agreement) == (1.0, 1.0)
    assert figures.min_cosine == pytest.approx(1.0)
    assert (figures.queries, figures.gallery) == (10, 60)


def test_a_tiny_error_keeps_the_neighbours_but_a_low_cosine_fails(vectors):
    rng = np.random.default_rng(1)
    close = unit(vectors + rng.normal(scale=1e-4, size=vectors.shape).astype(np.float32))
    assert gate_figures(vectors, close, np.arange(10)).passed
    far = close.copy()
    far[3] = unit(vectors[3:4] + 0.3 * vectors[4:5])[0]  # one held-back vector strays: cosine about 0.96
    figures = gate_figures(vectors, far, np.arange(10))
    assert figures.min_cosine < MIN_COSINE
    assert not figures.passed


def test_changed_neighbour_lists_fail_though_every_cosine_is_high():
    """Random-init features sit at cosine 0.98 to one another: small errors reorder their neighbours (issue 21)."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=16)
    crowded = unit(base + 0.05 * rng.normal(size=(40, 16)))
    noisy = unit(crowded + 0.01 * rng.normal(size=crowded.shape))
    figures = gate_figures(crowded, noisy, np.arange(10))
    assert figures.min_cosine > 0.99
    assert figures.top10_agreement < 0.95
    assert not figures.passed


def test_a_different_predicted_class_fails(vectors):
    logits = np.eye(3)[np.arange(60) % 3]
    flipped = logits.copy()
    flipped[0] = logits[1]
    figures = gate_figures(vectors, vectors, np.arange(10), logits, flipped)
    assert figures.classifier_agreement == pytest.approx(0.9)
    assert not figures.passed


def test_a_gallery_smaller_than_ten_compares_every_other_row(vectors):
    assert top_k_agreement(vectors[:5], vectors[:5][::-1].copy(), np.arange(2), 10) == 1.0
    assert gate_figures(vectors[:5], vectors[:5], np.arange(2)).passed
