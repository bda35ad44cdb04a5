"""The repository passes `ruff check` and `ruff format --check` with its own settings (pyproject.toml [tool.ruff]),
and bandit finds no risky call in simimg/ beyond the documented waivers."""

from __future__ import annotations

import importlib.util
import json
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


# bandit's medium findings that are waived, by (test id, file): SQL assembled from constant fragments (the
# VISIBLE clause, table and column names); every value is bound as a parameter.
BANDIT_WAIVERS = {
    ("B608", "simimg/store/catalog.py"),
    ("B608", "simimg/store/edits.py"),
    ("B608", "simimg/jobs/upgrade.py"),
}


def test_bandit_finds_nothing_of_high_severity_and_no_medium_finding_beyond_the_waivers():
    if importlib.util.find_spec("bandit") is None:
        pytest.skip("bandit is not installed: pip install -e '.[dev]' (scripts/dev.sh test does)")
    done = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", "simimg", "-f", "json", "-q", "--severity-level", "medium"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    findings = json.loads(done.stdout)["results"]
    assert [f for f in findings if f["issue_severity"] == "HIGH"] == []
    unwaived = [f for f in findings if (f["test_id"], f["filename"]) not in BANDIT_WAIVERS]
    assert unwaived == [], [(f["test_id"], f["filename"], f["line_number"], f["issue_text"]) for f in unwaived]
