#!/usr/bin/env bash
# One entry point for a fresh machine:  scripts/dev.sh app  |  scripts/dev.sh test [pytest args]
# Sets up .venv (torch, the package, test tools, Debian's chromium for the browser test), then runs the app or the
# full test suite (a bare `pytest` in the venv is the fast tier).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

setup() {
    if [ ! -x .venv/bin/python ]; then
        "$PY" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
    # The pinned pair this project is tested with; pip takes it from the local wheel cache where there is one.
    .venv/bin/python -c "import torch, torchvision" 2>/dev/null ||
        .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
    # scripts/constraints.txt: the versions the suite last passed with, so a fresh machine gets the tested set
    .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
}

setup_browser() {
    command -v chromium >/dev/null && return 0
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
}

case "${1:-}" in
    app)
        setup
        shift
        exec .venv/bin/streamlit run app.py --server.address "${SIMIMG_ADDRESS:-localhost}" "$@"
        ;;
    test)
        setup
        setup_browser
        shift
        # The full suite: every tier (-m "": pyproject's addopts deselect the slow ones for a bare `pytest`), on two
        # workers (SIMIMG_TEST_WORKERS), each taking whole modules, longest first (tests/conftest.py's order).
        exec .venv/bin/python -m pytest -m "" -n "${SIMIMG_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder \
            --durations=25 "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh app | test [pytest args]" >&2
        exit 2
        ;;
esac
