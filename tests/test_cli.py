"""The `simimg` CLI: its JSON contract, the incremental add/change/delete cycle, the offline weights path, and errors.

The runs call `simimg.cli.main` in this process (the same argparse, JSON and error handling, without paying for a
new Python and torch each time); two e2e tests run the real command for what only a process shows: nothing but the
JSON on its stdout, and its exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, main_json, make_class_images, run_cli, synthetic_image
from simimg.cli import main
from simimg.models.device import resolve_compute
from simimg.store.catalog import Catalog
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model
from test_images import BROKEN, write_broken
from test_index import assert_consistent
from test_net import DENSENET121_FILE, assert_trunk_equals, write_densenet121_checkpoint

INDEX_KEYS = {"name", "indexed", "removed", "total", "skipped", "seconds", "device"}
QUERY_KEYS = {"query", "prediction", "neighbors"}
NEIGHBOR_KEYS = {"path", "label", "score"}
INFO_KEYS = {"labels", "arch", "dim", "model", "embedding", "kind", "classifier"}
TINY = ("--weights", "none", "--image-size", "32", "--workers", "0")


@pytest.fixture
def cli(capsys, tmp_path):
    """Run `simimg ARGS` in process with --home tmp_path/home; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([*args, "--home", str(tmp_path / "home")])
        except SystemExit as stop:  # argparse's own usage errors
            code = stop.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_class_images(tmp_path / "photos", {"a": 3, "b": 3}, size=40)


def json_of(cli, *args: str) -> dict | list:
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 1
    return json.loads(out)


def assert_one_line_error(code: int, out: str, err: str, *phrases: str) -> None:
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simimg") and "Traceback" not in err, err
    assert all(p in lines[0] for p in phrases), lines[0]


def check_index_json(report: dict) -> None:
    assert set(report) >= INDEX_KEYS
    assert all(isinstance(report[k], int) for k in ("indexed", "removed", "total"))
    assert isinstance(report["seconds"], float) and report["device"] == str(resolve_compute("cpu"))
    assert all(set(s) == {"path", "reason"} for s in report["skipped"])


def check_query_json(results: list, queries: list[str]) -> None:
    assert [r["query"] for r in results] == queries
    for r in results:
        assert set(r) == QUERY_KEYS and r["prediction"] is None
        assert all(set(n) == NEIGHBOR_KEYS for n in r["neighbors"])


# --- the contract ---------------------------------------------------------------------------------------------
def test_json_output_is_exactly_the_contract(cli, photos):
    write_broken(photos / "b")
    report = json_of(cli, "index", str(photos), *TINY)
    check_index_json(report)
    assert (report["name"], report["indexed"], report["removed"], report["total"]) == ("photos", 6, 0, 6)
    assert {s["path"] for s in report["skipped"]} == {f"b/{n}" for n in BROKEN}
    queries = [str(photos / "a" / "a_000.png"), str(photos / "b" / "b_002.png")]
    results = json_of(cli, "query", *queries, "--name", "photos", "-k", "2")
    check_query_json(results, queries)
    assert [r["neighbors"][0]["path"] for r in results] == ["a/a_000.png", "b/b_002.png"]
    info = json_of(cli, "info", "--name", "photos")
    assert set(info) >= INFO_KEYS and info["labels"] == {"a": 3, "b": 3} and info["dim"] == 1024


def test_without_json_a_human_summary_and_progress_on_stderr(cli, photos):
    code, out, err = cli("index", str(photos), *TINY)
    assert code == 0 and "photos: embedded 6, removed 0, 6 in the index" in out and "6/6" in err
    code, out, _ = cli("query", str(photos / "a" / "a_001.png"), "--name", "photos", "-k", "1")
    assert code == 0 and out.splitlines()[1].split() == ["1.0000", "a", "a/a_001.png"]


@pytest.mark.e2e
def test_the_command_reports_a_user_error_in_one_line(tmp_path):
    proc = run_cli("index", str(tmp_path / "missing"), "--home", str(tmp_path / "home"), *TINY, check=False)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "is not a folder")


