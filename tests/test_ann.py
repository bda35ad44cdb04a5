"""index: the Flat/IVF choice, IVF recall against exact search, and torch's exact search agreeing with faiss."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from simimg.store.ann import (
    FLAT_LIMIT,
    FaissSearcher,
    TorchFlatSearcher,
    build_ann,
    index_kind_for,
    ivf_lists_for,
    make_searcher,
    nprobe_for,
    outgrown,
)


def clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors in clusters around a shared mean, like pooled CNN features (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)) + 2.0
    x = centers[rng.integers(clusters, size=n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def test_kind_and_parameters_follow_size():
    assert index_kind_for(FLAT_LIMIT - 1) == "flat"
    assert index_kind_for(FLAT_LIMIT) == "ivf"
    for n in (2_000, 20_000, 1_000_000):
        nlist = ivf_lists_for(n)
        assert 16 <= nlist <= max(16, n // 39)
        assert 1 <= nprobe_for(nlist) <= nlist


def test_ivf_recall_against_flat_is_high():
    vectors, queries = clustered(5000), clustered(50, seed=1)
    ids = np.arange(100, 100 + len(vectors), dtype=np.int64)
    _, truth = FaissSearcher(build_ann(ids, vectors, 32, "flat")).search(queries, 10)
    _, found = FaissSearcher(build_ann(ids, vectors, 32, "ivf")).search(queries, 10)
    assert recall(found, truth) >= 0.95


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_torch_exact_search_agrees_with_faiss_flat(kind):
    vectors, queries = clustered(3000), clustered(20, seed=1)
    ids = np.arange(7, 7 + len(vectors), dtype=np.int64) * 3
    flat = FaissSearcher(build_ann(ids, vectors, 32, "flat"))
    torch_search = TorchFlatSearcher.from_index(build_ann(ids, vectors, 32, kind), torch.device("cpu"))
    want_scores, want_ids = flat.search(queries, 10)
    scores, found = torch_search.search(queries, 10)
    assert recall(found, want_ids) >= 0.95  # fp16 may swap near-ties; the sets agree
    np.testing.assert_allclose(scores, want_scores, atol=2e-3)
    allowed = ids[::5]
    _, want_ids = flat.search(queries, 10, allowed)
    _, found = torch_search.search(queries, 10, allowed)
    assert set(found.ravel()) <= set(allowed)
    assert recall(found, want_ids) >= 0.95


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_the_cuda_searcher_agrees_with_faiss_flat(kind, cuda):
    vectors, queries = clustered(3000), clustered(20, seed=1)
    ids = np.arange(len(vectors), dtype=np.int64) * 2
    want_scores, want_ids = FaissSearcher(build_ann(ids, vectors, 32, "flat")).search(queries, 10)
    searcher = make_searcher(build_ann(ids, vectors, 32, kind), cuda)  # what a CUDA SearchService uses
    scores, found = searcher.search(queries, 10)
    assert recall(found, want_ids) >= 0.95
    np.testing.assert_allclose(scores, want_scores, atol=2e-3)


def test_torch_search_pads_when_fewer_match():
    vectors = clustered(50)
    ids = np.arange(len(vectors), dtype=np.int64)
    searcher = TorchFlatSearcher.from_index(build_ann(ids, vectors, 32, "flat"), torch.device("cpu"))
    _, found = searcher.search(vectors[:2], 5, allowed=np.array([3, 4], np.int64))
    assert sorted(found[0][:2]) == [3, 4] and (found[:, 2:] == -1).all()


def test_an_ivf_index_has_outgrown_its_lists_once_its_size_asks_for_many_more():
    ids, vectors = np.arange(700, dtype=np.int64), clustered(700)
    index = build_ann(ids, vectors, 32, "ivf")
    nlist = faiss.extract_index_ivf(index).nlist
    assert nlist == ivf_lists_for(700) and not outgrown(index, 700) and not outgrown(index, 900)
    assert outgrown(index, 3000) and ivf_lists_for(3000) > 1.4 * nlist
    assert not outgrown(build_ann(ids, vectors, 32, "flat"), 10**6)  # exact search has no lists
