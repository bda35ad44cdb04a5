"""Label repair as a user runs it: audit a copy of DATA with injected label flips and cross-class copies, accept the
audit's top suggestions, keep one of each duplicate group, and refit the head; validation accuracy before and after.

    python benchmarks/label_repair.py --data ../shared/datasets/hymenoptera --json
    python benchmarks/label_repair.py --data ../shared/datasets/cats_dogs --json

Copies DATA (train/ and val/ class folders; a temporary copy) and injects, with audit_recall.py's code
(`_common.inject`), `--flips` label flips (an image moved to another class folder of its split) and `--exact`
exact copies filed under another class (half of them in the other split). Then the repair, through the public API
only: `build_index` (DenseNet-121 at `--image-size`, random init by default: `--weights none`, nothing to
download), `train(head_only=True)` (before), `audit`; then for each value of `--accept-top`:
`accept_suggestions(top=K)`, `keep_one` on every exact duplicate group the audit reports across classes, keeping
the group's first path in the audit's order (a user cannot tell which copy is right; the audit lists paths in
split order, train before val, then by class folder and name), and `train(head_only=True)` again (after). Every
batch is then taken back with `undo_labels`, so each K starts from the same audit and labels. (Scoring reads the
catalog's vectors and the served model's head directly.)

K: an int, a percentage of the label issues the audit flags ("10%"), or "all" (what `simimg labels accept` does
without --top); 0 accepts nothing and only keeps one of each duplicate group (what deduplication alone does). The
default "0,10%,all" gives the three in one run: with random-init features the audit flags a third of the images
(most of them correctly labelled), so accepting everything it flags is not a sensible default; the top 10% is
what a user who only trusts the audit's surest suggestions does.

Per K: `accepted` relabels; `flips_fixed` (relabelled back to their true class), `flips_relabelled_wrong` (to a
third class); `copies_resolved` (one of the copy and its original excluded), `copies_kept_wrong_label` (of those,
the one kept is the copy and its label is wrong for its content), `copies_relabelled_right`; `correct_relabelled`
(right labels the accept changed: originals, the copies' originals included); `others_excluded` (neither an
injected copy nor its original: the data set's own duplicates across classes).

Validation accuracy is given two ways. `val_true`: the served head's predictions on the original val images
(flipped ones included, injected copies left out; the vectors read once, so excluded images still count),
scored against their true labels: the same images and truth before and after. `val_reported`: what `simimg train`
reports, against the labels as they are then (flipped val images count with their wrong label until fixed, the
copies until excluded), so it moves with the labels as well as the model. `val_true_clean` is the head fitted on
the true labels of the train images (copies left out): what a perfect repair would reach.
"""

from __future__ import annotations

import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import simimg
from _common import Injected, copy_dataset, finish, hardware, indexed_split, inject, parser
from simimg.analysis.classifier import fit_head
from simimg.models.device import resolve_device
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model

if TYPE_CHECKING:
    from simimg.dataset.scan import Record
    from simimg.jobs.audit_config import AuditReport
    from simimg.jobs.train_config import TrainReport

NAME = "repair"


@dataclass(frozen=True)
class TrueVal:
    """The original val images (injected copies left out): their vectors, once, and their true classes."""

    vectors: np.ndarray
    labels: list[str]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", help="a folder with train/ and val/ class folders; default: --images generated JPEGs")
    p.add_argument("--images", type=int, default=64, help="how many JPEGs to generate per split without --data")
    p.add_argument("--flips", type=int, default=20)
    p.add_argument("--exact", type=int, default=10)
    p.add_argument("--accept-top", default="0,10%,all", help="K values, comma-separated: N, N%% of flagged, all")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--weights", default="none", help="none (random init), imagenet where cached, or a bundle folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        copy, home = Path(tmp) / "data", Path(tmp) / "home"
        copy_dataset(args.data, copy, args.images, 0, args.seed)
        truth = inject(copy, args.flips, args.exact, 0, np.random.default_rng(args.seed))
        simimg.build_index(copy, NAME, home, device=args.device, image_size=args.image_size, weights=args.weights)
        val, clean = true_val(copy, home, truth)
        began = time.perf_counter()
        before = simimg.train(copy, NAME, home, head_only=True, device=args.device, seed=args.seed)
        seconds = round(time.perf_counter() - began, 1)
        report = simimg.audit(copy, NAME, home, device=args.device, seed=args.seed)
        flagged = len(report.label_issues)
        counts = {"accepted": 0, "groups_kept_one": 0, **score({}, set(), truth)}
        rows = [{"accept_top": "before", **counts, **accuracies(before, home, val), "seconds": seconds}]
        for label, top in tops(args.accept_top, flagged):
            rows.append({"accept_top": label, **repair(copy, home, report, top, truth, val, args)})
    summary = {
        "benchmark": "label_repair",
        "data": str(args.data or "generated"),
        "images": report.summary["images"],
        "image_size": args.image_size,
        "model": "random-init densenet121" if args.weights == "none" else f"densenet121 from {args.weights}",
        "flips_injected": len(truth.flips),
        "copies_injected": len(truth.exact),
        "label_issues_flagged": flagged,
        "val_true_before": rows[0]["val_true"],
        "val_reported_before": rows[0]["val_reported"],
        "c_before": rows[0]["c"],
        **clean,
        "runs": rows[1:],
        "seconds": round(time.perf_counter() - started, 1),
        "hardware": hardware(resolve_device(args.device)),
    }
    title = "accept the audit's top K, keep one of each cross-class copy, refit (val accuracy vs true labels)"
    finish(title, rows, summary, args.json)


