"""jobs/predict.py: `simimg predict` classifies a folder into a file, a row per readable image, bad files reported
by path; a killed run resumes. (That the ray engine gives the local engine's rows is in test_engine_ray.py, beside
the other Ray tests, on the one Ray instance they share.)

One index serves the module: three classes of tiny generated shapes (random-init weights, 32 px crops) and two
unlabelled images beside the class folders, with a head-only classifier.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import simimg
from conftest import ROOT, make_class_images, run_cli
from simimg.cli import main
from simimg.errors import SimimgError
from simimg.jobs import predict as predict_module
from simimg.jobs.index import switch_model
from simimg.jobs.predict import Parts, Version
from simimg.jobs.predict_config import COLUMNS, PredictJob
from simimg.models.net import describe, with_classes
from simimg.store.ann import FaissSearcher, build_ann
from simimg.store.catalog import Snapshot
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model, publish_model, serving_model
from test_cli import assert_one_line_error
from test_images import BROKEN, write_files

CLASSES = {"circles": 8, "squares": 8, "triangles": 8}
NEW = {name: 3 for name in CLASSES}
BAD = ("truncated.jpg", "notes.jpg", "empty.png")  # a truncated image, a text file named .jpg, an empty file
TINY = {"weights": "none", "image_size": 32, "workers": 0}
PREDICT = {"workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_world(tmp_path_factory.mktemp("predict"))


def build_world(base: Path) -> dict:
    """The indexed collection (with a plain copy of its index before the head), and a new folder to classify."""
    data = make_class_images(base / "shapes", CLASSES, size=40)
    new = make_class_images(base / "new", NEW, size=40, seed=1)
    shutil.copy(new / "circles" / "circles_000.png", data / "loose_copy.png")  # unlabelled in the index
    shutil.copy(data / "squares" / "squares_000.png", data / "loose_square.png")
    write_files(new / "odd", {name: BROKEN[name][0] for name in BAD})
    (new / "README.txt").write_text("not an image name: never looked at")
    home = base / "home"
    simimg.build_index(data, "shapes", home, **TINY)
    shutil.copytree(home, base / "plain")
    simimg.train(data, "shapes", home, head_only=True)
    return {"base": base, "data": data, "new": new, "home": home, "plain": base / "plain"}


def read_rows(path: Path, fmt: str | None = None) -> list[dict]:
    """The rows of a predict output in any format (default: its extension's), as JSON types (no neighbour: None)."""
    fmt = fmt or path.suffix[1:]
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key.startswith("probability") or key in ("margin", "neighbor_score"):
                row[key] = float(value) if value else None
            elif key == "uncertain":
                row[key] = {"true": True, "false": False}[value]
            elif value == "":
                row[key] = None
    return rows


def assert_same_rows(rows: list[dict], want: list[dict], atol: float = 1e-4) -> None:
    """The same paths in the same order with the same labels and neighbours; numbers equal up to `atol` (a batch of
    another size may change a float's last bits)."""
    assert [row["path"] for row in rows] == [row["path"] for row in want]
    for got, expected in zip(rows, want):
        for key, value in expected.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=atol), (got["path"], key)
            elif key != "uncertain" or abs(expected["margin"] - 0.2) > atol:
                assert got[key] == value, (got["path"], key)


def columns(k: int) -> list[str]:
    return [*COLUMNS, *(f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "probability"))]


def good_paths() -> list[str]:
    return sorted(f"{label}/{label}_{i:03d}.png" for label, n in NEW.items() for i in range(n))


def predict(world: dict, out: Path, home: Path | None = None, **options) -> simimg.PredictReport:
    return simimg.predict(world["new"], "shapes", out, home or world["home"], **{**PREDICT, **options})


