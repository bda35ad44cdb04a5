"""The classifier head fitted on stored embeddings: class-weighted logistic regression, C by cross-validation.

Pure (arrays in, a `FittedHead` out); the head-only training job and the audit's out-of-fold probabilities use it.

The model is scikit-learn's `LogisticRegression(C, class_weight="balanced")`: the same objective (balanced class
weights, an L2 penalty of |W|^2 / (2 C) on the summed loss, the intercept unpenalised; for two classes one row
against class 0), with C picked from `C_GRID` by held-out log loss over stratified folds as `GridSearchCV` did.
Only the way it is minimised differs, because a labelling loop refits after every batch (benchmarks/head_only.py):
- random-init embeddings share one direction (pairwise cosine ~0.98) and spread around it with a spectrum that
  falls 1e5-fold, so plain L-BFGS needs hundreds of steps per fit. The features are centred (with an unpenalised
  intercept that changes no solution) and turned into their covariance's eigenbasis, where each coordinate's step
  is scaled by the objective's curvature along it: the same problem, preconditioned, solved in tens of steps;
- the folds are solved together, as one problem over every row with each fold's held-out rows weighted 0, and
  each C starts from the previous C's solution, from strong to weak penalty, until the held-out loss rises twice
  in a row;
- above `HOLDOUT_ABOVE` images, one stratified 80/20 split of at most `SELECTION_ROWS` of them picks C; the final
  fit on every image starts from that split's solution;
- torch's full-batch L-BFGS, in float32 on every core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

C_GRID = tuple(float(c) for c in np.logspace(-1, 3, 5))
MAX_FOLDS = 5
HOLDOUT_ABOVE = 5_000  # more images: C from one stratified split, not 5 folds
SELECTION_ROWS = 10_000  # at most this many images (80/20) pick C; the spectrum is read from as many
TOLERANCE = 3e-3  # on the preconditioned gradient: about scikit-learn's 1e-4 on the raw one for these features
MAX_ITER = 1000
HISTORY = 10  # L-BFGS pairs, scipy's default: torch's 100 multiplies the small vector operations of every step

Splits = list[tuple[np.ndarray, np.ndarray]]  # (train rows, held-out rows) per fold


@dataclass(frozen=True)
class FittedHead:
    """A linear classifier over unit-length embeddings: logits = weight @ x + bias, one row per class."""

    weight: np.ndarray
    bias: np.ndarray
    c: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x @ self.weight.T + self.bias)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """The softmax of each row's logits (what head-only training validates and the Review queues order by)."""
        z = self.logits(x)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return np.asarray(z / z.sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class CrossValidation:
    """The C with the lowest held-out log loss, and each held-out image's probabilities at that C (from the fold
    that held it out; rows no fold held out are NaN)."""

    c: float
    probabilities: np.ndarray
    start: torch.Tensor  # the folds' average solution at c, where the final fit starts


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0) -> FittedHead:
    """Class-weighted logistic regression, C picked by stratified cross-validation when every class allows it."""
    problem = _Problem(x, y, num_classes)
    splits = _selection_splits(y, num_classes, seed)
    c, start = 1.0, None
    if splits:
        cv = problem.cross_validate(splits)
        c, start = cv.c, cv.start[None]
    params = problem.fit([np.arange(len(y))], c, start)[0]
    weight, bias = problem.head(params)
    return FittedHead(weight, bias, c)


def cross_validate(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int, seed: int = 0) -> CrossValidation:
    """C by `folds`-fold stratified cross-validation (every class needs `folds` images), with every image's
    out-of-fold probabilities at that C: the audit's label check reads those, of the head's own kind."""
    return _Problem(x, y, num_classes).cross_validate(_folds(y, folds, seed))


def _selection_splits(y: np.ndarray, num_classes: int, seed: int) -> Splits:
    """5 stratified folds (fewer when a class has fewer images, none when one has a single image); above
    HOLDOUT_ABOVE images, one stratified 80/20 split of at most SELECTION_ROWS of them: 2,000 held-out images rank
    the C values as well, for a fraction of the work."""
    from sklearn.model_selection import StratifiedShuffleSplit  # scikit-learn takes 1.5 s to import: only when used

    smallest = int(np.bincount(y, minlength=num_classes).min())
    rows = min(len(y), SELECTION_ROWS)
    if len(y) > HOLDOUT_ABOVE and smallest >= MAX_FOLDS and rows // 5 >= num_classes:  # every class held out
        split = StratifiedShuffleSplit(1, train_size=rows * 4 // 5, test_size=rows // 5, random_state=seed)
        return list(split.split(y, y))
    return _folds(y, min(MAX_FOLDS, smallest), seed) if smallest >= 2 else []


def _folds(y: np.ndarray, folds: int, seed: int) -> Splits:
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y))


