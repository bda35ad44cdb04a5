"""explore: 2-D maps keep neighbours close, near-duplicate pairs, confusion cells."""

from __future__ import annotations

import numpy as np
import pytest

from simimg.analysis.neighbours import near_duplicates, project_2d, sample_positions


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clusters(n_per: int = 15, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 5
    vectors = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    return unit(vectors), np.repeat(np.arange(3), n_per)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_projection_keeps_clusters_apart(method: str):
    vectors, labels = clusters()
    xy = project_2d(vectors, method)
    assert xy.shape == (45, 2) and np.isfinite(xy).all()
    centres = np.stack([xy[labels == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(xy[labels == c] - centres[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > spread


def test_projection_of_tiny_inputs_and_unknown_method():
    assert project_2d(np.ones((2, 4)), "tsne").shape == (2, 2)
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(np.ones((5, 4)), "umap")


def test_near_duplicates_finds_planted_pairs_best_first():
    vectors, _ = clusters(n_per=10, dim=64, seed=1)
    rng = np.random.default_rng(2)
    copies = unit(vectors[[3, 17]] + rng.normal(scale=[[0.001], [0.01]], size=(2, 64)))
    every = np.concatenate([vectors, copies])
    pairs, used = near_duplicates(every, threshold=0.99)
    assert used == 0.99
    assert [(p.a, p.b) for p in pairs] == [(3, 30), (17, 31)]
    assert pairs[0].score > pairs[1].score >= 0.99
    assert near_duplicates(every, threshold=1.01)[0] == []
    assert near_duplicates(every[:1], threshold=0.5)[0] == []


def test_near_duplicates_at_a_low_threshold_stays_bounded():
    vectors = unit(np.ones((50, 8)) + np.random.default_rng(0).normal(scale=0.01, size=(50, 8)))
    pairs, _ = near_duplicates(vectors, threshold=0.0, neighbors=3, limit=1000)
    assert 0 < len(pairs) <= 50 * 3
    assert len({(p.a, p.b) for p in pairs}) == len(pairs) and all(p.a < p.b for p in pairs)


def test_sample_positions_is_stable_and_capped():
    assert list(sample_positions(5, 10)) == [0, 1, 2, 3, 4]
    first, again = sample_positions(1000, 20), sample_positions(1000, 20)
    assert len(first) == 20 and list(first) == sorted(first) and (first == again).all()
