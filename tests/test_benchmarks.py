"""Every benchmark script runs on tiny sizes and ends with one JSON line holding its required figures.

No timing is asserted here: speed claims live in benchmarks/README.md, measured as ratios in one run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # each case is a fresh Python running a whole script

TINY_MODEL = ["--image-size", "32", "--repeats", "1"]
# this checkout's simimg first, whatever an installed copy points at (a script's own folder is sys.path[0])
BENCH_ENV = {
    **os.environ,
    "SIMIMG_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}

# each script's arguments for a tiny run; the scripts the GPU suite runs take its arguments
ARGS = {
    "active_labeling.py": ["--images", "40", "--start", "2", "--batch", "4", *TINY_MODEL],
    "audit_recall.py": ["--images", "12", "--flips", "2", "--exact", "2", "--near", "2", "--image-size", "32"],
    "head_only.py": ["--images", "12", "--sizes", "200x4", "--dim", "64", *TINY_MODEL],
    "label_repair.py": [
        "--images",
        "16",
        "--flips",
        "2",
        "--exact",
        "2",
        "--image-size",
        "32",
        "--accept-top",
        "0,all",
    ],
    "scale.py": ["--n", "3000", "--dim", "32", "--queries", "10", "--nprobe", "8"],
    "index_engines.py": ["--images", "8", "--batch-size", "4", "--repeats", "1", "--image-size", "32"],
    "serve_load.py": [
        "--gallery",
        "8",
        "--image-size",
        "32",
        "--requests",
        "8",
        "--concurrency",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
    ],
    "serve_soak.py": [
        "--minutes",
        "0.1",
        "--warmup-s",
        "2",
        "--sample-s",
        "1",
        "--gallery",
        "8",
        "--image-size",
        "32",
        "--concurrency",
        "2",
    ],
    "train_throughput.py": ["--images", "16", "--batch-size", "4", "--epochs", "1", "--workers", "0", *TINY_MODEL],
}
# the figures each script's JSON line must hold
REQUIRED = {
    "active_labeling.py": {
        "pool",
        "start_labels",
        "full_label_accuracy",
        "labels_needed_uncertainty",
        "labels_needed_random",
        "ratio_random_over_uncertainty",
        "curves",
    },
    "audit_recall.py": {"exact_recall", "identical_groups", "near_threshold", "audit_s"},
    "index_throughput.py": {
        "device",
        "precision",
        "runtime",
        "images",
        "end_to_end_img_s",
        "model_only_img_s",
        "baseline_img_s",
        "ratio_model_only",
        "ratio_fp32_model_only",
        "ratio_baseline",
        "first_index_s",
        "stage_ms",
        "int8_model_only_img_s",  # None where int8 does not run (CUDA, torch): the keys are always there
        "ratio_int8_over_bf16_model_only",
        "gate",
    },
    "head_only.py": {"images", "head_only_s", "index_after_embedded", "sets", "min_ratio_grid"},
    "label_repair.py": {"images", "flips_injected", "copies_injected", "label_issues_flagged", "runs", "seconds"},
    "scale.py": {
        "n",
        "dim",
        "index",
        "build_s",
        "peak_rss_mib",
        "index_bytes",
        "flat_bytes",
        "recall_at_10",
        "ms_per_query",
        "peak_anon_mib",
        "on_disk",
        "search_peak_rss_mib",
    },
    "search.py": {"N", "dim", "ivf_ms_per_query", "ivf_recall_at_k", "flat_ms_per_query", "rows"},
    "query_latency.py": {
        "device",
        "precision",
        "runtime",
        "query_p50_ms",
        "query_p95_ms",
        "forward_p50_ms",
        "ratio_query_over_forward_p50",
        "ratio_fp32_query_p50",
        "peak_rss_mib",
        "second_copy_mib",
        "int8_query_p50_ms",  # None where int8 does not run (CUDA, torch)
        "ratio_int8_query_p50",
        "int8_gate",
    },
    "index_engines.py": {"images", "local_s", "ray_s", "ratio_ray_over_local", "min_cosine", "same_result"},
    "serve_load.py": {
        "requests",
        "concurrency",
        "errors",
        "p50_ms",
        "p99_ms",
        "rps",
        "rps_unbatched",
        "ratio",
        "server_peak_rss_mib",
    },
    "serve_soak.py": {"requests", "answers", "errors", "rss_warm_mib", "rss_growth_after_warmup", "p99_ms_per_minute"},
    "train_throughput.py": {"device", "train_img_s", "raw_step_img_s", "ratio_raw"},
}


# the scripts benchmarks/gpu_suite.sh runs, checked on its --cpu-smoke results (one process fewer each)
IN_GPU_SUITE = {
    "index_throughput": "index_throughput.py",
    "search_1m": "search.py",
    "query_latency": "query_latency.py",
}


def check_result(script: str, result: dict) -> None:
    """What every run of `script` must print: its required figures, positive, and no errors."""
    required = REQUIRED[script]
    assert required <= set(result), required - set(result)
    assert all(result[key] > 0 for key in required if isinstance(result[key], float))
    assert result.get("index_after_embedded", 0) == 0
    assert result.get("errors", 0) == 0
    if script == "scale.py":  # the compressed index is a fraction of float32 and finds what exact search finds
        assert result["index_bytes"] < result["flat_bytes"] and result["recall_at_10"] >= 0.9
    if script == "serve_soak.py":  # every kind of request was sent and answered as designed; memory was read
        assert {a.split()[0] for a in result["answers"]} == {"query", "embed", "not_an_image", "too_many"}
        assert result["rss_start_mib"] > 0 and result["unexpected_errors"] == {}
    if script == "head_only.py":  # the new fit and the grid search it replaced, on the same vectors
        assert [s["set"] for s in result["sets"]] == ["generated 200x4"]
        assert all(s["ratio_grid"] > 0 and 0 <= s["val_accuracy"] <= 1 for s in result["sets"])
    if script == "audit_recall.py":  # every byte-identical group, injected or not, is reported
        assert result["exact_recall"] == 1.0 and result["identical_groups_reported"] == result["identical_groups"]
        assert 0 <= result["near_recall"] <= 1 and 0 <= result["flip_recall"] <= 1
    if script == "index_throughput.py":  # two fresh `simimg index` processes: an empty model cache, then a filled one
        assert set(result["first_index_s"]) == {"cold", "warm"} and min(result["first_index_s"].values()) > 0
        assert set(result["stage_ms"]) == {"read_hash", "decode", "resize"} and min(result["stage_ms"].values()) >= 0
    if script == "active_labeling.py":
        check_active_labeling(result)
    if script == "label_repair.py":
        check_label_repair(result)
    if result.get("precision") == "bf16" or result.get("runtime") == "openvino":  # and torch float32 in the same run
        assert {"fp32_model_only_img_s", "fp32_query_p50_ms"} & set(result), result


def check_active_labeling(result: dict) -> None:
    """Labels needed lie between the start and the pool, each curve grows by the batch from the start labels, first
    reaches the target where its run says (and stops there unless --full-curve), and the ratio is the medians'."""
    start, pool, batch, target = (result[k] for k in ("start_labels", "pool", "batch", "target_accuracy"))
    for order in ("uncertainty", "random"):
        needed = result[f"labels_needed_{order}"]
        assert needed is None or (isinstance(needed, int) and start <= needed <= pool), needed
        runs = result[f"labels_needed_{order}_runs"]
        assert needed in runs and len(runs) == len(result["curves"][order])
        for run, curve in zip(runs, result["curves"][order]):
            counts, accuracies = [n for n, _ in curve], [a for _, a in curve]
            steps = [b - a for a, b in itertools.pairwise(counts)]
            assert counts[0] == start and all(s == batch for s in steps[:-1]) and min(steps, default=1) > 0, counts
            assert max(steps, default=0) <= batch, counts
            assert counts[-1] <= pool and all(0 <= a <= 1 for a in accuracies)
            reached = [a >= target - 1e-4 for a in accuracies]  # the curve's accuracies have 4 decimals
            if run is None:
                assert counts[-1] == pool and not any(a >= target + 1e-4 for a in accuracies), curve
            else:
                at = counts.index(run)
                assert reached[at] and not any(a >= target + 1e-4 for a in accuracies[:at]), (run, curve)
                assert result["full_curve"] or counts[-1] == run
    by_uncertainty, by_random = result["labels_needed_uncertainty"], result["labels_needed_random"]
    if by_uncertainty and by_random:
        assert result["ratio_random_over_uncertainty"] == pytest.approx(by_random / by_uncertainty)


