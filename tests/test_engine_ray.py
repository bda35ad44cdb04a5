"""jobs/engine_ray.py: `simimg index --engine ray` on a real local Ray instance gives the local engine's index, and
`simimg predict --engine ray` its rows.

One Ray session serves the whole module (4 logical CPUs even on 2 cores: fewer can leave a stage waiting for a
slot); the CLI runs in subprocesses join it with --address. Images are tiny (32 px crops, random-init weights) and
chunks small, so a run writes several shards to be interrupted between.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_class_images, run_main, synthetic_image
from simimg.errors import SimimgError
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob, read_index_job
from simimg.query.service import SearchService
from simimg.store import ann_ivfpq
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import publish_model
from test_ann import clustered
from test_cli import assert_one_line_error
from test_images import write_awkward, write_broken
from test_predict import assert_same_rows, build_world, predict, read_rows
from test_reliability import Rows, catalog_progress, consistent_state, second_model

CLASSES = {"circles": 8, "squares": 8, "triangles": 8}
TINY = {"weights": "none", "image_size": 32, "batch_size": 4, "chunk_size": 4}
CLI_TINY = ("--weights", "none", "--image-size", "32", "--batch-size", "4", "--chunk-size", "4")


@pytest.fixture(scope="module")
def ray_address() -> str:
    """The module's one local Ray instance; its address lets CLI subprocesses join it."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'simimg[ray]'")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A messy folder: good, awkward and broken files."""
    base = tmp_path_factory.mktemp("ray")
    data = make_class_images(base / "data", CLASSES, size=40)
    awkward = write_awkward(data / "odd")
    broken = write_broken(data / "bad")
    (data / "bad" / "dangling.png").symlink_to(base / "nowhere.png")  # skipped by the scan, before any engine
    return {"base": base, "data": data, "awkward": awkward, "broken": broken}


@pytest.fixture(scope="module")
def world(messy: dict) -> dict:
    """The messy folder and the local engine's index of it."""
    base, data, awkward, broken = messy["base"], messy["data"], messy["awkward"], messy["broken"]
    home = base / "local"
    report = run_index(IndexJob(str(data), "photos", str(home), workers=0, **TINY))
    assert report.total == sum(CLASSES.values()) + len(awkward) and len(report.skipped) == len(broken) + 1
    return {
        "data": data,
        "local": report,
        "local_rows": consistent_state(home, "photos"),
        "base": base,
        "work": report.total + len(broken),
    }


def ray_job(data: Path, home: Path, **options) -> IndexJob:
    return IndexJob(str(data), "photos", str(home), engine="ray", **{**TINY, **options})


def min_cosine(got: Rows, want: Rows) -> float:
    """The same paths with the same labels; returns the lowest per-path cosine of their vectors."""
    assert sorted((p, label) for p, (label, _) in got.items()) == sorted((p, label) for p, (label, _) in want.items())
    return min(
        float(np.dot(got[p][1], want[p][1]) / np.linalg.norm(got[p][1]) / np.linalg.norm(want[p][1])) for p in want
    )


def skips(report) -> list[tuple[str, str]]:
    return sorted((s.path, s.reason) for s in report.skipped)


def shard_paths(home: Path) -> list[Path]:
    return sorted(IndexFolder.of(home, "photos").runs.glob("*/shards/shard-*.parquet"))