# --- the rows --------------------------------------------------------------------------------------------
def test_every_readable_image_gets_a_row_and_every_bad_file_is_reported_by_path(world, tmp_path):
    phases: list[str] = []
    seen: list[tuple[int, int]] = []
    report = predict(
        world, tmp_path / "out" / "preds.csv", progress=lambda d, t: seen.append((d, t)), on_phase=phases.append
    )
    assert phases == ["scanning", "loading the model", "classifying", "writing"]
    assert (report.rows, report.format, report.resumed) == (len(good_paths()), "csv", 0)
    assert report.model == serving_model(IndexFolder.of(world["home"], "shapes"))
    reasons = {s.path: s.reason for s in report.skipped}
    assert set(reasons) == {f"odd/{name}" for name in BAD}
    assert all(BROKEN[name][1] in reasons[f"odd/{name}"] for name in BAD)
    assert seen[-1] == (len(good_paths()) + len(BAD),) * 2
    rows = read_rows(tmp_path / "out" / "preds.csv")
    assert [row["path"] for row in rows] == good_paths() and list(rows[0]) == columns(3)
    for row in rows:
        probabilities = [row[f"probability_{i}"] for i in (1, 2, 3)]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5) and probabilities == sorted(probabilities)[::-1]
        assert (row["label"], row["probability"]) == (row["label_1"], row["probability_1"])
        assert row["margin"] == pytest.approx(row["probability_1"] - row["probability_2"], abs=2e-6)
        assert row["neighbor"].split("/")[0] == row["neighbor_label"] in CLASSES  # a labelled image of the index
        assert -1 <= row["neighbor_score"] <= 1.000001
        assert row["uncertain"] == (row["margin"] < 0.2 or row["neighbor_label"] != row["label"])
    right = sum(row["label"] == row["path"].split("/")[0] for row in rows)
    assert right >= len(rows) - 1, rows  # colour and shape tell the classes apart even on random features
    assert report.uncertain == sum(row["uncertain"] for row in rows)
    assert not (tmp_path / "out" / "preds.csv.parts").exists()
    recorded = json.loads((tmp_path / "out" / "preds.csv.job.json").read_text())
    assert (recorded["model"], recorded["version"], recorded["job"]["out"]) == (
        report.model,
        report.version,
        str(tmp_path / "out" / "preds.csv"),
    )


@pytest.mark.slow
def test_rows_agree_with_the_warm_service_and_each_format_holds_the_same_rows(world, tmp_path):
    outputs = {fmt: tmp_path / f"preds.{fmt}" for fmt in ("csv", "parquet", "jsonl")}
    for fmt, out in outputs.items():
        assert predict(world, out, chunk_size=4, batch_size=5).format == fmt
    rows = {fmt: read_rows(out) for fmt, out in outputs.items()}
    assert rows["csv"] == rows["jsonl"] == rows["parquet"]
    service = simimg.open_index("shapes", world["home"], device="cpu")
    try:
        want = service.predict([world["new"] / row["path"] for row in rows["csv"]])
    finally:
        service.close()
    for row, prediction in zip(rows["csv"], want):
        assert row["label"] == prediction.label
        assert row["probability"] == pytest.approx(prediction.probability, abs=1e-4)


@pytest.mark.slow
def test_top_k_is_capped_by_the_classes_and_format_overrides_the_extension(world, tmp_path):
    report = predict(world, tmp_path / "preds.txt", top_k=10, format="jsonl")
    assert report.format == "jsonl" and list(read_rows(tmp_path / "preds.txt", "jsonl")[0]) == columns(3)
    predict(world, tmp_path / "top1.csv", top_k=1)
    rows = read_rows(tmp_path / "top1.csv")
    assert list(rows[0]) == columns(1) and all(0 <= row["margin"] <= row["probability"] for row in rows)


@pytest.mark.slow
def test_predicting_the_indexed_folder_never_names_an_image_or_an_unlabelled_one_its_own_neighbour(world, tmp_path):
    report = simimg.predict(world["data"], "shapes", tmp_path / "self.jsonl", world["home"], **PREDICT)
    rows = read_rows(tmp_path / "self.jsonl")
    assert report.rows == sum(CLASSES.values()) + 2 and report.skipped == []
    assert all(row["neighbor"] != row["path"] for row in rows)
    assert all("/" in row["neighbor"] for row in rows)  # loose_*.png have no label: never a neighbour
    loose = next(row for row in rows if row["path"] == "loose_square.png")
    assert (loose["neighbor"], loose["neighbor_score"]) == ("squares/squares_000.png", pytest.approx(1, abs=1e-5))


def test_the_nearest_labelled_image_skips_unlabelled_ones_and_the_image_itself():
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 0, 1]] + np.float32(0.01) * np.arange(4, dtype=np.float32)[:, None]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.array([1, 2, 3, 4])
    snapshot = Snapshot(1, "m", "e", "flat", ids, ["a.png", "b/b.png", "c/c.png", "d/d.png"], [None, "b", "c", "d"], [])
    searcher = FaissSearcher(build_ann(ids, vectors, 4, "flat"))
    version = Version(snapshot, None, searcher, ids[1:], "/data")  # type: ignore[arg-type]
    found = version.nearest(vectors[[0, 1, 3]], ["/elsewhere/x.png", "/data/b/b.png", "/data/d/d.png"])
    assert [(path, label) for path, label, _ in found] == [("b/b.png", "b"), ("c/c.png", "c"), ("c/c.png", "c")]
    nobody = Version(snapshot, None, searcher, ids[:0], "/data")  # type: ignore[arg-type]
    assert nobody.nearest(vectors[:1], ["/x.png"]) == [None]


