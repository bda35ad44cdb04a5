"""The one-writer lock: a second writer fails at once naming the holder, and a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_class_images, run_main
from simimg.errors import SimimgError
from simimg.store.layout import IndexFolder
from simimg.store.lock import writer_lock

# Holds the lock until killed; with 'fork' it first forks a sleeping child, as DataLoader workers are forked, and
# says "held" only once the child runs Python code (so its at-fork handlers have run: CI caught the parent being
# killed before a slow child had closed its copy).
HOLDER = """
import os, sys, time
from pathlib import Path
from simimg.store.lock import writer_lock
with writer_lock(Path(sys.argv[1]), "index 'x'"):
    if sys.argv[2] == "fork":
        ready_r, ready_w = os.pipe()
        if os.fork() == 0:
            os.write(ready_w, str(os.getpid()).encode())
            time.sleep(60)
            os._exit(0)
        print("held", os.read(ready_r, 32).decode(), flush=True)
    else:
        print("held", flush=True)
    time.sleep(60)
"""


def hold_lock(lock: Path, mode: str = "plain") -> tuple[subprocess.Popen, list[int]]:
    """A real process that holds `lock` until killed, and the pids of its forked children; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), mode], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    said = proc.stdout.readline().split()
    assert said[:1] == ["held"]
    return proc, [int(pid) for pid in said[1:]]


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_second_index_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "data", {"a": 2}, size=32)
    holder, _ = hold_lock(IndexFolder.of(tmp_path / "home", "busy").lock)
    try:
        args = ("--home", str(tmp_path / "home"), "--name", "busy", "--weights", "none", "--image-size", "32")
        code, out, err = run_main("index", str(data), *args)
    finally:
        kill(holder)
    assert code == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "busy" in line and f"process {holder.pid}" in line and "-c" in line


def test_lock_is_freed_when_the_holder_is_killed_even_with_forked_children(tmp_path: Path) -> None:
    """DataLoader workers are forked children: a SIGKILLed writer's children must not keep its lock."""
    lock = tmp_path / "writer.lock"
    holder, (child,) = hold_lock(lock, "fork")
    try:
        with pytest.raises(SimimgError, match=f"process {holder.pid}"), writer_lock(lock, "index 'x'"):
            pass
        kill(holder)
        os.kill(child, 0)  # the child still runs: only its at-fork handler let go of the lock
        with writer_lock(lock, "index 'x'"):
            assert str(os.getpid()) in lock.read_text()
    finally:
        os.kill(child, signal.SIGKILL)


def test_same_process_cannot_take_the_lock_twice(tmp_path: Path) -> None:
    """The app runs jobs in threads of one process: a second job on the same index must still be refused."""
    lock = tmp_path / "writer.lock"
    with writer_lock(lock, "index 'x'"), pytest.raises(SimimgError, match="is busy"), writer_lock(lock, "training 'x'"):
        pass
    with writer_lock(lock, "index 'x'"):
        pass


def test_a_stale_holder_record_does_not_block(tmp_path: Path) -> None:
    lock = tmp_path / "writer.lock"
    lock.write_text('{"pid": 999999, "host": "gone", "command": "simimg index", "started": "long ago"}')
    with writer_lock(lock, "index 'x'"):
        assert f'"pid": {os.getpid()}' in lock.read_text()