def tops(text: str, flagged: int) -> list[tuple[str, int | None]]:
    """(as given, K) for each value of --accept-top: "all" is None (every open suggestion), "N%" a share of the
    label issues flagged (at least 1 when any are), N as it is."""
    out: list[tuple[str, int | None]] = []
    for value in (v.strip() for v in text.split(",") if v.strip()):
        if value == "all":
            out.append((value, None))
        elif value.endswith("%"):
            out.append((value, max(1, round(flagged * float(value[:-1]) / 100)) if flagged else 0))
        else:
            out.append((value, int(value)))
    return out


def true_val(copy: Path, home: Path, truth: Injected) -> tuple[TrueVal, dict]:
    """The original val images with their true classes (vectors as first indexed), and the val accuracy (and C) of a
    head fitted on the train images' true labels, the injected copies left out of both."""
    split, x, vx = indexed_split(copy, IndexFolder.of(home, NAME))
    copies = {target for _, target, _ in truth.exact}

    def kept(records: tuple[Record, ...]) -> tuple[list[int], list[str]]:
        rows = [i for i, r in enumerate(records) if r.path not in copies]
        return rows, [truth.flips.get(records[i].path, records[i].label) for i in rows]

    (train_rows, train_labels), (val_rows, val_labels) = kept(split.train), kept(split.val)
    number = {c: i for i, c in enumerate(split.classes)}
    head = fit_head(x[train_rows], np.array([number[c] for c in train_labels]), len(split.classes))
    predicted = head.logits(vx[val_rows]).argmax(axis=1)
    clean = float(np.mean([split.classes[p] == t for p, t in zip(predicted, val_labels)]))
    return TrueVal(vx[val_rows], val_labels), {"val_true_clean": clean, "c_clean": head.c}


def accuracies(report: TrainReport, home: Path, val: TrueVal) -> dict:
    """The served head (the model `train` just made) on the true val set, the accuracy train reported, and the C
    its fit chose (the val accuracy of these heads moves by several points with C)."""
    loaded = load_model(IndexFolder.of(home, NAME), report.model)
    with torch.no_grad():
        predicted = loaded.net.logits(torch.from_numpy(val.vectors)).argmax(dim=1).tolist()
    right = [loaded.bundle.classes[p] == t for p, t in zip(predicted, val.labels)]
    assert report.head is not None, "a head-only run reports its head"
    return {"val_true": float(np.mean(right)), "val_reported": report.val_accuracy, "c": report.head["C"]}


def repair(
    copy: Path, home: Path, report: AuditReport, top: int | None, truth: Injected, val: TrueVal, args: Namespace
) -> dict:
    """One user's repair from the audit: accept its top `top` suggestions (none when 0), keep the first path of each
    cross-class exact group, refit the head; scored, then every batch undone. Relabels are read right after the
    accept (a later exclusion of the same image replaces its relabel among the edits in force)."""
    started = time.perf_counter()
    accepting = top != 0 and len(report.label_issues) > 0  # accept_suggestions refuses an audit with nothing to accept
    if accepting:
        simimg.accept_suggestions(NAME, top=top, home=home)
    relabelled = {e["path"]: e["new_label"] for e in simimg.label_edits(NAME, home) if e["action"] == "set"}
    groups = [d["paths"] for d in report.duplicates if d["kind"] == "exact" and d["cross_class"]]
    for group in groups:
        simimg.keep_one(NAME, group[0], group, home)
    after = simimg.train(copy, NAME, home, head_only=True, device=args.device, seed=args.seed)
    seconds = round(time.perf_counter() - started, 1)
    excluded = {e["path"] for e in simimg.label_edits(NAME, home) if e["action"] == "exclude"}
    counts = {"accepted": len(relabelled), "groups_kept_one": len(groups), **score(relabelled, excluded, truth)}
    undone = undo_all(home)
    assert undone == accepting + len(groups), (undone, top, len(groups))
    return {**counts, **accuracies(after, home, val), "seconds": seconds}


def undo_all(home: Path) -> int:
    """Take back every batch in force, newest first; how many there were."""
    batches = 0
    while simimg.label_edits(NAME, home):
        simimg.undo_labels(NAME, home)
        batches += 1
    return batches


def score(relabelled: dict[str, str], excluded: set[str], truth: Injected) -> dict:
    """What the relabels (path -> new label) and exclusions did to the injected problems and to the right labels."""
    copies = {target: source for source, target, _ in truth.exact}
    sources = set(copies.values())
    fixed = sum(relabelled.get(path) == label for path, label in truth.flips.items())
    resolved = [(s, t) for t, s in copies.items() if (s in excluded) != (t in excluded)]
    kept_wrong = sum(relabelled.get(t, t.split("/")[1]) != s.split("/")[1] for s, t in resolved if s in excluded)
    return {
        "flips_fixed": fixed,
        "flips_relabelled_wrong": sum(p in relabelled for p in truth.flips) - fixed,
        "copies_resolved": len(resolved),
        "copies_kept_wrong_label": kept_wrong,
        "copies_relabelled_right": sum(relabelled.get(t) == s.split("/")[1] for t, s in copies.items()),
        "correct_relabelled": sum(p not in truth.flips and p not in copies for p in relabelled),
        "others_excluded": sum(p not in copies and p not in sources for p in excluded),
    }


if __name__ == "__main__":
    main()