@pytest.mark.slow
def test_a_head_on_the_raw_features_gets_the_features_before_normalisation(world, tmp_path):
    """A fine-tuned model's head reads the pooled features as they are (not the unit vectors FAISS holds)."""
    home = tmp_path / "home"
    shutil.copytree(world["home"], home)
    folder = IndexFolder.of(home, "shapes")
    base = load_model(folder, serving_model(folder))
    torch.manual_seed(0)
    model = with_classes(base, tuple(CLASSES), unit_head=False)
    bundle = describe(
        model.net,
        base.bundle.arch,
        tuple(CLASSES),
        base.bundle.preprocess,
        "test",
        "fine-tuned",
        embedding=base.bundle.embedding,
    )
    publish_model(folder, model.net, bundle)
    assert switch_model(home, "shapes", bundle.fingerprint).indexed == 0
    report = predict(world, tmp_path / "raw.jsonl", home)
    rows = read_rows(tmp_path / "raw.jsonl")
    assert report.model == bundle.fingerprint
    service = simimg.open_index("shapes", home, device="cpu")
    try:
        want = service.predict([world["new"] / row["path"] for row in rows])
    finally:
        service.close()
    got = [[row[f"probability_{i}"] for i in (1, 2, 3)] for row in rows]
    assert np.allclose(got, [[t["probability"] for t in p.top] for p in want], atol=1e-4)


# --- resuming ---------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def interrupt_after(n: int):
    def progress(done: int, total: int) -> None:
        if done >= n:
            raise Interrupted

    return progress


