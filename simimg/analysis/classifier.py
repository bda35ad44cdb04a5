"""The classifier head fitted on stored embeddings: class-weighted logistic regression, C by cross-validation.

Pure (arrays in, a `FittedHead` out); the head-only training job and the audit's out-of-fold probabilities use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold

C_GRID = tuple(float(c) for c in np.logspace(-1, 3, 5))
MAX_FOLDS = 5


@dataclass(frozen=True)
class FittedHead:
    """A linear classifier over unit-length embeddings: logits = weight @ x + bias, one row per class."""

    weight: np.ndarray
    bias: np.ndarray
    c: float


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0) -> FittedHead:
    """Class-weighted logistic regression, C picked by stratified cross-validation when every class allows it."""
    folds = min(MAX_FOLDS, int(np.bincount(y, minlength=num_classes).min()))
    model = logistic_regression()
    if folds >= 2:
        search = GridSearchCV(
            model,
            {"C": C_GRID},
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            scoring="neg_log_loss",
            n_jobs=1,
        )
        model = search.fit(x, y).best_estimator_
    else:
        model.fit(x, y)
    weight, bias = model.coef_, model.intercept_
    if num_classes == 2:  # one row for class 1 against class 0: as two softmax rows the probabilities agree
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    return FittedHead(weight.astype(np.float32), bias.astype(np.float32), float(model.C))


def logistic_regression(c: float = 1.0) -> LogisticRegression:
    """The head's classifier (the audit's out-of-fold probabilities come from the same kind)."""
    return LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
