"""review.py and the Review queues: uncertain images first, least typical first, and the queues over an index."""

from __future__ import annotations

import numpy as np

from simimg.analysis.review import least_certain_first, least_typical_first, margins, typicality


def test_margins_are_top_one_minus_top_two_whatever_the_column_order():
    p = np.array([[0.1, 0.6, 0.3], [0.34, 0.33, 0.33], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(margins(p), [0.3, 0.01, 1.0])
    assert least_certain_first(p).tolist() == [1, 0, 2]


def test_ties_keep_row_order_so_the_queue_is_repeatable():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    assert least_certain_first(p).tolist() == [0, 2, 1]


def test_the_image_furthest_from_its_class_mean_comes_first():
    rng = np.random.default_rng(0)
    v = np.array([1.0, 0, 0]) + rng.normal(0, 0.05, (6, 3))
    v[4] = [0, 1.0, 0]  # off on its own
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert least_typical_first(v)[0] == 4
    assert typicality(v)[4] < typicality(v)[np.arange(6) != 4].min()
