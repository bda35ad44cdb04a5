"""The repository passes `ruff check` and `ruff format --check` with its own settings (pyproject.toml [tool.ruff])."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


def test_ruff_check_and_format_are_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed: pip install -e '.[dev]' (scripts/dev.sh test does)")
    for command in (["check", "."], ["format", "--check", "."]):
        # --no-cache: a test run writes nothing into the checkout
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--no-cache"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"ruff {' '.join(command)} failed:\n{done.stdout}{done.stderr}"
