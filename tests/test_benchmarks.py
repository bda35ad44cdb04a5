"""Every benchmark script runs on tiny sizes and ends with one JSON line holding its required figures.

No timing is asserted here: speed claims live in benchmarks/README.md, measured as ratios in one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TINY_MODEL = ["--image-size", "32", "--repeats", "1"]

CASES = {
    "audit_recall.py": (["--images", "12", "--flips", "2", "--exact", "2", "--near", "2", "--image-size", "32"],
                        {"exact_recall", "identical_groups", "near_threshold", "audit_s"}),
    "index_throughput.py": (["--device", "cpu", "--images", "8", "--batch-size", "4", "--workers", "1", *TINY_MODEL],
                            {"device", "images", "end_to_end_img_s", "model_only_img_s", "baseline_img_s",
                             "ratio_model_only", "ratio_baseline"}),
    "head_only.py": (["--images", "12", *TINY_MODEL], {"images", "head_only_s", "fine_tune_epoch_s",
                                                        "ratio_fine_tune_epoch", "index_after_embedded"}),
    "search.py": (["--n", "3000", "--dim", "32", "--queries", "10", "--nprobe", "4,8"],
                  {"N", "dim", "ivf_ms_per_query", "ivf_recall_at_k", "flat_ms_per_query", "rows"}),
    "query_latency.py": (["--images", "4", "--queries", "2", *TINY_MODEL],
                         {"device", "query_p50_ms", "query_p95_ms", "forward_p50_ms", "ratio_query_over_forward_p50"}),
    "index_engines.py": (["--images", "8", "--batch-size", "4", "--repeats", "1", "--image-size", "32"],
                         {"images", "local_s", "ray_s", "ratio_ray_over_local", "min_cosine", "same_result"}),
    "serve_load.py": (["--gallery", "8", "--image-size", "32", "--requests", "8", "--concurrency", "2",
                       "--repeats", "1", "--threads", "1"],
                      {"requests", "concurrency", "errors", "p50_ms", "p99_ms", "rps", "rps_unbatched", "ratio"}),
    "train_throughput.py": (["--images", "16", "--batch-size", "4", "--epochs", "1", "--workers", "0", *TINY_MODEL],
                            {"device", "train_img_s", "raw_step_img_s", "ratio_raw"}),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_ends_with_its_json_line(script):
    args, required = CASES[script]
    env = {**os.environ, "SIMIMG_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout's simimg
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert required <= set(result), required - set(result)
    assert all(result[key] > 0 for key in required if isinstance(result[key], float))
    assert result.get("index_after_embedded", 0) == 0
    assert result.get("errors", 0) == 0
    if script == "audit_recall.py":  # every byte-identical group, injected or not, is reported
        assert result["exact_recall"] == 1.0 and result["identical_groups_reported"] == result["identical_groups"]
        assert 0 <= result["near_recall"] <= 1 and 0 <= result["flip_recall"] <= 1
