"""Recall of `simimg audit` on problems injected into a copy of a labelled folder, and its precision on label flips.

    python benchmarks/audit_recall.py --data ../shared/datasets/hymenoptera --image-size 96 --json
    python benchmarks/audit_recall.py --data ../shared/datasets/hymenoptera --image-size 96 --epochs 20 --json

Copies DATA (train/ and val/ class folders; a temporary copy, the original is never touched) and injects:
label flips (an image moved to another class folder of its split), exact copies filed under another class (half of
them in the other split too), and near-duplicates across splits (a train image resized to 3/4 and re-encoded as
JPEG quality 75, filed in val under its own class). Then indexes the copy with random-init DenseNet-121 features
(`--weights none`: no download), optionally trains that model from scratch for `--epochs` and serves it, audits the
copy, and reports the recall of each kind, the precision of the label issues on the flips, and whether every group
of byte-identical files (hashed here, the dataset's own ones included) is reported as an exact duplicate.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

import simimg
from _common import Injected, copy_dataset, finish, hardware, inject, parser
from simimg.models.device import resolve_device


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", help="a folder with train/ and val/ class folders; default: --images generated JPEGs")
    p.add_argument("--images", type=int, default=64, help="how many JPEGs to generate per split without --data")
    p.add_argument("--per-class", type=int, default=0, help="copy at most this many images per split and class")
    p.add_argument("--flips", type=int, default=20)
    p.add_argument("--exact", type=int, default=10)
    p.add_argument("--near", type=int, default=10)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=0, help="train the model from scratch first (0: random-init features)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        copy, home = Path(tmp) / "data", Path(tmp) / "home"
        copy_dataset(args.data, copy, args.images, args.per_class, args.seed)
        truth = inject(copy, args.flips, args.exact, args.near, np.random.default_rng(args.seed))
        identical = identical_files(copy)
        options = {"device": args.device, "image_size": args.image_size, "weights": "none"}
        simimg.build_index(copy, "audit", home, **options)
        if args.epochs:
            simimg.train(copy, "audit", home, epochs=args.epochs, seed=args.seed, **options)
        report = simimg.audit(copy, "audit", home, device=args.device, seed=args.seed)
    rows, figures = score(report.to_dict(), truth, identical)
    model = f"densenet121 trained from scratch, {args.epochs} epochs" if args.epochs else "random-init densenet121"
    summary = {
        "benchmark": "audit_recall",
        "data": str(args.data or "generated"),
        "images": report.summary["images"],
        "image_size": args.image_size,
        "model": model,
        **figures,
        "near_threshold": report.summary["near_threshold"],
        "audit_s": report.summary["seconds"],
        "hardware": hardware(resolve_device(args.device)),
    }
    finish(f"simimg audit on injected problems ({model})", rows, summary, args.json)


def identical_files(root: Path) -> list[set[str]]:
    """Groups of byte-identical files, by our own sha256: the exact duplicates the audit must all report."""
    groups: dict[str, set[str]] = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            groups.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), set()).add(str(f.relative_to(root)))
    return [g for g in groups.values() if len(g) > 1]


def score(report: dict, truth: Injected, identical: list[set[str]]) -> tuple[list[dict], dict]:
    """One row per injected kind (injected, found, recall) and the summary's figures."""
    groups = [(set(d["paths"]), d) for d in report["duplicates"]]

    def found(a: str, b: str, kind: str | None = None) -> dict | None:
        return next((d for paths, d in groups if {a, b} <= paths and kind in (None, d["kind"])), None)

    exact = [found(a, b, "exact") for a, b, _ in truth.exact]
    exact_ok = sum(
        d is not None and d["cross_class"] and d["cross_split"] == crosses
        for d, (_, _, crosses) in zip(exact, truth.exact)
    )
    near_ok = sum(d is not None and d["cross_split"] for d in (found(a, b) for a, b in truth.near))
    flagged = [i["path"] for i in report["label_issues"]]
    hits = [p for p in flagged if p in truth.flips]
    top = flagged[: len(truth.flips)]
    reported = [set(d["paths"]) for d in report["duplicates"] if d["kind"] == "exact"]
    every_exact = sum(g in reported for g in identical)
    rows = [
        {"kind": "exact copy, cross-class (half cross-split)", "injected": len(truth.exact), "found": exact_ok},
        {"kind": "near-duplicate (3/4 size, JPEG q75), cross-split", "injected": len(truth.near), "found": near_ok},
        {"kind": "label flip (among all label issues)", "injected": len(truth.flips), "found": len(hits)},
        {
            "kind": "byte-identical groups in the copy (ours by sha256)",
            "injected": len(identical),
            "found": every_exact,
        },
    ]
    for row in rows:
        row["recall"] = row["found"] / row["injected"] if row["injected"] else None
    figures = {
        "exact_recall": rows[0]["recall"],
        "near_recall": rows[1]["recall"],
        "flip_recall": rows[2]["recall"],
        "flip_precision": len(hits) / len(flagged) if flagged else None,
        "label_issues": len(flagged),
        "flip_precision_at_injected": sum(p in truth.flips for p in top) / len(top) if top else None,
        "flip_suggested_true_class": sum(
            i["suggested"] == truth.flips[i["path"]] for i in report["label_issues"] if i["path"] in truth.flips
        ),
        "identical_groups": len(identical),
        "identical_groups_reported": every_exact,
        "near_findings": report["summary"]["near_duplicates"],
        "outliers": len(report["outliers"]),
    }
    return rows, figures


if __name__ == "__main__":
    main()
