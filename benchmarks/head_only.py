"""`simimg train --head-only` wall time, as a user runs it, against one epoch of full fine-tuning in the same run.

    python benchmarks/head_only.py --data ../shared/datasets/hymenoptera --json

Indexes DATA first (random-init DenseNet-121, `--weights none`: no download), then times the real command in a
fresh process (Python start, imports, catalog read, the fit, the model version, the published index version),
then one epoch of the full fine-tune on the same folder (`--epochs 1 --no-index`), and checks that a `simimg
index` afterwards embeds nothing. The target (issue 9): head-only <= 10 s on hymenoptera on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import finish, hardware, make_jpegs, median, parser
from simimg.models.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        help="a folder of class folders (train/ and val/ are used when present); default: --images generated JPEGs",
    )
    p.add_argument("--images", type=int, default=64, help="how many JPEGs to generate when no --data is given")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--no-baseline", action="store_true", help="skip the fine-tuning epoch (quick check)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as home:
        args.data = args.data or str(make_jpegs(Path(home) / "photos", args.images, classes=2))
        common = ["--home", home, "--name", "bench", "--device", args.device]
        index = simimg("index", args.data, *common, "--weights", "none", "--image-size", str(args.image_size))
        rows = []
        for r in range(args.repeats):
            seconds, report = timed(simimg, "train", args.data, *common, "--head-only")
            row = {
                "repeat": r,
                "head_only_s": seconds,
                "val_accuracy": report["val_accuracy"],
                "from_catalog": report["head"]["from_catalog"],
                "embedded": report["head"]["embedded"],
            }
            rows.append(row)
        after = simimg("index", args.data, *common)
        baseline_s = (
            None
            if args.no_baseline
            else timed(
                simimg,
                "train",
                args.data,
                *common,
                "--weights",
                "none",
                "--image-size",
                str(args.image_size),
                "--epochs",
                "1",
                "--no-index",
            )[0]
        )
    head_s = median([r["head_only_s"] for r in rows])
    summary = {
        "benchmark": "head_only",
        "data": str(args.data),
        "images": index["total"],
        "image_size": args.image_size,
        "index_s": index["seconds"],
        "head_only_s": head_s,
        "val_accuracy": rows[-1]["val_accuracy"],
        "embedded": rows[-1]["embedded"],
        "index_after_embedded": after["indexed"],
        "fine_tune_epoch_s": baseline_s,
        "ratio_fine_tune_epoch": None if baseline_s is None else baseline_s / head_s,
        "target_s": 10.0,
        "met": head_s <= 10.0 and after["indexed"] == 0,
        "hardware": hardware(resolve_device(args.device)),
    }
    finish("simimg train --head-only (wall seconds, fresh process)", rows, summary, args.json)


def simimg(*args: str) -> dict:
    """The real command in a fresh process, as a user runs it; its --json report."""
    env = {**os.environ, "SIMIMG_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "simimg.cli", *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode:
        raise SystemExit(f"simimg {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


if __name__ == "__main__":
    main()
