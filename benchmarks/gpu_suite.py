"""Every CUDA check in one run, for a lent GPU machine: `gpu` tests, cats_dogs trained from scratch and evaluated,
index throughput, search at 1M and warm-query latency; one JSON summary.

    bash benchmarks/gpu_suite.sh                     # on the GPU machine (installs the carried wheels first)
    python benchmarks/gpu_suite.py --cpu-smoke       # every step at tiny sizes on the CPU (tests run this)

Each step is the same command a person would type (`simimg train`, `benchmarks/*.py --json`, pytest), run in its
own process with its own time limit inside the suite's budget; a step that fails or runs out of time is recorded
as such and the suite goes on. The data comes from `--data` (made by benchmarks/prepare_device_data.py: a
downscaled cats_dogs); `--cpu-smoke` generates tiny stand-ins instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from _common import make_jpegs
from _suite import ROOT, Step, last_json_line, run_steps, suite_env, summarize, train_figures


@dataclass(frozen=True)
class Sizes:
    """How big each step runs: the real suite on an H100, or the CPU smoke test."""

    device: str
    tiny: list[str]  # model flags of every step (the smoke test shrinks the images)
    epochs: list[str]  # `simimg train` flags beyond the default recipe
    index_images: int
    index_batch: int
    search_n: int
    search_queries: int
    gallery: int
    queries: int
    repeats: int
    slack: float  # times each step's limit: a shared 2-core box runs even the tiny steps slowly


GPU = Sizes("cuda", [], [], 8192, 256, 1_000_000, 200, 64, 50, 2, 1.0)
SMOKE = Sizes("cpu", ["--image-size", "32"], ["--epochs", "1"], 16, 8, 3000, 10, 4, 2, 1, 10.0)


# the figures worth a glance in the summary
HEADLINE = {
    "gpu_tests": ("passed", "failures", "errors", "skipped"),
    "train_cats_dogs": ("val_accuracy", "best_epoch", "epochs", "seconds", "images_per_s_last_epoch"),
    "evaluate_cats_dogs": ("accuracy", "p_at_10", "map"),
    "index_throughput": ("end_to_end_img_s", "model_only_img_s", "ratio_model_only", "ratio_baseline", "precision"),
    "search_1m": ("N", "gpu_ms_per_query", "gpu_recall_at_k", "ivf_ms_per_query", "ivf_recall_at_k"),
    "query_latency": ("query_p50_ms", "query_p95_ms", "forward_p50_ms", "precision"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / ".device-data"), help="folder made by prepare_device_data.py")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "artifacts" / "gpu_suite"),
        help="where gpu_suite.json and gpu_suite.log go (default $OUT, else artifacts/gpu_suite)",
    )
    p.add_argument(
        "--budget-s", type=float, help="start no step after this many seconds (default 570; no limit with --cpu-smoke)"
    )
    p.add_argument("--cpu-smoke", action="store_true", help="every step at tiny sizes on the CPU, generated data")
    p.add_argument("--only", help="comma list of step names to run (default: all)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, open(out / "gpu_suite.log", "w") as log:
        sizes = SMOKE if args.cpu_smoke else GPU
        budget = args.budget_s or (float("inf") if args.cpu_smoke else 570.0)
        data = _smoke_data(Path(tmp)) if args.cpu_smoke else Path(args.data)
        steps = _steps(sizes, data, Path(tmp))
        wanted = set(args.only.split(",")) if args.only else set(steps)
        results = run_steps(steps, wanted, budget, sizes.slack, suite_env(data), log, {})
    about = {"cpu_smoke": args.cpu_smoke, "device": sizes.device, "data": str(data)}
    summary = summarize("gpu", results, started, HEADLINE, **about)
    (out / "gpu_suite.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


def _steps(sizes: Sizes, data: Path, tmp: Path) -> dict[str, Step]:
    """The suite, in order: the commands a person would type, at `sizes`."""
    py, home, bench = sys.executable, str(tmp / "home"), ROOT / "benchmarks"
    cats_dogs, device, junit = str(data / "cats_dogs"), ["--device", sizes.device], tmp / "gpu_tests.xml"
    cli = [py, "-m", "simimg.cli"]
    return {
        "gpu_tests": Step(
            lambda: [
                py,
                "-m",
                "pytest",
                "-o",
                "addopts=",  # not the fast tier's: no xdist workers (the GPU machine may lack pytest-xdist)
                "-m",
                "gpu",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
                *_files_with_gpu_tests(),
            ],
            lambda _: _junit_counts(junit),
            150,
        ),
        "train_cats_dogs": Step(
            lambda: [
                *cli,
                "train",
                cats_dogs,
                "--name",
                "cats_dogs",
                "--home",
                home,
                "--weights",
                "none",
                *device,
                *sizes.tiny,
                *sizes.epochs,
                "--json",
            ],
            train_figures,
            240,
        ),
        "evaluate_cats_dogs": Step(
            lambda: [*cli, "evaluate", cats_dogs, "--name", "cats_dogs", "--home", home, *device, "--json"],
            _evaluate_figures,
            60,
        ),
        "index_throughput": Step(
            lambda: [
                py,
                str(bench / "index_throughput.py"),
                *device,
                *sizes.tiny,
                "--folder",
                str(_photos(data / "cats_dogs", tmp / "photos", sizes.index_images)),
                "--batch-size",
                str(sizes.index_batch),
                "--repeats",
                str(sizes.repeats),
                "--json",
            ],
            last_json_line,
            180,
        ),
        "search_1m": Step(
            lambda: [
                py,
                str(bench / "search.py"),
                *device,
                "--n",
                str(sizes.search_n),
                "--queries",
                str(sizes.search_queries),
                "--json",
            ],
            last_json_line,
            150,
        ),
        "query_latency": Step(
            lambda: [
                py,
                str(bench / "query_latency.py"),
                *device,
                *sizes.tiny,
                "--images",
                str(sizes.gallery),
                "--queries",
                str(sizes.queries),
                "--no-int8",  # int8 runs on OpenVINO only: the CPU's figure comes from benchmarks/README.md's run
                "--json",
            ],
            last_json_line,
            60,
        ),
    }


def _evaluate_figures(stdout: str) -> dict:
    result = json.loads(stdout)
    retrieval = result["retrieval"]
    return {
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "images": result["images"],
        **{key: retrieval[key] for key in ("p_at_1", "p_at_10", "map", "gallery", "gallery_size")},
    }


def _junit_counts(junit: Path) -> dict:
    suite = ElementTree.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
    }


def _files_with_gpu_tests() -> list[str]:
    """Only the test files that hold `gpu` tests: others may import what that machine lacks (a browser, streamlit)."""
    return sorted(str(path) for path in (ROOT / "tests").glob("test_*.py") if "pytest.mark.gpu" in path.read_text())


def _photos(source: Path, target: Path, count: int) -> Path:
    """`count` real photos in class folders, copies of `source`'s (cycled), so the run is long enough to time."""
    files = sorted(path for path in source.rglob("*.jpg") if path.is_file())
    if not files:
        return target  # the step then fails with simimg's own "no images" message
    for i in range(count):
        path = files[i % len(files)]
        copy = target / path.parent.name / f"{i:06d}_{path.name}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    return target


def _smoke_data(tmp: Path) -> Path:
    """A tiny cats_dogs stand-in (train/ and val/ folders of generated JPEGs) for --cpu-smoke."""
    for split, count in (("train", 12), ("val", 6)):
        make_jpegs(tmp / "data" / "cats_dogs" / split, count, size=(64, 48), seed=len(split))
    return tmp / "data"


if __name__ == "__main__":
    main()