@pytest.mark.e2e
def test_the_command_prints_nothing_but_its_json_on_stdout(photos, tmp_path):
    """What only a real process shows: no library, thread or child process writes to stdout (fd 1) beside the one
    JSON line, and progress goes to stderr; for an index run and a training run (epochs print as they end)."""
    home = str(tmp_path / "home")
    train = ("train", str(photos), "--name", "t", "--home", home, *TINY, "--epochs", "1", "--batch-size", "2")
    for args, progress in (
        (("index", str(photos), "--home", home, *TINY), "6/6"),
        ((*train, "--no-index"), "epoch   1"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "simimg.cli", *args, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(proc.stdout.splitlines()) == 1 and isinstance(json.loads(proc.stdout), dict), proc.stdout[-3000:]
        assert progress in proc.stderr, proc.stderr[-3000:]


# --- the incremental cycle ------------------------------------------------------------------------------------
def live_rows(tmp_path: Path) -> dict:
    catalog = Catalog(IndexFolder.of(tmp_path / "home", "photos").catalog, readonly=True)
    try:
        return catalog.head()
    finally:
        catalog.close()


def index_step(cli, photos: Path, tmp_path: Path, indexed: int, removed: int, total: int) -> dict:
    """One `simimg index` run; checks its counts, FAISS against SQLite, and `simimg info` against the folder."""
    report = json_of(cli, "index", str(photos), *TINY)
    assert (report["indexed"], report["removed"], report["total"], report["skipped"]) == (indexed, removed, total, [])
    snap = assert_consistent(tmp_path / "home", "photos")
    on_disk = {}
    for path in photos.rglob("*.png"):
        on_disk[path.parent.name] = on_disk.get(path.parent.name, 0) + 1
    assert json_of(cli, "info", "--name", "photos")["labels"] == on_disk
    assert len(snap.ids) == total
    return live_rows(tmp_path)


def test_add_change_touch_delete_cycle(cli, photos, tmp_path):
    first = index_step(cli, photos, tmp_path, indexed=6, removed=0, total=6)
    assert index_step(cli, photos, tmp_path, indexed=0, removed=0, total=6) == first

    synthetic_image(2, np.random.default_rng(9), 40).save(photos / "a" / "new.png")
    added = index_step(cli, photos, tmp_path, indexed=1, removed=0, total=7)
    assert {p: r.id for p, r in added.items() if p != "a/new.png"} == {p: r.id for p, r in first.items()}

    changed = photos / "b" / "b_000.png"
    synthetic_image(0, np.random.default_rng(10), 40).save(changed)
    after_change = index_step(cli, photos, tmp_path, indexed=1, removed=0, total=7)
    assert after_change["b/b_000.png"].id != added["b/b_000.png"].id
    assert after_change["b/b_000.png"].sha256 != added["b/b_000.png"].sha256

    touched = photos / "a" / "a_002.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 5_000_000_000))
    after_touch = index_step(cli, photos, tmp_path, indexed=0, removed=0, total=7)
    assert after_touch["a/a_002.png"].id == after_change["a/a_002.png"].id
    assert after_touch["a/a_002.png"].mtime_ns == touched.stat().st_mtime_ns

    (photos / "a" / "a_001.png").unlink()
    after_delete = index_step(cli, photos, tmp_path, indexed=0, removed=1, total=6)
    assert "a/a_001.png" not in after_delete


@pytest.mark.slow
def test_moving_a_file_to_another_class_relabels_it(cli, photos, tmp_path):
    index_step(cli, photos, tmp_path, indexed=6, removed=0, total=6)
    shutil.move(photos / "a" / "a_000.png", photos / "b" / "moved.png")
    rows = index_step(cli, photos, tmp_path, indexed=1, removed=1, total=6)
    assert rows["b/moved.png"].label == "b" and "a/a_000.png" not in rows


# --- the offline ImageNet weights path ------------------------------------------------------------------------
@pytest.mark.slow
def test_index_reads_imagenet_weights_from_torch_home_offline(cli, photos, tmp_path, monkeypatch):
    torch_home = tmp_path / "torch_home"
    state = write_densenet121_checkpoint(torch_home, seed=11, old_keys=True)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    report = json_of(cli, "index", str(photos), "--weights", "imagenet", "--image-size", "32", "--workers", "0")
    assert report["total"] == 6
    net, bundle = load_model(IndexFolder.of(tmp_path / "home", "photos"), report["model"])
    assert bundle.source == "torchvision:DenseNet121_Weights.IMAGENET1K_V1"
    assert_trunk_equals(net.trunk, state)


def test_missing_imagenet_weights_offline_say_where_to_put_them(cli, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    folder = tmp_path / "empty_torch_home" / "hub" / "checkpoints"
    code, out, err = cli("index", str(photos), "--image-size", "32")
    assert_one_line_error(code, out, err, str(folder / DENSENET121_FILE), str(folder), "--weights none")


# --- clear errors ---------------------------------------------------------------------------------------------
def test_missing_and_imageless_folders(cli, tmp_path):
    assert_one_line_error(*cli("index", str(tmp_path / "nope"), *TINY), "is not a folder")
    (tmp_path / "docs" / "x").mkdir(parents=True)
    (tmp_path / "docs" / "x" / "readme.txt").write_text("text")
    assert_one_line_error(*cli("index", str(tmp_path / "docs"), *TINY), "no images found", "<class>")


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (("--image-size", "64"), "--image-size 64 (it uses 32)"),
        pytest.param(("--arch", "resnet50"), "--arch resnet50 (it uses densenet121)", marks=pytest.mark.slow),
    ],
)
def test_fingerprint_mismatch(cli, photos, flags, phrase):
    assert cli("index", str(photos), *TINY)[0] == 0
    code, out, err = cli("index", str(photos), "--workers", "0", *flags)
    assert_one_line_error(code, out, err, "fingerprint mismatch", phrase, "--name")


@pytest.mark.parametrize("command", [("info",), ("query", "x.png")])
def test_unknown_index_name(cli, command):
    assert_one_line_error(*cli(*command, "--name", "nope"), "no index named 'nope'", "simimg index")


def test_unknown_architecture(cli, photos):
    assert_one_line_error(*cli("index", str(photos), "--arch", "alexnet"), "alexnet", "densenet121")


def test_bad_weights_path(cli, photos, tmp_path):
    assert_one_line_error(*cli("index", str(photos), "--weights", str(tmp_path / "w.pth")), "no such file", "none")
    (tmp_path / "w.pth").write_bytes(b"junk")
    assert_one_line_error(
        *cli("index", str(photos), "--weights", str(tmp_path / "w.pth"), "--image-size", "32", "--name", "junk"),
        "cannot read a state dict",
    )


@pytest.mark.slow
def test_query_of_an_unreadable_image(cli, photos, tmp_path):
    assert cli("index", str(photos), *TINY)[0] == 0
    (tmp_path / "bad.jpg").write_bytes(b"")
    bad = tmp_path / "bad.jpg"
    assert_one_line_error(*cli("query", str(bad), "--name", "photos"), f"cannot query {bad}: empty file")


# --- the acceptance check on real photos -----------------------------------------------------------------------
@pytest.mark.datasets
def test_hymenoptera_train_indexes_245_images_that_each_find_themselves(shared_dataset, tmp_path):
    train = shared_dataset("hymenoptera") / "train"
    home = str(tmp_path / "home")
    first = main_json("index", str(train), "--weights", "none", "--image-size", "64", "--home", home)
    assert (first["name"], first["indexed"], first["total"], first["skipped"]) == ("train", 245, 245, [])
    again = main_json("index", str(train), "--weights", "none", "--image-size", "64", "--home", home)
    assert (again["indexed"], again["removed"], again["total"]) == (0, 0, 245)
    files = sorted(p for p in train.rglob("*") if p.is_file())
    assert len(files) == 245 and {p.suffix for p in files} >= {".gif", ".jpeg", ".jpg"}
    sample = files[::12] + [p for p in files if p.suffix != ".jpg"]  # the .gif, .jpeg and a spread of .jpg
    results = main_json("query", *map(str, sample), "--name", "train", "--home", home, "-k", "1")
    for path, result in zip(sample, results, strict=True):
        top = result["neighbors"][0]
        assert top["path"] == path.relative_to(train).as_posix() and top["score"] >= 0.999, result


@pytest.mark.parametrize("flag", [["-k", "0"], ["-k", "-3"], ["-k", "ten"]])
def test_k_below_one_is_a_one_line_usage_error(flag: list[str], capsys: pytest.CaptureFixture) -> None:
    from simimg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["query", "x.jpg", "--name", "n", *flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-k" in err


# --- model versions -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_head_only_training_models_and_use(cli, photos):
    base = json_of(cli, "index", str(photos), *TINY)
    head = json_of(cli, "train", str(photos), "--name", "photos", "--head-only", "--val-split", "0.34")
    assert head["kind"] == "head" and head["head"]["from_catalog"] == 6 and head["history"] == []
    assert (head["index"]["version"], head["index"]["indexed"], head["index"]["model"]) == (2, 0, head["model"])
    listed = json_of(cli, "models", "--name", "photos")
    assert [(m["fingerprint"], m["kind"], m["serving"]) for m in listed] == [
        (head["model"], "head", True),
        (base["model"], "pretrained", False),
    ]
    assert {"created", "arch", "source", "val_accuracy"} <= set(listed[0]) and listed[1]["val_accuracy"] is None
    predicted = json_of(cli, "query", str(photos / "a" / "a_000.png"), "--name", "photos", "-k", "1")
    assert predicted[0]["prediction"]["label"] in ("a", "b")
    back = json_of(cli, "use", base["model"][:6], "--name", "photos")
    assert (back["version"], back["indexed"], back["model"]) == (3, 0, base["model"])
    assert json_of(cli, "query", str(photos / "a" / "a_000.png"), "--name", "photos")[0]["prediction"] is None
    code, out, _ = cli("models", "--name", "photos")
    assert code == 0 and out.splitlines()[1].startswith(f"* {base['model']}")


@pytest.mark.slow
def test_train_without_serving_and_a_wrong_model_prefix(cli, photos):
    json_of(cli, "index", str(photos), *TINY)
    code, out, _err = cli("train", str(photos), "--name", "photos", "--head-only", "--no-index")
    assert code == 0 and "not serving it yet: `simimg use" in out
    assert_one_line_error(*cli("use", "zzzz", "--name", "photos"), "'zzzz' matches no kept model of index 'photos'")


@pytest.mark.slow
def test_head_only_on_another_collection_is_refused_unless_embed_missing(cli, photos, tmp_path):
    json_of(cli, "index", str(photos), *TINY)
    other = tmp_path / "other"
    shutil.copytree(photos, other)
    models = json_of(cli, "models", "--name", "photos")
    refused = cli("train", str(other), "--name", "photos", "--head-only")
    assert_one_line_error(
        *refused,
        f"6 of the 6 images in {other.resolve()} are not in index 'photos'",
        f"the index holds {photos.resolve()}",
        f"`simimg index {other.resolve()} --name other`",
        "--embed-missing",
    )
    assert json_of(cli, "models", "--name", "photos") == models  # nothing trained, nothing kept
    head = json_of(cli, "train", str(other), "--name", "photos", "--head-only", "--embed-missing", "--no-index")
    assert (head["head"]["from_catalog"], head["head"]["embedded"], head["index"]) == (0, 6, None)


@pytest.mark.slow
def test_query_of_several_images_reports_the_unreadable_one_and_answers_the_rest(cli, photos, tmp_path):
    json_of(cli, "index", str(photos), *TINY)
    (tmp_path / "bad.jpg").write_bytes(b"")
    good = str(photos / "a" / "a_000.png")
    results = json_of(cli, "query", good, str(tmp_path / "bad.jpg"), "--name", "photos", "-k", "1")
    assert results[0]["neighbors"][0]["path"] == "a/a_000.png" and "error" not in results[0]
    assert results[1]["error"] == "empty file (0 bytes)" and results[1]["neighbors"] == []


@pytest.mark.slow
def test_index_kind_is_chosen_kept_and_refused_when_unknown(cli, photos, tmp_path, caplog):
    job = tmp_path / "home" / "p" / "index_job.json"
    code, _out, err = cli("index", str(photos), "--name", "p", *TINY, "--index-kind", "ivf")
    assert code == 0 and "6 vectors are too few for an ivf index" in caplog.text  # so exact search instead
    assert json_of(cli, "info", "--name", "p")["index_kind"] == "flat"
    json_of(cli, "index", str(photos), "--name", "p", *TINY)
    assert json.loads(job.read_text())["index_kind"] == "ivf"  # not given again: the index keeps the one asked for
    json_of(cli, "index", str(photos), "--name", "p", *TINY, "--index-kind", "auto")
    assert json.loads(job.read_text())["index_kind"] == "auto"
    code, _out, err = cli("index", str(photos), "--name", "p", *TINY, "--index-kind", "hnsw")
    assert code == 2 and "invalid choice: 'hnsw'" in err
    caplog.set_level("INFO", logger="simimg.jobs.index")
    json_of(cli, "index", str(photos), "--name", "p", *TINY, "--on-disk")
    assert json.loads(job.read_text())["on_disk"] is True and "lists stay in RAM" in caplog.text  # 6 images: flat
    json_of(cli, "index", str(photos), "--name", "p", *TINY)
    assert json.loads(job.read_text())["on_disk"] is True  # as last asked
    json_of(cli, "index", str(photos), "--name", "p", *TINY, "--no-on-disk")
    assert json.loads(job.read_text())["on_disk"] is False and not list((tmp_path / "home" / "p").glob("*.ivfdata"))