def embedded_in(shards: list[Path]) -> set[str]:
    """The paths the shards hold a vector for."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(shard, columns=["path", "reason"]).to_pydict() for shard in shards]
    return {path for t in tables for path, reason in zip(t["path"], t["reason"]) if reason is None}


# --- the same index as the local engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_built(ray_address, world) -> dict:
    """The ray engine's index of the world's folder, built once; tests copy it before changing anything."""
    home = world["base"] / "ray"
    seen: list[tuple[int, int]] = []
    report = run_index(ray_job(world["data"], home), progress=lambda done, total: seen.append((done, total)))
    return {"home": home, "report": report, "progress": seen}


@pytest.mark.ray
def test_ray_engine_builds_the_same_index_as_the_local_engine(ray_built, world):
    report, local, work = ray_built["report"], world["local"], world["work"]
    assert (report.total, report.indexed, report.removed, report.version) == (local.total, local.indexed, 0, 1)
    assert skips(report) == skips(local)
    assert report.model == local.model and report.device == "ray (1 CPU actor)"
    assert ray_built["progress"][0] == (0, work) and ray_built["progress"][-1] == (work, work)
    assert min_cosine(consistent_state(ray_built["home"], "photos"), world["local_rows"]) >= 0.999
    folder = IndexFolder.of(ray_built["home"], "photos")
    assert read_index_job(folder).engine == "ray" and not folder.runs.exists()  # published: no shards left


@pytest.mark.ray
def test_updates_and_a_model_switch_on_ray_match_the_local_engine(ray_built, world, tmp_path):
    """Files added, deleted and rewritten; then every row needs the new model's vector (rows, not files, as work)."""
    edited = tmp_path / "edited"
    shutil.copytree(world["data"], edited, symlinks=True)
    for gone in ("circles/circles_000.png", "squares/squares_001.png"):
        (edited / gone).unlink()
    make_class_images(edited, {"stars": 3}, size=40, seed=1)
    synthetic_image(1, np.random.default_rng(3), 40).save(edited / "circles" / "circles_002.png")  # new content
    local, remote = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(world["base"] / "local", local)
    shutil.copytree(ray_built["home"], remote)
    want = run_index(IndexJob(str(edited), "photos", str(local), workers=0, **TINY))
    shards = tmp_path / "elsewhere"  # --ray-shards: a folder outside the index (local disk here; s3:// alike)
    written: set[str] = set()
    got = run_index(
        ray_job(edited, remote, ray_shards=str(shards)),
        progress=lambda *_: written.update(p.name for p in shards.glob("photos-*/shards/shard-*")),
    )
    assert written and list(shards.iterdir()) == [] and not IndexFolder.of(remote, "photos").runs.exists()
    assert (
        (got.indexed, got.removed, got.total, got.version)
        == (want.indexed, want.removed, want.total, 2)
        == (4, 2, world["local"].total + 1, 2)
    )
    assert skips(got) == skips(want)
    assert min_cosine(consistent_state(remote, "photos"), consistent_state(local, "photos")) >= 0.999

    net, model = second_model()
    switch = {"batch_size": 4, "chunk_size": 4, "model": model.fingerprint}
    for home in (local, remote):
        publish_model(IndexFolder.of(home, "photos"), net, model)
    want = run_index(IndexJob(str(edited), "photos", str(local), workers=0, **switch))
    got = run_index(IndexJob(str(edited), "photos", str(remote), engine="ray", **switch))
    assert got.rebuilt and (got.indexed, got.total, got.model) == (want.indexed, want.total, model.fingerprint)
    assert got.indexed == got.total and skips(got) == skips(want)
    assert min_cosine(consistent_state(remote, "photos"), consistent_state(local, "photos")) >= 0.999
    assert run_index(ray_job(edited, remote)).indexed == 0  # nothing to embed: Ray runs no pipeline


@pytest.mark.ray
def test_an_interrupted_run_ingests_its_finished_shards_and_embeds_only_the_rest(
    ray_address, world, tmp_path, monkeypatch, caplog
):
    import simimg.jobs.index

    data = tmp_path / "data"
    shutil.copytree(world["data"], data, symlinks=True)
    commit = simimg.jobs.index._commit

    def fail_at_the_first_commit(catalog, chunk, *args):
        if len(chunk):
            raise KeyboardInterrupt
        commit(catalog, chunk, *args)

    monkeypatch.setattr(simimg.jobs.index, "_commit", fail_at_the_first_commit)
    with pytest.raises(KeyboardInterrupt):
        run_index(ray_job(data, tmp_path))
    monkeypatch.undo()
    assert catalog_progress(IndexFolder.of(tmp_path, "photos").catalog) == (0, 0)
    finished = embedded_in(shard_paths(tmp_path))
    assert finished, "the first shard is on disk before it is ingested"
    changed = sorted(finished)[0]  # its shard row no longer matches the file: it is embedded again
    synthetic_image(4, np.random.default_rng(9), 40).save(data / changed, "PNG")
    with caplog.at_level(logging.INFO, logger="simimg.jobs.engine_ray"):
        report = run_index(ray_job(data, tmp_path))
    ((reused, work, rest),) = [r.args for r in caplog.records if "come from the shards" in r.getMessage()]
    # every shard on disk at the interruption, less the changed file (Ray may have finished a few more since)
    assert work == world["work"] and reused >= len(finished) - 1 and reused + rest == work
    assert report.total == world["local"].total and skips(report) == skips(world["local"])
    want_home = tmp_path / "local"
    run_index(IndexJob(str(data), "photos", str(want_home), workers=0, **TINY))
    got = consistent_state(tmp_path, "photos")
    assert min_cosine(got, consistent_state(want_home, "photos")) >= 0.999
    assert np.dot(got[changed][1], world["local_rows"][changed][1]) < 0.99  # not the stale vector of its shard


