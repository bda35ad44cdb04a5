#!/usr/bin/env bash
# Every CUDA check in one command, on a lent GPU machine (at most 10 minutes on one H100): the `gpu` tests,
# cats_dogs trained from scratch with the default recipe and evaluated, index throughput against bf16 model-only
# and the seed-style loop, search at 1M, warm-query latency. Writes $OUT/gpu_suite.json (one JSON summary) and
# $OUT/gpu_suite.log. Needs the folder benchmarks/prepare_device_data.py makes (.device-data/: the datasets, and
# the wheels that machine lacks), carried beside the working tree; see benchmarks/README.md for the exact call.
#
#   bash benchmarks/gpu_suite.sh [--budget-s 570] [--only gpu_tests,query_latency]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${SIMIMG_DEVICE_DATA:-.device-data}
python=${PYTHON:-python3}  # on the GPU machine, python3 is the one with CUDA torch
if compgen -G "$data/wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/simimg-site \
        "$data"/wheels/*.whl
    export PYTHONPATH=/tmp/simimg-site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$python" benchmarks/gpu_suite.py --data "$data" "$@"
