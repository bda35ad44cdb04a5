"""Labels needed to reach 95% of the full-label head's accuracy: the Review queue's uncertainty order against
random order, simulated with an oracle in the same run.

    python benchmarks/active_labeling.py --data ../shared/datasets/hymenoptera --json
    python benchmarks/active_labeling.py --data ../shared/datasets/cats_dogs --json
    python benchmarks/active_labeling.py --data ../shared/datasets/hymenoptera --epochs 20 --json

Indexes DATA once (DenseNet-121 at `--image-size`; `--weights none` by default, random init: nothing to download;
`imagenet` where those weights are cached, or a fine-tuned bundle's folder), or with `--epochs` trains that model
first (`simimg.train`, which re-embeds the collection with it) and reads its embeddings;
then reads the train and val vectors of the split `simimg train` makes back from the catalog. The full-label head
is `analysis/classifier.fit_head` on every train vector (what `simimg train --head-only` fits); the target is
`--target` (0.95) times its val accuracy.

The labelling loop runs in memory, per repeat (seed): `--start` labels per class drawn at random; each round the
head is fitted on the labelled images, its val accuracy recorded, and an oracle labels the next `--batch` of the
rest of the train pool, either the least certain first (`analysis/review.least_certain_first` on the head's
probabilities: the order of the Review page's unlabeled queue) or in a seeded random order. Both orders start
from the same labels in a repeat. Labels needed: the labelled count at the first round whose val accuracy reaches
the target (None when the pool runs out first). The figure is `ratio_random_over_uncertainty`, median labels
needed in random order over those by uncertainty (> 1: the queue saves labels).

With `--epochs`, the backbone has been trained on every train label, so the loop measures the head on features
that already separate the classes: an upper bound on what the queue saves with a fine-tuned backbone.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import simimg
from _common import finish, hardware, indexed_split, make_jpegs, parser
from simimg.analysis.classifier import FittedHead, fit_head
from simimg.analysis.review import least_certain_first
from simimg.models.device import resolve_device
from simimg.store.layout import IndexFolder

ORDERS = ("uncertainty", "random")


@dataclass(frozen=True)
class Vectors:
    """The split's train pool and val set as the catalog holds them, labels as class numbers."""

    x: np.ndarray
    y: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    classes: int


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", help="a folder of class folders (or train/ and val/); default: generated JPEGs")
    p.add_argument("--images", type=int, default=60, help="JPEGs to generate without --data")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--weights", default="none", help="none (random init), imagenet where cached, or a bundle folder")
    p.add_argument("--epochs", type=int, default=0, help="train the model from --weights first (0: its features)")
    p.add_argument("--start", type=int, default=2, help="labels per class the loop starts from")
    p.add_argument("--batch", type=int, default=10, help="labels the oracle gives each round")
    p.add_argument("--target", type=float, default=0.95, help="share of the full-label head's val accuracy to reach")
    p.add_argument("--full-curve", action="store_true", help="keep labelling after the target, to the pool's end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    started = time.perf_counter()
    data, index_s = load(args)
    full = fit_head(data.x, data.y, data.classes)
    full_accuracy = accuracy(full, data)
    target = args.target * full_accuracy
    runs = [
        simulate(data, order, start_set(data.y, args.start, args.seed + r), args, target, args.seed + r)
        for r in range(max(args.repeats, 1))
        for order in ORDERS
    ]
    rows = [{k: v for k, v in run.items() if k != "curve"} for run in runs]
    model = describe_model(args.weights, args.epochs)
    summary = {
        "benchmark": "active_labeling",
        "data": str(args.data or "generated"),
        "model": model,
        "image_size": args.image_size,
        "pool": len(data.y),
        "val": len(data.vy),
        "classes": data.classes,
        "start_labels": args.start * data.classes,
        "batch": args.batch,
        "full_curve": args.full_curve,
        "full_label_accuracy": full_accuracy,
        "target_accuracy": target,
        **needed(runs),
        "curves": {o: [run["curve"] for run in runs if run["order"] == o] for o in ORDERS},
        "index_s": index_s,
        "seconds": round(time.perf_counter() - started, 1),
        "hardware": hardware(resolve_device(args.device)),
    }
    title = f"labels to reach {args.target:.0%} of the full-label head's val accuracy ({model})"
    finish(title, rows, summary, args.json)


def load(args: Namespace) -> tuple[Vectors, float]:
    """DATA (or generated JPEGs) indexed once in a temporary home, optionally trained first; its split's vectors."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data).resolve() if args.data else make_jpegs(Path(tmp) / "photos", args.images)
        options = {"device": args.device, "image_size": args.image_size, "weights": args.weights}
        started = time.perf_counter()
        simimg.build_index(folder, "active", tmp, **options)
        if args.epochs:  # the trained model is served and the collection embedded with it
            simimg.train(folder, "active", tmp, epochs=args.epochs, seed=args.seed, **options)
        index_s = round(time.perf_counter() - started, 1)
        split, x, vx = indexed_split(folder, IndexFolder.of(tmp, "active"))
    vectors = Vectors(x, split.labels(split.train), vx, split.labels(split.val), len(split.classes))
    return vectors, index_s


def describe_model(weights: str, epochs: int) -> str:
    """The features the loop ran on, in words for the table's title and the JSON line."""
    start = "random init" if weights == "none" else weights
    if epochs:
        return f"densenet121 trained {epochs} epochs from {start} on the train labels"
    return "random-init densenet121" if weights == "none" else f"densenet121 from {weights}"


def start_set(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` train rows of each class, a seeded draw: the labels a user gives before the queue can rank."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def simulate(data: Vectors, order: str, start: np.ndarray, args: Namespace, target: float, seed: int) -> dict:
    """One labelling run: fit on the labelled rows, record val accuracy, let the oracle label `args.batch` more
    (the least certain first, or at random), until the target is reached (or, with --full-curve, the pool ends)."""
    rng = np.random.default_rng(seed)
    labelled = list(start)
    pool = np.setdiff1d(np.arange(len(data.y)), start)
    pool = rng.permutation(pool) if order == "random" else pool
    curve: list[list[float]] = []
    reached, fit_s = None, 0.0
    while True:
        began = time.perf_counter()
        head = fit_head(data.x[labelled], data.y[labelled], data.classes)
        fit_s += time.perf_counter() - began
        score = accuracy(head, data)
        curve.append([len(labelled), round(score, 4)])
        if reached is None and score >= target:
            reached = len(labelled)
        if len(pool) == 0 or (reached is not None and not args.full_curve):
            break
        if order == "uncertainty":  # the Review queue, ranked by the head just fitted
            pool = pool[least_certain_first(head.probabilities(data.x[pool]))]
        labelled += list(pool[: args.batch])
        pool = pool[args.batch :]
    print(f"{order} from seed {seed}: target reached at {reached} labels, {len(curve)} rounds", file=sys.stderr)
    return {
        "order": order,
        "seed": seed,
        "labels_needed": reached,
        "rounds": len(curve),
        "last_labels": curve[-1][0],
        "last_accuracy": curve[-1][1],
        "fit_s": round(fit_s, 2),
        "curve": curve,
    }


def needed(runs: list[dict]) -> dict:
    """Median labels needed per order (the lower median, so it is one run's count; a run that never reached the
    target counts as more than any that did, and None when the median run did not reach it), and random over
    uncertainty."""
    figures: dict = {}
    for order in ORDERS:
        counts = [r["labels_needed"] for r in runs if r["order"] == order]
        middle = statistics.median_low([math.inf if c is None else c for c in counts])
        figures[f"labels_needed_{order}"] = None if math.isinf(middle) else int(middle)
        figures[f"labels_needed_{order}_runs"] = counts
    by_uncertainty, by_random = figures["labels_needed_uncertainty"], figures["labels_needed_random"]
    ratio = by_random / by_uncertainty if by_uncertainty and by_random else None
    return {**figures, "ratio_random_over_uncertainty": ratio}


def accuracy(head: FittedHead, data: Vectors) -> float:
    return float((head.logits(data.vx).argmax(axis=1) == data.vy).mean())


if __name__ == "__main__":
    main()
