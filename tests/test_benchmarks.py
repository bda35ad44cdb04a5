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
# this checkout's simimg first, whatever an installed copy points at (a script's own folder is sys.path[0])
BENCH_ENV = {**os.environ, "SIMIMG_OFFLINE": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

CASES = {
    "index_throughput.py": (["--device", "cpu", "--images", "8", "--batch-size", "4", "--workers", "1", *TINY_MODEL],
                            {"device", "precision", "images", "end_to_end_img_s", "model_only_img_s",
                             "baseline_img_s", "ratio_model_only", "ratio_fp32_model_only", "ratio_baseline"}),
    "head_only.py": (["--images", "12", *TINY_MODEL], {"images", "head_only_s", "fine_tune_epoch_s",
                                                        "ratio_fine_tune_epoch", "index_after_embedded"}),
    "search.py": (["--n", "3000", "--dim", "32", "--queries", "10", "--nprobe", "4,8"],
                  {"N", "dim", "ivf_ms_per_query", "ivf_recall_at_k", "flat_ms_per_query", "rows"}),
    "query_latency.py": (["--images", "4", "--queries", "2", *TINY_MODEL],
                         {"device", "precision", "query_p50_ms", "query_p95_ms", "forward_p50_ms",
                          "ratio_query_over_forward_p50", "ratio_fp32_query_p50"}),
    "train_throughput.py": (["--images", "16", "--batch-size", "4", "--epochs", "1", "--workers", "0", *TINY_MODEL],
                            {"device", "train_img_s", "raw_step_img_s", "ratio_raw"}),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_ends_with_its_json_line(script):
    args, required = CASES[script]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=BENCH_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert required <= set(result), required - set(result)
    assert all(result[key] > 0 for key in required if isinstance(result[key], float))
    assert result.get("index_after_embedded", 0) == 0
    if result.get("precision") == "bf16":  # both precisions in the same run
        assert {"fp32_model_only_img_s", "fp32_query_p50_ms"} & set(result), result
