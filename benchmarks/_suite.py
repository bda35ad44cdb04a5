"""What benchmarks/gpu_suite.py and cpu_suite.py share: a step is a command a person would type, run in its own
process within a time limit; what it printed becomes figures, and a step that fails or runs out of time is recorded
as such while the suite goes on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    """One check: its command (made when it starts, so it may read earlier steps' results), the parser of what it
    printed, and its time limit in seconds."""

    command: Callable[[], list[str]]
    parse: Callable[[str], dict]
    limit: float


def suite_env(data: Path) -> dict[str, str]:
    """The steps' environment: offline, unbuffered, this checkout's simimg first."""
    return {
        **os.environ,
        "SIMIMG_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "SIMIMG_DATASETS": str(data),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def run_steps(
    steps: dict[str, Step], wanted: set[str], budget: float, slack: float, env: dict, log: IO[str], results: dict
) -> dict:
    """Each wanted step in order, each within its limit (times `slack`) and what is left of `budget` seconds; each
    result goes into `results` as the step ends, where a later step's command may read it. Returns `results`."""
    started = time.monotonic()
    for name, step in steps.items():
        if name in wanted:
            left = budget - (time.monotonic() - started)
            results[name] = run_step(name, step, min(step.limit * slack, left), env, log)
    return results


def run_step(name: str, step: Step, limit: float, env: dict, log: IO[str]) -> dict:
    """Run one step in its own process within `limit` seconds; its output goes to the log, its figures back."""
    if limit < 10:
        return {"ok": False, "seconds": 0.0, "error": "not started: the suite's time budget was spent"}
    try:
        command = step.command()
    except (KeyError, TypeError) as err:  # it needs a figure an earlier step did not give
        return {"ok": False, "seconds": 0.0, "error": f"not started: {type(err).__name__}: {err}"}
    log.write(f"\n===== {name}: {' '.join(command)}\n")
    log.flush()
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as err:
        log.write(_text(err.stdout) + _text(err.stderr))
        return {"ok": False, "seconds": round(time.monotonic() - started, 1), "error": f"timed out after {limit:.0f} s"}
    log.write(proc.stdout + proc.stderr)
    seconds = round(time.monotonic() - started, 1)
    try:
        figures = step.parse(proc.stdout)
    except (ValueError, KeyError, IndexError, OSError, ElementTree.ParseError) as err:
        figures = {"error": f"no figures: {type(err).__name__}: {err}"}
    ok = proc.returncode == 0 and "error" not in figures
    error = {} if ok else {"error": figures.get("error") or f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return {"ok": ok, "seconds": seconds, **error, "result": {k: v for k, v in figures.items() if k != "error"}}


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def train_figures(stdout: str) -> dict:
    """`simimg train --json`'s figures worth keeping."""
    report = json.loads(stdout)
    kept = ("val_accuracy", "best_epoch", "seconds", "device", "stopped_early", "model")
    return {
        **{key: report[key] for key in kept},
        "epochs": len(report["history"]),
        "images_per_s_last_epoch": report["history"][-1]["images_per_s"],
        "indexed": (report["index"] or {}).get("total"),
    }


def summarize(suite: str, results: dict, started: float, pick: dict[str, tuple[str, ...]], **about: object) -> dict:
    """The suite's one summary: what it ran on (`about`), how long it took, whether every step passed, the headline
    figures (`pick`), each step's result and the machine."""
    return {
        "suite": suite,
        **about,
        "seconds": round(time.monotonic() - started, 1),
        "ok": all(r["ok"] for r in results.values()),
        "headline": headline(results, pick),
        "steps": results,
        "machine": machine(),
    }


def headline(results: dict, pick: dict[str, tuple[str, ...]]) -> dict:
    """The figures worth a glance, `step.key`, from the steps that ran."""
    return {
        f"{step}.{key}": results[step]["result"].get(key)
        for step, keys in pick.items()
        if step in results
        for key in keys
        if results[step].get("result")
    }


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