def test_an_interrupted_run_resumes_from_its_parts_and_redoes_only_what_changed(world, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(world["new"], new)
    clean = simimg.predict(new, "shapes", tmp_path / "clean.csv", world["home"], **PREDICT)
    out = tmp_path / "preds.csv"
    options = {**PREDICT, "batch_size": 2, "chunk_size": 2}
    with pytest.raises(Interrupted):
        simimg.predict(new, "shapes", out, world["home"], progress=interrupt_after(6), **options)
    parts = sorted((tmp_path / "preds.csv.parts").glob("part-*.jsonl"))
    assert len(parts) >= 3 and not out.exists()
    held = [json.loads(line)["path"] for part in parts for line in part.read_text().splitlines()]
    changed = held[0]
    shutil.copy(world["data"] / "squares" / "squares_001.png", new / changed)  # another image since the kill
    (new / held[1]).unlink()  # and one gone
    report = simimg.predict(new, "shapes", out, world["home"], **options)
    assert report.resumed == len(held) - 2
    rows = read_rows(out)
    want = [row for row in read_rows(tmp_path / "clean.csv") if row["path"] != held[1]]
    assert [row["path"] for row in rows] == [row["path"] for row in want]  # each path once, in order
    assert_same_rows([r for r in rows if r["path"] != changed], [w for w in want if w["path"] != changed])
    assert next(r for r in rows if r["path"] == changed)["label"] == "squares"
    assert sorted(s.path for s in report.skipped) == sorted(s.path for s in clean.skipped)
    assert not (tmp_path / "preds.csv.parts").exists()


def test_parts_merge_in_rounds_to_each_paths_newest_record_in_path_order(tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "MERGE_FAN_IN", 3)
    parts = Parts(tmp_path / "out.csv.parts")
    parts.root.mkdir()
    rng = np.random.default_rng(0)
    newest: dict[str, int] = {}
    for n in range(10):  # 10 parts: merged 3 at a time, in two rounds
        paths = sorted({f"{rng.integers(0, 30):02d}.png" for _ in range(4)})
        parts.add([{"path": path, "part": n} for path in paths], chunk_size=len(paths))
        newest.update(dict.fromkeys(paths, n))
    assert len(parts.files()) == 10
    merged = list(parts.merged(set(newest) - {"00.png"}))
    assert [(r["path"], r["part"]) for r in merged] == sorted((p, n) for p, n in newest.items() if p != "00.png")


@pytest.mark.slow
def test_a_rerun_with_other_options_starts_over_instead_of_mixing_rows(world, tmp_path, caplog):
    out = tmp_path / "preds.jsonl"
    with pytest.raises(Interrupted):
        predict(world, out, batch_size=2, chunk_size=2, progress=interrupt_after(4))
    report = predict(world, out, top_k=2)
    assert report.resumed == 0 and "holds the parts of another run (top_k differ)" in caplog.text
    assert all(list(row) == columns(2) for row in read_rows(out))


@pytest.mark.e2e
def test_kill_9_after_the_first_part_then_the_same_command_finishes_with_every_path_once(world, tmp_path):
    new = tmp_path / "many"
    make_class_images(new, {name: 40 for name in CLASSES}, size=40, seed=2)
    write_files(new / "odd", {name: BROKEN[name][0] for name in BAD})
    clean = simimg.predict(new, "shapes", tmp_path / "clean.parquet", world["home"], **PREDICT)
    out = tmp_path / "preds.parquet"
    args = ["predict", str(new), "--name", "shapes", "--home", str(world["home"]), "--out", str(out)]
    args += ["--batch-size", "2", "--chunk-size", "4", "--workers", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simimg.cli", *args],
        cwd=ROOT,
        env={**os.environ, "SIMIMG_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "preds.parquet.parts"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not list(parts.glob("part-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(parts.glob("part-*.jsonl")) and not out.exists(), "killed after its first part, before the end"
    report = json.loads(run_cli(*args, "--json").stdout)
    assert 0 < report["resumed"] < clean.rows + len(BAD) and report["rows"] == clean.rows
    rows = read_rows(out)
    assert len({row["path"] for row in rows}) == len(rows) == clean.rows
    assert_same_rows(rows, read_rows(tmp_path / "clean.parquet"))
    assert sorted(s["path"] for s in report["skipped"]) == sorted(s.path for s in clean.skipped)


# --- the command ------------------------------------------------------------------------------------------
@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `simimg ARGS` in process; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("SIMIMG_OFFLINE", "1")

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_the_command_prints_only_its_report_with_json(world, tmp_path, cli):
    out = tmp_path / "preds.csv"
    args = ["predict", str(world["new"]), "--name", "shapes", "--home", str(world["home"]), "--out", str(out)]
    code, stdout, stderr = cli(*args, "--workers", "0", "--top-k", "2", "--uncertain-margin", "0.5", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["rows"] == len(good_paths()) and report["out"] == str(out) and report["format"] == "csv"
    assert {s["path"] for s in report["skipped"]} == {f"odd/{name}" for name in BAD}
    rows = read_rows(out)
    assert list(rows[0]) == columns(2) and all(row["uncertain"] for row in rows if row["margin"] < 0.5)
    code, stdout, _ = cli(*args, "--workers", "0")
    assert code == 0 and f"{len(good_paths())} images classified" in stdout and "skipped odd/notes.jpg" in stdout


@pytest.mark.parametrize(
    ("extra", "phrases"),
    [
        (["--out", "preds.txt"], ("cannot tell the format", "--format")),
        (["--out", "p.csv", "--ray-actors", "2"], ("--ray-actors only apply with --engine ray",)),
        (["--out", "p.csv", "--uncertain-margin", "2"], ("not a probability",)),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(world, tmp_path, cli, extra, phrases, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("predict", str(world["new"]), "--name", "shapes", "--home", str(world["home"]), *extra)
    assert_one_line_error(code, out, err, *phrases)
    assert list(tmp_path.iterdir()) == []


def test_an_index_without_a_classifier_or_without_images_is_one_line(world, tmp_path, cli):
    common = ["--out", str(tmp_path / "p.csv"), "--home"]
    code, out, err = cli("predict", str(world["new"]), "--name", "shapes", *common, str(world["plain"]))
    assert_one_line_error(code, out, err, "no classifier", "--head-only")
    code, out, err = cli("predict", str(world["new"]), "--name", "nothing", *common, str(world["home"]))
    assert_one_line_error(code, out, err, "no index named 'nothing'")
    (tmp_path / "empty").mkdir()
    code, out, err = cli("predict", str(tmp_path / "empty"), "--name", "shapes", *common, str(world["home"]))
    assert_one_line_error(code, out, err, "no images found")


def test_unknown_options_are_named(world, tmp_path):
    with pytest.raises(SimimgError, match="unknown option"):
        simimg.predict(world["new"], "shapes", tmp_path / "p.csv", world["home"], topk=3)
    assert PredictJob.top_k == 3  # the CLI's default comes from the job config