@pytest.mark.ray
@pytest.mark.e2e
def test_kill_9_mid_run_then_the_same_command_finishes_with_nothing_doubled(ray_address, world, tmp_path, caplog):
    args = [
        "index",
        str(world["data"]),
        "--home",
        str(tmp_path),
        "--name",
        "photos",
        *CLI_TINY,
        "--engine",
        "ray",
        "--address",
        ray_address,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simimg.cli", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "SIMIMG_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and not shard_paths(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = IndexFolder.of(tmp_path, "photos")
    version, committed = catalog_progress(folder.catalog)
    assert version == 0 and shard_paths(tmp_path), "killed after its first shard was written, before publishing"
    with reading(folder.catalog) as catalog:
        ingested = set(catalog.head())
    waiting = embedded_in(shard_paths(tmp_path)) - ingested
    with caplog.at_level(logging.INFO, logger="simimg.jobs.engine_ray"):
        code, out, err = run_main(*args, "--json")  # the same command, in this process (joined to that Ray)
    assert code == 0 and len(out.splitlines()) == 1, err[-3000:]
    report = json.loads(out)
    to_embed = world["local"].total - committed
    assert (report["indexed"], report["total"], report["version"]) == (to_embed, world["local"].total, 1)
    assert sorted((s["path"], s["reason"]) for s in report["skipped"]) == skips(world["local"])
    # the killed driver's tasks may still write a shard or two before Ray reaps them: those are reused as well
    ((reused, work, _),) = [r.args for r in caplog.records if "come from the shards" in r.getMessage()]
    assert work == world["work"] - committed and reused >= len(waiting)
    assert min_cosine(consistent_state(tmp_path, "photos"), world["local_rows"]) >= 0.999  # no path twice


# --- user errors: one line, nothing written ---------------------------------------------------------------------
def test_without_ray_installed_the_ray_engine_is_one_line_naming_the_extra(messy, tmp_path, monkeypatch, capsys):
    from simimg.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "simimg.jobs.engine_ray", raising=False)
    code = main(["index", str(messy["data"]), "--home", str(tmp_path), "--engine", "ray", *CLI_TINY])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, "pip install 'simimg[ray]'")
    assert list(tmp_path.iterdir()) == []


def test_ray_options_without_the_ray_engine_are_refused(messy, tmp_path):
    with pytest.raises(SimimgError, match="--address, --ray-actors only apply with --engine ray"):
        run_index(IndexJob(str(messy["data"]), "photos", str(tmp_path), address="auto", ray_actors=2, **TINY))


