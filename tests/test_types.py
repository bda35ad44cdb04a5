"""simimg/ passes mypy with its own settings (pyproject.toml [tool.mypy]: strict but for the shells)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT


def test_mypy_is_clean():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed: pip install -e '.[dev]' (scripts/dev.sh test does)")
    # the cache lives outside the checkout (a test run writes nothing into it), one per checkout: a cold run reads
    # torch, numpy and faiss's types (~40 s on 2 cores), a warm one only what changed (~2 s)
    default = Path(tempfile.gettempdir()) / f"simimg-mypy-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]}"
    cache = os.environ.get("MYPY_CACHE_DIR") or str(default)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", cache],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"mypy failed:\n{done.stdout}{done.stderr}"