def check_label_repair(result: dict) -> None:
    """Fixed never exceeds injected, every injected copy ends with one image of its pair left (the audit finds
    every exact duplicate), K=0 relabels nothing and K=all takes every flagged issue, accuracies are shares."""
    flips, copies, flagged = result["flips_injected"], result["copies_injected"], result["label_issues_flagged"]
    assert [r["accept_top"] for r in result["runs"]] == ["0", "all"]
    for run in result["runs"]:
        assert 0 <= run["flips_fixed"] + run["flips_relabelled_wrong"] <= flips
        assert run["copies_resolved"] == copies and 0 <= run["copies_kept_wrong_label"] <= copies
        assert 0 <= run["correct_relabelled"] <= run["accepted"] <= flagged
        assert 0 <= run["val_true"] <= 1 and 0 <= run["val_reported"] <= 1
    no_accept, accept_all = result["runs"]
    assert no_accept["accepted"] == no_accept["flips_fixed"] == no_accept["correct_relabelled"] == 0
    assert accept_all["accepted"] == flagged  # the previous K's batches were all undone
    assert all(0 <= result[k] <= 1 for k in ("val_true_before", "val_reported_before", "val_true_clean"))


@pytest.mark.parametrize("script", sorted(ARGS))
def test_benchmark_ends_with_its_json_line(script, tmp_path):
    args = ARGS[script]
    args = [*args, "--work", str(tmp_path)] if script == "scale.py" else args  # its shards are kept for a re-run
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=BENCH_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_result(script, json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_gpu_suite_runs_every_step_on_the_cpu(tmp_path):
    """benchmarks/gpu_suite.sh --cpu-smoke: each step of the GPU suite, at tiny sizes, into one JSON summary."""
    env = {**BENCH_ENV, "PYTHON": sys.executable, "SIMIMG_DEVICE_DATA": str(tmp_path / "nothing-carried")}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
        env=env,
    )
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert proc.returncode == 0 and summary["ok"], {k: v.get("error") for k, v in summary["steps"].items()}
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == summary
    steps = {name: step["result"] for name, step in summary["steps"].items()}
    assert list(steps) == [
        "gpu_tests",
        "train_cats_dogs",
        "evaluate_cats_dogs",
        "index_throughput",
        "search_1m",
        "query_latency",
    ]
    assert steps["gpu_tests"]["tests"] >= 8 and steps["gpu_tests"]["failures"] == steps["gpu_tests"]["errors"] == 0
    assert steps["train_cats_dogs"]["epochs"] == 1 and steps["train_cats_dogs"]["indexed"] == 18
    assert steps["evaluate_cats_dogs"]["images"] == 6 and steps["evaluate_cats_dogs"]["gallery"] == "index"
    assert steps["index_throughput"]["images"] == 16 and steps["index_throughput"]["ratio_baseline"] > 0
    assert steps["search_1m"]["N"] == 3000 and steps["query_latency"]["query_p50_ms"] > 0
    for step, script in IN_GPU_SUITE.items():
        check_result(script, steps[step])
    assert summary["headline"]["train_cats_dogs.val_accuracy"] == steps["train_cats_dogs"]["val_accuracy"]
    assert "===== query_latency" in (tmp_path / "gpu_suite.log").read_text()


