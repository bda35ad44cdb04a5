"""Run one publish path under the crash hook (simimg/faults.py) at every step, for tests/test_faults.py.

    python tests/crash_runs.py SCENARIO HOME NAME DATA

For k = 1, 2, ...: the index is put back as it was, a forked child runs the scenario with $SIMIMG_CRASH_AT=k and
is killed at its k-th publish step; this process then opens the index (its published version), verifies it, and
runs the scenario again without the hook in another child, which must finish. It stops at the first k the scenario
finishes without reaching, and prints one JSON line per k, then a summary line.

This process itself never embeds anything, so its forks start with no thread pools to inherit.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import simimg
from simimg.faults import CRASH_ENV

PRELOAD = (
    "sklearn.metrics",
    "sklearn.model_selection",
    "simimg.jobs.index",
    "simimg.jobs.train",
    "simimg.jobs.train_head",
    "simimg.models.openvino",
)


def scenario(which: str, home: Path, name: str, data: Path) -> Callable[[], object]:
    """What each publish path does, as a user would ask for it through the public API; `use` switches to the
    kept model that does not serve when the run starts."""
    if which == "use":
        other = next(m.fingerprint for m in simimg.list_models(name, home) if not m.serving)
        return lambda: simimg.use_model(other, name, home)
    tiny = {"weights": "none", "image_size": 32, "epochs": 1, "batch_size": 6, "workers": 0}
    return {
        "index": lambda: simimg.build_index(data, name, home),
        "head_only": lambda: simimg.train(data, name, home, head_only=True),
        "train": lambda: simimg.train(data, name, home, **tiny),
    }[which]


def in_child(run: Callable[[], object], crash_at: int | None) -> int:
    """Run `run` in a forked child; its exit status: 0 done, 1 failed, -9 killed by the hook."""
    pid = os.fork()
    if pid == 0:
        if crash_at is not None:
            os.environ[CRASH_ENV] = str(crash_at)
        code = 0
        try:
            run()
        except BaseException:  # noqa: BLE001 (the child reports any failure by its exit status)
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def state(home: Path, name: str) -> dict:
    """The published version and what `verify` finds: what a reader sees after the crash."""
    report = simimg.verify_index(name, home)
    return {"version": simimg.index_info(name, home)["version"], "problems": [p.reason for p in report.problems]}


def main() -> None:
    which, home, name, data = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    # imported once here, not in every child (~4 s each): importing starts no thread pool, running a model does;
    # scikit-learn too (2.7 s), which simimg imports only when a head is fitted or scored
    for module in PRELOAD:
        importlib.import_module(module)

    run = scenario(which, home, name, data)
    pristine = home.with_name(home.name + "-pristine")
    shutil.rmtree(pristine, ignore_errors=True)
    shutil.copytree(home, pristine)
    before = simimg.index_info(name, home)["version"]
    for k in range(1, 100):
        shutil.rmtree(home)
        shutil.copytree(pristine, home)
        code = in_child(run, k)
        if code == 0:
            print(json.dumps({"scenario": which, "steps": k - 1, "before": before, **state(home, name)}))
            return
        row: dict = {"k": k, "exit": code, "after_crash": state(home, name)}
        row["rerun_exit"] = in_child(run, None)
        row["after_rerun"] = state(home, name)
        print(json.dumps(row), flush=True)
    raise SystemExit("the scenario never finished")


if __name__ == "__main__":
    main()
