"""classifier.py: the head's fit is scikit-learn's class-weighted logistic regression, C by cross-validation, only
faster; its out-of-fold probabilities are the audit's."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from simimg.analysis import classifier
from simimg.analysis.classifier import C_GRID, cross_validate, fit_head

if TYPE_CHECKING:  # scikit-learn (1.5 s to import) loads in the tests that compare with it, not at collection
    from sklearn.linear_model import LogisticRegression


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference(c: float) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=5000, tol=1e-8)


def overlapping(n: int, classes: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around a shared direction (as embeddings are), classes that overlap, sizes 1:2:3..."""
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n, p=np.arange(1, classes + 1) / (classes * (classes + 1) / 2))
    x = 3 * np.ones(dim) / np.sqrt(dim) + rng.normal(size=(classes, dim))[y] * 0.1 + rng.normal(size=(n, dim)) * 0.35
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def grid_search(x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    """The fit this replaced, as it was."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search = GridSearchCV(reference(1.0), {"C": C_GRID}, cv=cv, scoring="neg_log_loss").fit(x, y)
    return search.best_estimator_


@pytest.mark.parametrize("classes", [2, 3])
def test_fit_head_minimises_scikit_learns_class_weighted_logistic_regression(classes, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    monkeypatch.setattr(classifier, "TOLERANCE", 1e-6)  # the objective, not the stopping rule
    x, y = overlapping(240, classes)
    head = fit_head(x, y, classes)
    assert head.weight.shape == (classes, 32) and head.bias.shape == (classes,) and head.c in C_GRID
    assert head.weight.dtype == head.bias.dtype == np.float32
    expected = reference(head.c).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(softmax(x @ head.weight.T + head.bias), expected, atol=2e-3)
    unweighted = LogisticRegression(C=head.c, max_iter=5000).fit(x, y).predict_proba(x)
    assert np.abs(unweighted - expected).max() > 0.02  # the class weights matter here, so the match says something


def test_fit_head_picks_the_grid_searchs_c_and_matches_its_accuracy():
    x, y = overlapping(2200, 3, dim=16, seed=1)
    (x, y), (val_x, val_y) = (x[:200], y[:200]), (x[200:], y[200:])
    head, old = fit_head(x, y, 3), grid_search(x, y)
    accuracy = ((val_x @ head.weight.T + head.bias).argmax(1) == val_y).mean()
    assert head.c == old.C and 0.5 < old.score(val_x, val_y) < 0.9  # a set where the classes overlap
    assert abs(accuracy - old.score(val_x, val_y)) <= 0.01


def test_fit_head_is_deterministic_for_a_seed():
    x, y = overlapping(200, 3)
    a, b = fit_head(x, y, 3, seed=4), fit_head(x, y, 3, seed=4)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert a.c == b.c


def test_fit_head_learns_several_classes_and_copes_with_a_class_of_one():
    rng = np.random.default_rng(1)
    centres = np.eye(4) * 4
    x = np.concatenate([rng.normal(c, 0.5, (10, 4)) for c in centres] + [centres[:1] + 0.1])
    y = np.concatenate([np.repeat(np.arange(4), 10), [0]])
    head = fit_head(x, y, 4)
    assert (softmax(x @ head.weight.T + head.bias).argmax(1) == y).mean() == 1.0
    lonely = fit_head(np.concatenate([x, centres[3:] * 2]), np.concatenate([y, [4]]), 5)  # no CV possible
    assert lonely.weight.shape == (5, 4) and lonely.c == 1.0


def test_out_of_fold_probabilities_come_from_the_chosen_c_on_held_out_folds(monkeypatch):
    monkeypatch.setattr(classifier, "TOLERANCE", 1e-6)
    x, y = overlapping(150, 3, seed=3)
    cv = cross_validate(x, y, 3, folds=3, seed=0)
    assert cv.c in C_GRID and cv.probabilities.shape == (150, 3)
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    expected = cross_val_predict(reference(cv.c), x, y, cv=folds, method="predict_proba")
    np.testing.assert_allclose(cv.probabilities, expected, atol=2e-3)


def test_large_sets_pick_c_on_one_stratified_split_of_a_sample(monkeypatch):
    monkeypatch.setattr(classifier, "HOLDOUT_ABOVE", 100)
    monkeypatch.setattr(classifier, "SELECTION_ROWS", 150)
    x, y = overlapping(400, 3, seed=4)
    cv = classifier._Problem(x, y, 3).cross_validate(classifier._selection_splits(y, 3, seed=0))
    held_out = ~np.isnan(cv.probabilities[:, 0])
    assert held_out.sum() == 30 and np.allclose(cv.probabilities[held_out].sum(1), 1)
    assert np.bincount(y[held_out], minlength=3).min() >= 3  # every class held out (stratified)
    assert fit_head(x, y, 3).c == cv.c


def test_fit_head_survives_a_covariance_float32_lapack_cannot_diagonalise():
    """25 embeddings of 1,024 dimensions from an audit run: float32 eigh fails to converge on their covariance with
    one thread (as under pytest-xdist), which crashed the audit and head-only training."""
    sample = np.load(Path(__file__).parent / "assets" / "rank_deficient_sample.npz")["sample"]
    y = np.arange(len(sample)) % 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        head = fit_head(sample, y, 3)
    finally:
        torch.set_num_threads(threads)
    assert head.weight.shape == (3, 1024) and np.isfinite(head.weight).all()


def test_the_c_search_goes_on_past_one_small_rise(monkeypatch):
    """Seen in benchmarks/active_labeling.py on cats_dogs: held-out losses 3.4661, 3.4680, 3.4444, 3.3285 over the
    first four C; stopping at the first rise kept C = 0.1 and cost 8 points of validation accuracy."""
    x, y = overlapping(60, 2, seed=5)
    splits = classifier._folds(y, 3, seed=0)
    scripted = iter(np.repeat([3.4661, 3.4680, 3.4444, 3.3285, 3.5, 3.6], len(splits)) / len(splits))
    monkeypatch.setattr(classifier._Problem, "_held_out_loss", lambda self, params, rows: float(next(scripted)))
    assert classifier._Problem(x, y, 2).cross_validate(splits).c == C_GRID[3]