def test_the_cpu_suite_plans_each_figure_with_options_its_scripts_take(tmp_path):
    """benchmarks/cpu_suite.py --dry-run: its steps, in order, each a benchmark script (or `simimg train`) given only
    options that script defines (the real run takes an hour: benchmarks/README.md has its figures)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_suite.py"), "--dry-run", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=BENCH_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    plan = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert list(plan) == ["train_gate_model", "index_512", "index_64", "gate_fine_tuned", "query_latency", "scale"]
    for name, command in plan.items():
        words = command.split()
        source = (ROOT / "simimg" / "cli.py") if words[1:3] == ["-m", "simimg.cli"] else Path(words[1])
        assert source.is_file(), (name, source)
        defined = source.read_text() + (ROOT / "benchmarks" / "_common.py").read_text()  # the shared parser
        for option in (w for w in words if w.startswith("--")):
            assert f'"{option}"' in defined, (name, option)
    assert f"--gate-data {tmp_path / 'cats_dogs'}" in plan["gate_fine_tuned"]
    assert "<the trained model's fingerprint>" in plan["gate_fine_tuned"]


def test_a_suite_step_reads_the_figures_of_the_steps_before_it(tmp_path, monkeypatch):
    """benchmarks/_suite.py: each result is there when the next step's command is made (the CPU suite's fine-tuned
    gate reads the trained model's fingerprint); a step whose input is missing is recorded as not started."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _suite import Step, last_json_line, run_steps

    results: dict = {}

    def twice() -> list[str]:
        return [sys.executable, "-c", f"print('{{\"n\": {results['first']['result']['n'] * 2}}}')"]

    steps = {
        "first": Step(lambda: [sys.executable, "-c", "print('{\"n\": 21}')"], last_json_line, 60),
        "second": Step(twice, last_json_line, 60),
        "third": Step(lambda: [sys.executable, "-c", str(results["missing"])], last_json_line, 60),
        "unwanted": Step(lambda: pytest.fail("ran a step not asked for"), last_json_line, 60),
    }
    with open(tmp_path / "suite.log", "w") as log:
        got = run_steps(steps, {"first", "second", "third"}, float("inf"), 1.0, dict(os.environ), log, results)
    assert got is results and list(results) == ["first", "second", "third"]
    assert results["second"]["ok"] and results["second"]["result"] == {"n": 42}
    assert not results["third"]["ok"] and results["third"]["error"].startswith("not started: KeyError")


def test_every_benchmark_script_is_checked_here():
    scripts = {
        p.name
        for p in (ROOT / "benchmarks").glob("*.py")
        if not p.name.startswith(("_", "gpu_suite", "cpu_suite", "prepare"))
    }
    assert scripts == set(REQUIRED) == set(ARGS) | set(IN_GPU_SUITE.values())
