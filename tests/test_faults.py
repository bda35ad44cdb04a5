"""Issue 22, item 4: a crash at any publish step leaves an index that opens at its old or its new version, passes
`simimg verify`, and lets the next run finish (tests/crash_runs.py runs each path once per step); a full disk is
one clear error that loses nothing."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import simimg
from conftest import ROOT, Built, copy_built, run_cli
from simimg.models.device import RUNTIME_ENV
from test_serve import start_cli_server, stop

pytestmark = pytest.mark.slow  # a fresh Python forks a run per publish step


def crash_at_every_step(scenario: str, built: Built) -> tuple[list[dict], dict]:
    """Run the sweep on torch's runtime: the publish steps are the same on either (simimg/models/openvino.py
    publishes nothing), and each retrained trunk would cost an OpenVINO conversion per run (2.5 s of 6)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "crash_runs.py"), scenario, str(built.home), built.name, str(built.data)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, RUNTIME_ENV: "torch"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *steps, summary = [json.loads(line) for line in proc.stdout.splitlines()]
    return steps, summary


def check(steps: list[dict], summary: dict, at_least: int) -> None:
    """Every step was reached and killed; after each, the old or new version opens whole and a rerun finishes
    (publishing once more when the killed run had published already and the job is not a no-op the second time,
    as a second head-only fit is not)."""
    before, after = summary["before"], summary["version"]
    assert summary["steps"] == len(steps) >= at_least and summary["problems"] == [] and after == before + 1
    for step in steps:
        crashed, rerun = step["after_crash"], step["after_rerun"]
        assert step["exit"] == -signal.SIGKILL, step
        assert crashed["version"] in (before, after) and crashed["problems"] == [], step
        assert step["rerun_exit"] == 0 and rerun["problems"] == [], step
        assert rerun["version"] in (after, after + 1) and rerun["version"] >= crashed["version"] + 0, step


@pytest.fixture
def built(shapes_index: Built, tmp_path: Path) -> Built:
    return copy_built(shapes_index, tmp_path)


def test_index_survives_a_crash_at_every_publish_step(built):
    shutil.copy(built.data / "squares" / "squares_000.png", built.data / "squares" / "new.png")
    check(*crash_at_every_step("index", built), at_least=5)


def test_a_head_only_fit_and_use_survive_a_crash_at_every_publish_step(built):
    check(*crash_at_every_step("head_only", built), at_least=5)
    simimg.train(built.data, built.name, built.home, head_only=True)  # a second kept model, serving
    check(*crash_at_every_step("use", built), at_least=3)


def test_training_survives_a_crash_at_every_step_of_its_save_and_serve(built):
    """Checkpoints, the model folder, the index's new version: 1 epoch from scratch at 32 px, once per step."""
    check(*crash_at_every_step("train", built), at_least=8)


def test_a_full_disk_is_one_clear_error_and_the_index_keeps_serving(built):
    """RLIMIT_FSIZE stands in for a full disk: no file may grow past 64 KB (the FAISS file of 19 vectors does)."""
    shutil.copy(built.data / "squares" / "squares_000.png", built.data / "squares" / "new.png")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run(
        [sys.executable, "-m", "simimg.cli", "index", str(built.data), "--name", built.name, "--home", str(built.home)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        preexec_fn=small_files,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]  # beside the progress bar
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("simimg: error: File too large") and "the last version still serves" in errors[0]
    info = json.loads(run_cli("info", "--name", built.name, "--home", str(built.home), "--json").stdout)
    assert info["version"] == 1 and info["total"] == 18
    assert (
        json.loads(run_cli("verify", "--name", built.name, "--home", str(built.home), "--json").stdout)["problems"]
        == []
    )


def read_only_mount(folder: Path) -> list[str]:
    """A command prefix that runs its command with `folder` bind-mounted read-only, in a mount namespace of its own
    (the tests run as root, who writes through any chmod); a skip where mounts cannot be made."""
    prefix = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"']
    probe = subprocess.run([*prefix, str(folder), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.strip()[-200:]}")
    return [*prefix, str(folder)]


def test_a_read_only_home_serves_reads_and_refuses_writes_in_one_line(built):
    shutil.copy(built.data / "squares" / "squares_000.png", built.data / "squares" / "new.png")
    where = ["--name", built.name, "--home", str(built.home), "--json"]
    read_only = read_only_mount(built.home)

    def simimg_on_read_only_home(*args: str) -> subprocess.CompletedProcess:
        command = [*read_only, sys.executable, "-m", "simimg.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)

    info = simimg_on_read_only_home("info", *where)
    assert info.returncode == 0 and json.loads(info.stdout)["total"] == 18, info.stderr[-2000:]
    # queries through `simimg serve` (the CLI's `query` and the app open the index through the same SearchService)
    url, server = start_cli_server(built.home, prefix=read_only)
    try:
        answer = httpx.post(f"{url}/v1/indexes/{built.name}/query", json=["circles/circles_000.png"], timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()[0]["neighbors"][0]["path"] == "circles/circles_000.png"
    finally:
        stop(server)
    index = simimg_on_read_only_home("index", str(built.data), *where)
    errors = [line for line in index.stderr.splitlines() if "error" in line.lower()]
    assert index.returncode == 2 and len(errors) == 1 and "Traceback" not in index.stderr, index.stderr[-3000:]
    assert "Read-only file system" in errors[0] and "the last version still serves" in errors[0]
