"""Every CPU speed figure of issue 21 in one run: the int8, bf16 and float32 model-only rates, the int8 gate on
hymenoptera and cats_dogs (random-init features and a model fine-tuned here), end to end over model-only at 512 and
64 images, warm query latency with int8, and the 2M-vector compressed build's peak memory; one JSON summary.

    python benchmarks/cpu_suite.py --json                       # ~1 hour on 2 cores
    python benchmarks/cpu_suite.py --gate-weights HOME/NAME/models/FP --scale-n 200000 --json   # shorter

Each step is the same command benchmarks/README.md gives for its figure, run in its own process (benchmarks/_suite.py);
nothing else should run meanwhile. The fine-tuned model is cats_dogs trained from scratch at 112 px (`--epochs`,
default 5), unless `--gate-weights` names a model folder already made. The datasets come from $SIMIMG_DATASETS or
../shared/datasets; `--dry-run` prints the commands without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _suite import ROOT, Step, last_json_line, run_steps, suite_env, summarize, train_figures

GATE_SIZE = "112"  # the fine-tuned model's image size: cats_dogs from scratch learns something at 112 px in minutes
HEADLINE = {
    "train_gate_model": ("val_accuracy", "epochs", "seconds"),
    "index_512": (
        "int8_model_only_img_s",
        "bf16_model_only_img_s",
        "openvino_fp32_model_only_img_s",
        "ratio_int8_over_bf16_model_only",
        "ratio_model_only",
        "first_index_s",
        "gate",
        "gates",
    ),
    "index_64": ("ratio_model_only", "end_to_end_img_s", "model_only_img_s"),
    "gate_fine_tuned": ("gates", "ratio_int8_over_bf16_model_only"),
    "query_latency": ("query_p50_ms", "int8_query_p50_ms", "forward_p50_ms", "int8_forward_p50_ms", "int8_gate"),
    "scale": ("n", "peak_anon_mib", "peak_rss_mib", "recall_at_10", "ms_per_query", "index_bytes", "flat_bytes"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("SIMIMG_DATASETS") or str(ROOT.parent / "shared" / "datasets")
    p.add_argument("--data", default=default_data, help="the folder holding hymenoptera/ and cats_dogs/")
    p.add_argument("--gate-weights", help="a fine-tuned model folder to gate (default: train one, see --epochs)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the cats_dogs model trained for the gate")
    p.add_argument("--scale-n", type=int, default=2_000_000, help="vectors of the compressed build (1024-d)")
    p.add_argument("--only", help="comma list of step names to run (default: all)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "cpu_suite"), help="where cpu_suite.json/.log go")
    p.add_argument("--dry-run", action="store_true", help="print each step's command, run nothing")
    p.add_argument("--json", action="store_true", help="end with the summary as one JSON line")
    args = p.parse_args()
    out = Path(args.out)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results: dict = {}
        steps = _steps(args, Path(args.data), Path(tmp), results)
        wanted = set(args.only.split(",")) if args.only else set(steps)
        if args.dry_run:
            for name, step in steps.items():
                if name in wanted:
                    print(f"{name}: {' '.join(step.command())}")
            return
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "cpu_suite.log", "w") as log:
            run_steps(steps, wanted, float("inf"), 1.0, suite_env(Path(args.data)), log, results)
    summary = summarize("cpu", results, started, HEADLINE, data=args.data)
    (out / "cpu_suite.json").write_text(json.dumps(summary, indent=2))
    for key, value in summary["headline"].items():
        print(f"{key}: {json.dumps(value)}")
    if args.json:
        print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


def _steps(args: argparse.Namespace, data: Path, tmp: Path, results: dict) -> dict[str, Step]:
    """The suite, in order; `results` fills as steps finish (the fine-tuned gate reads the trained model's)."""
    py, bench, home = sys.executable, ROOT / "benchmarks", tmp / "home"
    throughput = [py, str(bench / "index_throughput.py"), "--device", "cpu"]
    gates = ["--gate-data", str(data / "hymenoptera"), "--gate-data", str(data / "cats_dogs")]

    def fine_tuned() -> str:
        if args.gate_weights:
            return args.gate_weights
        if args.dry_run:
            return str(home / "gate_model" / "models" / "<the trained model's fingerprint>")
        return str(home / "gate_model" / "models" / results["train_gate_model"]["result"]["model"])

    steps = {
        "train_gate_model": Step(
            lambda: [
                *(py, "-m", "simimg.cli", "train", str(data / "cats_dogs"), "--name", "gate_model", "--home"),
                *(str(home), "--weights", "none", "--image-size", GATE_SIZE, "--epochs", str(args.epochs), "--json"),
            ],
            train_figures,
            3600,
        ),
        "index_512": Step(
            lambda: [*throughput, "--images", "512", "--repeats", "3", *gates, "--json"], last_json_line, 3600
        ),
        "index_64": Step(
            lambda: [*throughput, "--images", "64", "--repeats", "3", "--no-int8", "--no-first-index", "--json"],
            last_json_line,
            1200,
        ),
        "gate_fine_tuned": Step(
            lambda: [
                *(*throughput, "--images", "64", "--repeats", "1", "--image-size", GATE_SIZE, "--no-first-index"),
                *(*gates, "--gate-weights", fine_tuned(), "--json"),
            ],
            last_json_line,
            1800,
        ),
        "query_latency": Step(
            lambda: [py, str(bench / "query_latency.py"), "--device", "cpu", "--queries", "50", "--json"],
            last_json_line,
            1200,
        ),
        "scale": Step(
            lambda: [
                *(py, str(bench / "scale.py"), "--n", str(args.scale_n), "--dim", "1024", "--queries", "200"),
                *("--nprobe", "16,32", "--on-disk", "--json"),
            ],
            last_json_line,
            5400,
        ),
    }
    if args.gate_weights:
        del steps["train_gate_model"]
    return steps


if __name__ == "__main__":
    main()