def _spectrum(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample covariance's eigenvalues and eigenvectors, in float64: float32 LAPACK fails to converge on the
    rank-deficient covariances of a few hundred images in 1,024 dimensions (seen with one thread per process)."""
    wide = sample.double()
    variances, basis = torch.linalg.eigh(wide.T @ wide / len(wide))
    return variances.float(), basis.float()


class _Problem:
    """One training set, centred and turned into its covariance's eigenbasis once; fits on subsets of its rows."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
        mean = x.mean(axis=0, dtype=np.float64)
        centred = torch.from_numpy(np.asarray(x, np.float32) - mean.astype(np.float32))
        sample = centred[:: max(1, len(centred) // SELECTION_ROWS)]  # the spectrum only steers the steps
        variances, self.basis = _spectrum(sample)
        self.variances = variances.clamp(min=0)
        self.x = centred @ self.basis
        self.mean = mean
        self.y = torch.from_numpy(np.asarray(y, np.int64))
        self.num_classes = num_classes
        self.rows = 1 if num_classes == 2 else num_classes  # two classes: one row against class 0, as scikit-learn
        self.curvature = (1 - 1 / num_classes) / num_classes  # the loss's, per unit of variance, at uniform odds

    def cross_validate(self, splits: Splits) -> CrossValidation:
        """Held-out log loss (unweighted, as GridSearchCV's neg_log_loss) of each C, summed over the folds."""
        path: list[torch.Tensor] = []
        losses: list[float] = []
        for c in C_GRID:
            path.append(self.fit([train for train, _ in splits], c, path[-1] if path else None))
            losses.append(sum(self._held_out_loss(params, test) for params, (_, test) in zip(path[-1], splits)))
            if len(losses) > 2 and losses[-1] > losses[-2] > losses[-3]:  # weaker penalties only fit noise closer
                break  # (after two rises in a row: one small rise then a fall was seen on cats_dogs, 8 points lost)
        best = int(np.argmin(losses))
        probabilities = np.full((len(self.y), self.num_classes), np.nan, np.float32)
        for params, (_, test) in zip(path[best], splits):
            probabilities[test] = torch.softmax(self._logits(params, self.x[test]), dim=1).numpy()
        return CrossValidation(C_GRID[best], probabilities, path[best].mean(dim=0))

    def fit(self, trains: list[np.ndarray], c: float, start: torch.Tensor | None) -> torch.Tensor:
        """One solution per training subset, all minimised together (their objectives are independent): per
        subset, the balanced-weighted mean loss plus |W|^2 / (2 C n), by L-BFGS in preconditioned coordinates."""
        used = np.unique(np.concatenate(trains))
        x, y = (self.x, self.y) if len(used) == len(self.y) else (self.x[used], self.y[used])
        weights = torch.stack([self._row_weights(rows)[used] for rows in trains])  # folds x rows, 0 off the fold
        totals = weights.sum(dim=1)
        scale = torch.ones(self.x.shape[1] + 1)
        scale[:-1] = (self.curvature * self.variances + 1 / (c * float(totals.mean()))).rsqrt()
        shape = (len(trains), self.rows, self.x.shape[1] + 1)
        v = (torch.zeros(shape) if start is None else start / scale).requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [v], max_iter=MAX_ITER, history_size=HISTORY, tolerance_grad=TOLERANCE, line_search_fn="strong_wolfe"
        )
        targets = y.repeat(len(trains))

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            params = v * scale
            z = torch.einsum("nd,frd->fnr", x, params[..., :-1]) + params[:, None, :, -1]
            losses = torch.nn.functional.cross_entropy(
                self._classes(z.reshape(-1, self.rows)), targets, reduction="none"
            )
            penalty = params[..., :-1].square().sum(dim=(1, 2)) / (2 * c)
            loss = (((losses.view(weights.shape) * weights).sum(dim=1) + penalty) / totals).sum()
            torch.autograd.backward(loss)
            return loss

        optimizer.step(closure)  # type: ignore[no-untyped-call]  # torch leaves LBFGS.step untyped
        return (v * scale).detach()

    def _row_weights(self, rows: np.ndarray) -> torch.Tensor:
        """scikit-learn's "balanced" class weights of `rows` on those rows, 0 on the others."""
        y = self.y[rows]
        counts = torch.bincount(y, minlength=self.num_classes).float()
        class_weight = len(rows) / (int((counts > 0).sum()) * counts.clamp(min=1))
        weights = torch.zeros(len(self.y))
        weights[rows] = class_weight[y]
        return weights

    def _held_out_loss(self, params: torch.Tensor, rows: np.ndarray) -> float:
        return float(torch.nn.functional.cross_entropy(self._logits(params, self.x[rows]), self.y[rows]))

    def _logits(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._classes(x @ params[:, :-1].T + params[:, -1])

    def _classes(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(z), z], dim=1) if self.rows == 1 else z

    def head(self, params: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Rows per class over the embeddings as stored (the basis turned back, the centring folded into the bias)."""
        weight = (params[:, :-1] @ self.basis.T).numpy().astype(np.float64)
        bias = params[:, -1].numpy().astype(np.float64)
        if self.rows == 1:
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        return weight.astype(np.float32), (bias - weight @ self.mean).astype(np.float32)