@pytest.mark.e2e
def test_an_unreachable_address_is_one_line_and_the_local_engine_never_imports_ray(world, tmp_path):
    """In a fresh process: a local index first, with no Ray imported; then --address where nothing listens."""
    common = [str(world["data"]), "--home", str(tmp_path), *CLI_TINY]
    script = (
        "import sys; from simimg.cli import main; assert main(sys.argv[1:]) == 0; "
        "assert 'ray' not in sys.modules and 'simimg.jobs.engine_ray' not in sys.modules; "
        "print('--', file=sys.stderr); "
        "sys.exit(main(['index', '--name', 'remote', '--engine', 'ray', '--address', '127.0.0.1:9', "
        "*sys.argv[2:]]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "index", *common, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SIMIMG_OFFLINE": "1"},
    )
    assert json.loads(proc.stdout)["total"] == world["local"].total  # the local run's report, alone on stdout
    ray_stderr = proc.stderr.split("--\n", 1)[1]
    assert_one_line_error(proc.returncode, "", ray_stderr, "cannot reach the Ray cluster at 127.0.0.1:9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the local index alone


def test_a_shard_this_process_cannot_see_names_the_ray_shards_option(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'simimg[ray]'")
    from simimg.jobs.ray_tasks import RunFolder

    with pytest.raises(SimimgError, match="pass --ray-shards a location every node reaches"):
        RunFolder(str(tmp_path)).read("shard-0.parquet")


# --- compressed indexes --------------------------------------------------------------------------------------
@pytest.mark.ray
def test_compressed_index_parts_encoded_by_ray_tasks_equal_those_encoded_here(ray_address):
    from simimg.jobs.engine_ray import PARTS_IN_FLIGHT, RayEngine

    vectors, queries = clustered(3000, dim=64), clustered(20, dim=64, seed=4)
    ids = np.arange(3000, dtype=np.int64) * 2
    trained = ann_ivfpq.train(64, ids, lambda want: vectors[want // 2])
    parts = list(ann_ivfpq.part_ranges(3000, rows=400))  # more parts than are sent at once
    assert len(parts) > PARTS_IN_FLIGHT
    here = ann_ivfpq.merge(trained, ann_ivfpq.encode_here(trained, ((ids[s], vectors[s]) for s in parts)))
    on_ray = ann_ivfpq.merge(trained, RayEngine.encode_parts(trained, ((ids[s], vectors[s]) for s in parts)))
    assert on_ray.ntotal == here.ntotal == 3000
    assert np.array_equal(here.search(queries, 10)[1], on_ray.search(queries, 10)[1])


@pytest.mark.ray
def test_the_ray_engine_builds_a_compressed_index_that_is_served(ray_address, tmp_path):
    data = make_class_images(tmp_path / "data", {"circles": 130, "squares": 130}, size=32)
    # 4 tasks of 65 images, not 65 of 4: what is tested is the compressed index, not the scheduling
    report = run_index(ray_job(data, tmp_path / "home", index_kind="ivfpq", batch_size=32, chunk_size=65))
    service = SearchService(tmp_path / "home", "photos")
    assert report.total == 260 and service.info()["index_kind"] == "ivfpq"
    assert service.search(data / "squares" / "squares_007.png", k=1).neighbors[0].path == "squares/squares_007.png"


# --- real photos ----------------------------------------------------------------------------------------------
@pytest.mark.datasets
@pytest.mark.ray
def test_cats_dogs_val_at_64_px_matches_the_local_engine(ray_address, shared_dataset, tmp_path):
    """Real JPEGs of many sizes (cats_dogs/val, 700: the 1,400 of train/ added nothing but 25 s to the suite)."""
    val = shared_dataset("cats_dogs") / "val"
    job = IndexJob(str(val), "val", str(tmp_path / "local"), weights="none", image_size=64, workers=0)
    local = run_index(job)
    ray = run_index(replace(job, home=str(tmp_path / "ray"), engine="ray"))
    cosine = min_cosine(consistent_state(tmp_path / "ray", "val"), consistent_state(tmp_path / "local", "val"))
    print(
        f"cats_dogs/val 64 px: total {ray.total} (local {local.total}), skipped {len(ray.skipped)} "
        f"(local {len(local.skipped)}), min cosine {cosine:.6f}; {ray.seconds:.1f} s on {ray.device}, "
        f"local {local.seconds:.1f} s"
    )
    assert (ray.total, skips(ray)) == (local.total, skips(local)) and ray.total == 700
    assert cosine >= 0.999


# --- simimg predict on the ray engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """test_predict.py's collection with its head and a folder to classify, here to share this module's Ray."""
    return build_world(tmp_path_factory.mktemp("predict"))


@pytest.mark.ray
def test_predict_on_the_ray_engine_gives_the_local_engines_rows(predict_world, tmp_path, ray_address):
    local = predict(predict_world, tmp_path / "local.jsonl")
    report = predict(
        predict_world, tmp_path / "ray.jsonl", engine="ray", address=ray_address, batch_size=2, chunk_size=4
    )
    assert report.device.startswith("ray") and report.rows == local.rows
    assert sorted(s.path for s in report.skipped) == sorted(s.path for s in local.skipped)
    assert_same_rows(read_rows(tmp_path / "ray.jsonl"), read_rows(tmp_path / "local.jsonl"), atol=1e-3)
    assert not (tmp_path / "ray.jsonl.parts").exists()
