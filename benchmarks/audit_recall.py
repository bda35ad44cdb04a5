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
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import simimg
from _common import finish, hardware, make_jpegs, parser
from simimg.models.device import resolve_device

SPLITS = ("train", "val")


@dataclass
class Injected:
    """What was done to the copy, by path relative to it."""

    flips: dict[str, str] = field(default_factory=dict)  # moved image -> its true class
    exact: list[tuple[str, str, bool]] = field(default_factory=list)  # (original, copy, crosses splits)
    near: list[tuple[str, str]] = field(default_factory=list)  # (train original, val re-encoding)


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


def copy_dataset(data: str | None, copy: Path, images: int, per_class: int, seed: int) -> None:
    """DATA's train/ and val/ class folders (at most `per_class` images each, a seeded pick), or generated JPEGs."""
    if data is None:
        for i, split in enumerate(SPLITS):
            make_jpegs(copy / split, images, size=(160, 120), seed=seed + i)
        return
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        folders = (
            sorted(d for d in (Path(data) / split).iterdir() if d.is_dir()) if (Path(data) / split).is_dir() else []
        )
        if not folders:
            raise SystemExit(f"{data} has no {split}/ class folders: the injected leaks need train/ and val/")
        for folder in folders:
            files = sorted(f for f in folder.iterdir() if f.is_file())
            if per_class:
                files = [files[i] for i in sorted(rng.permutation(len(files))[:per_class])]
            (copy / split / folder.name).mkdir(parents=True)
            for f in files:
                shutil.copy2(f, copy / split / folder.name / f.name)


def inject(copy: Path, flips: int, exact: int, near: int, rng: np.random.Generator) -> Injected:
    """Label flips, cross-class exact copies and cross-split near-duplicates, on distinct images of the copy."""
    files = sorted(str(f.relative_to(copy)) for f in copy.glob("*/*/*") if f.is_file())
    classes = sorted({f.split("/")[1] for f in files})
    train = [f for f in files if f.startswith("train/")]
    near_sources = [train[i] for i in rng.permutation(len(train))[:near]]
    rest = [f for f in files if f not in set(near_sources)]
    picked = [rest[i] for i in rng.permutation(len(rest))[: flips + exact]]
    truth = Injected()
    for i, source in enumerate(near_sources):
        target = f"val/{source.split('/')[1]}/near_{i:03d}.jpg"
        with Image.open(copy / source) as image:
            rgb = image.convert("RGB")
            rgb.resize((rgb.width * 3 // 4, rgb.height * 3 // 4), Image.Resampling.BILINEAR).save(
                copy / target, quality=75
            )
        truth.near.append((source, target))
    for i, source in enumerate(picked[flips:]):
        split, label, name = source.split("/")
        other_split = SPLITS[1 - SPLITS.index(split)] if i % 2 else split
        target = f"{other_split}/{_other(label, classes, rng)}/exact_{i:03d}{Path(name).suffix}"
        shutil.copy2(copy / source, copy / target)
        truth.exact.append((source, target, other_split != split))
    for source in picked[:flips]:
        split, label, name = source.split("/")
        target = f"{split}/{_other(label, classes, rng)}/flip_{name}"
        (copy / source).rename(copy / target)
        truth.flips[target] = label
    return truth


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


def _other(label: str, classes: list[str], rng: np.random.Generator) -> str:
    return str(rng.choice([c for c in classes if c != label]))


if __name__ == "__main__":
    main()
