"""The Streamlit app, driven in-process by AppTest: every page, the first run, queries, bad uploads, jobs."""

from __future__ import annotations

import io
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import streamlit as st
from PIL import Image
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

import job_tasks
import simimg
from conftest import ROOT, Built, copy_built, make_class_images

APP = str(ROOT / "app.py")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the app from an empty folder of its own: ./data and ./indexes are the test's. The server address is
    localhost, as the repository's .streamlit/config.toml sets it (this folder has none)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMIMG_HOME", str(tmp_path / "indexes"))
    monkeypatch.setenv("SIMIMG_OFFLINE", "1")
    monkeypatch.delenv("SIMIMG_DATA_ROOTS", raising=False)
    monkeypatch.delenv("SIMIMG_ALLOW_OPEN", raising=False)
    st.cache_resource.clear()
    st.cache_data.clear()
    before = st_config.get_option("server.address")
    st_config.set_option("server.address", "localhost")
    yield tmp_path
    st_config.set_option("server.address", before)


@pytest.fixture
def indexed(workdir: Path, shapes_index: Built, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's 'shapes' (3 classes x 6): BASE/data/shapes in BASE/indexes/shapes; returns BASE."""
    monkeypatch.setenv("SIMIMG_HOME", str(shapes_index.home))
    monkeypatch.setenv("SIMIMG_DATA_ROOTS", str(shapes_index.base / "data"))
    return shapes_index.base


def open_app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def uploader(at: AppTest):
    """The Search page's uploader (its key changes when "Find similar" clears it)."""
    (found,) = [u for u in at.file_uploader if u.key.startswith("upload-")]
    return found


def upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    uploader(at).set_value((name, data, mime)).run()
    assert not at.exception, at.exception
    return at


def run_until(at: AppTest, done, timeout: float = 180) -> AppTest:
    """Rerun the page (as the browser's polling would) until `done(at)` or the timeout: once a second, as each
    rerun is the whole page here (the browser reruns a fragment) and takes CPU from the job it waits for."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        at.run()
        assert not at.exception, at.exception
        if done(at):
            return at
        time.sleep(1.0)
    raise AssertionError("the background job did not finish in time")


# --- first run -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_first_run_shows_the_guide_and_builds_the_demo(workdir: Path):
    at = open_app()
    assert "Put class folders under `data/`" in at.markdown[0].value
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert sorted(p.name for p in (workdir / "data" / "demo").iterdir()) == ["forests", "oceans", "sunsets"]
    at.run()
    assert uploader(at) is not None
    assert "**36** images" in at.caption[0].value


@pytest.mark.parametrize("page", ["app_pages/inspect.py", "app_pages/review.py"])
def test_other_pages_offer_the_guide_without_an_index(workdir: Path, page: str):
    at = open_app(page)
    assert any("Put class folders" in m.value for m in at.markdown)
    assert not at.error


# --- search --------------------------------------------------------------------------------------------
def test_query_shows_the_image_and_a_result_grid(indexed: Path):
    at = open_app()
    at.slider[0].set_value(5).run()
    query = indexed / "data" / "shapes" / "squares" / "squares_002.png"
    upload(at, "query.png", png_bytes(query))
    assert not at.error
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert len(cards) == 5
    assert "score 1.000" in cards[0] and "squares" in cards[0]  # the query itself is in the gallery
    assert at.caption[1].value == "squares/squares_002.png"
    assert len(at.image) == 6  # the query and five thumbnails
    assert any("no classifier" in i.value for i in at.info)


def test_find_similar_requeries_with_the_gallery_image(indexed: Path):
    at = open_app()
    upload(at, "query.png", png_bytes(indexed / "data" / "shapes" / "circles" / "circles_000.png"))
    second = next(b.key for b in at.button if b.key.startswith("similar-2-")).removeprefix("similar-2-")
    at.button(key=f"similar-2-{second}").click().run()
    assert not at.exception
    assert at.image[0].captions == [Path(second).name]  # the new query, shown as the current one
    assert any(f"Searching with **{Path(second).name}** from the collection" in c.value for c in at.caption)
    assert uploader(at).key == "upload-1" and uploader(at).value is None  # the old file name is gone
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert "score 1.000" in cards[0]


@pytest.mark.slow
def test_label_filter_and_min_score(indexed: Path):
    at = open_app()
    at.selectbox[1].set_value("triangles").run()
    upload(at, "query.png", png_bytes(indexed / "data" / "shapes" / "circles" / "circles_000.png"))
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert cards and all("triangles" in c for c in cards)
    at.slider[1].set_value(1.0).run()
    assert not [m for m in at.markdown if m.value.startswith("**#")]
    assert any("Nothing matches" in w.value for w in at.warning)
    assert not any("most similar" in h.value for h in at.subheader)


def test_a_warm_query_reloads_nothing(indexed: Path, monkeypatch: pytest.MonkeyPatch):
    import simimg.query.service

    loads = []
    real = simimg.query.service.load_model
    monkeypatch.setattr(simimg.query.service, "load_model", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    at = open_app()
    upload(at, "a.png", png_bytes(indexed / "data" / "shapes" / "circles" / "circles_001.png"))
    upload(at, "b.png", png_bytes(indexed / "data" / "shapes" / "squares" / "squares_001.png"))
    assert len(loads) == 1


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")
    return buffer.getvalue()


def _truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("text", "not an image"),
        pytest.param("truncated", "truncated", marks=pytest.mark.slow),
        pytest.param("bomb", "decompression bomb", marks=pytest.mark.slow),
        pytest.param("empty", "empty file", marks=pytest.mark.slow),
    ],
)
def test_bad_uploads_show_an_error_and_the_app_keeps_working(indexed: Path, kind: str, expected: str):
    good = indexed / "data" / "shapes" / "circles" / "circles_003.png"
    data = {
        "text": b"just some words, not pixels\n" * 20,
        "truncated": _truncated(good),
        "bomb": _bomb(),
        "empty": b"",
    }[kind]
    at = open_app()
    upload(at, f"{kind}.png", data)
    assert len(at.error) == 1 and expected in at.error[0].value
    upload(at, "good.png", png_bytes(good))
    assert not at.error and [m for m in at.markdown if m.value.startswith("**#")]


def test_an_upload_over_the_size_cap_is_refused(indexed: Path):
    st_config.set_option("server.maxUploadSize", 1)
    try:
        at = open_app()
        upload(at, "big.png", b"\x89PNG" + bytes(1024 * 1024 + 10))
    finally:
        st_config.set_option("server.maxUploadSize", 20)
    assert len(at.error) == 1 and "the limit is 1 MB" in at.error[0].value


# --- index ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_index_page_builds_and_lists_skipped_files(workdir: Path):
    folder = make_class_images(workdir / "data" / "mixed", {"red": 4, "green": 4}, size=40)
    (folder / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "green" / "notes.jpg").write_text("a text file with an image's name")
    at = open_app("app_pages/build.py")
    at.text_input(key="index-folder").set_value("data/mixed")
    at.text_input[1].set_value("mixed")
    at.radio[0].set_value("none")
    at.select_slider[0].set_value(64)
    at.button[0].click().run()
    assert not at.exception and not at.error
    run_until(at, lambda a: bool(a.success))
    assert "Index **mixed** is at version 1: 8 images" in at.success[0].value
    skipped = at.dataframe[0].value
    assert sorted(skipped["path"]) == ["green/notes.jpg", "red/broken.png"]
    assert all(skipped["reason"].str.len() > 5)


def test_index_page_refuses_folders_outside_the_data_roots(workdir: Path, tmp_path_factory):
    outside = make_class_images(tmp_path_factory.mktemp("elsewhere"), {"a": 2}, size=32)
    at = open_app("app_pages/build.py")
    for typed in (str(outside), "data/../../", "/etc"):
        at.text_input(key="index-folder").set_value(typed)
        at.button[0].click().run()
        assert not at.exception
        assert "is outside the allowed data roots" in at.error[0].value
    assert not (workdir / "indexes").exists()


# --- train and inspect (their modules arrive separately) ----------------------------------------------------
@pytest.mark.slow
def test_train_page_previews_trains_and_links_to_search_which_predicts_and_inspect_evaluates(workdir: Path):
    """One full training run through the Train page (was two tests, each training its own model): the class
    preview, the run, the form kept, then Search predicts with the new model and Inspect evaluates it."""
    make_class_images(workdir / "data" / "toys", {"red": 5, "blue": 5}, size=32)
    at = open_app("app_pages/train.py")
    at.radio(key="train-mode").set_value("full").run()
    preview = at.dataframe[0].value
    assert list(preview["class"]) == ["blue", "red"] and list(preview["train"]) == [4, 4]
    assert "seeded 80/20 split" in preview.columns[-1]
    at.text_input[1].set_value("toys")
    at.radio(key="train-weights").set_value("none").run()
    at.number_input(key="train-epochs").set_value(1)
    at.select_slider(key="train-size").set_value(64)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and not at.error
    run_until(at, lambda a: bool(a.success) or bool(a.error))
    assert not at.error, at.error[0].value
    assert "validation accuracy" in at.success[0].value and "now serves it (version 1)" in at.success[0].value
    assert at.get("page_link")[0].proto.label == "Search **toys**"
    assert at.number_input(key="train-epochs").value == 1  # the form kept what the user chose

    at.switch_page("app_pages/search.py").run()
    upload(at, "q.png", png_bytes(workdir / "data" / "toys" / "red" / "red_000.png"))
    assert at.metric[0].label == "Predicted class"
    assert at.metric[0].value in ("red", "blue")

    at.switch_page("app_pages/inspect.py").run()
    at.button[0].click().run()
    run_until(at, lambda a: any(m.label == "Accuracy" for m in a.metric))
    assert [m.label for m in at.metric][:2] == ["Accuracy", "Macro F1"]
    matrix = at.dataframe[1].value
    assert list(matrix.columns) == ["blue", "red"] and int(matrix.values.sum()) > 0
    at.session_state["confusion"] = {"selection": {"rows": [], "columns": [], "cells": [(0, "red")]}}
    at.run()
    assert not at.exception
    assert any("images of **blue** predicted as **red**" in m.value for m in at.markdown)


def test_inspect_page_map_and_duplicates(indexed: Path):
    at = open_app("app_pages/inspect.py")
    assert any("no classifier" in i.value for i in at.info)
    assert not at.error
    at.slider[-1].set_value(0.8).run()
    assert not at.exception
    pairs = at.dataframe[-1].value
    assert len(pairs) > 0 and (pairs["score"] >= 0.8).all()
    at.radio[0].set_value("tsne").run()
    assert not at.exception


# --- model versions: quick training, the Models tab, one writer per index ----------------------------------
@pytest.mark.slow
def test_quick_training_then_switching_models_from_the_models_tab(
    indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shutil.copytree(indexed / "indexes", tmp_path / "home")  # this test changes the index: a copy of its own
    monkeypatch.setenv("SIMIMG_HOME", str(tmp_path / "home"))
    header = open_app().caption[0].value  # Search loads the service, at version 1
    assert "random-init (untrained) model" in header and "pretrained" not in header  # issue 18, item 9
    at = open_app("app_pages/train.py")
    assert at.radio(key="train-mode").value == "quick"  # offered first
    next(b for b in at.button if b.label == "Train the classifier").click().run()
    run_until(at, lambda a: bool(a.success) or bool(a.error))
    assert not at.error, at.error[0].value
    assert "now serves it (version 2)" in at.success[0].value
    at.switch_page("app_pages/search.py").run()
    upload(at, "q.png", png_bytes(indexed / "data" / "shapes" / "circles" / "circles_000.png"))
    assert at.metric[0].label == "Predicted class"
    header = at.caption[0].value  # item 5: the header agrees with the prediction under it
    assert "classifier over 3 classes" in header and "version 2" in header, header
    at.switch_page("app_pages/inspect.py").run()
    models = at.dataframe[0].value
    assert list(models["kind"]) == ["head", "pretrained"] and list(models["serving"]) == ["✔", ""]
    at.selectbox(key="chosen-model").set_value(models["model"][1]).run()
    next(b for b in at.button if b.label == "Serve this model").click().run()
    run_until(at, lambda a: any("serves **shapes** from version 3" in s.value for s in a.success))
    assert list(at.dataframe[0].value["serving"]) == ["", "✔"]
    fresh = open_app("app_pages/inspect.py")  # item 10: a new session offers the serving model, not the newest
    assert fresh.selectbox(key="chosen-model").value == models["model"][1]


def test_a_second_session_cannot_start_a_writer_on_a_busy_index(
    indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from simimg.app import shared
    from simimg.app.background import JobBoard, Task

    board = JobBoard()
    release = tmp_path / "release"
    board.start(
        "shapes",
        "train",
        "Training of 'shapes'",
        Task(job_tasks.wait_for, {"path": str(release)}),
        owner="another tab",
    )
    monkeypatch.setattr(shared, "board", lambda: board)  # the process's board, as another tab left it
    try:
        at = open_app("app_pages/train.py")
        assert any("Training of 'shapes'** is running on this index" in i.value for i in at.info)
        next(b for b in at.button if b.label == "Train the classifier").click().run()
        assert "index 'shapes' is busy: Training of 'shapes' has been running" in at.error[0].value
    finally:
        release.touch()


def test_another_tab_cancels_a_running_build_after_confirming(
    indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Issue 18, item 7: a job whose tab was closed can still be stopped, from any tab, after a confirmation."""
    from simimg.app import shared
    from simimg.app.background import JobBoard, Task

    board = JobBoard()
    job = board.start(
        "shapes",
        "build",
        "Indexing shapes into 'shapes'",
        Task(job_tasks.wait_for, {"path": str(tmp_path / "never")}),
        owner="a closed tab",
    )
    monkeypatch.setattr(shared, "board", lambda: board)
    at = open_app("app_pages/build.py")
    assert any("is running on this index" in i.value for i in at.info)
    at.button(key=f"cancel-build-shapes-{job.started}-ask").click().run()
    assert any("Stop **Indexing shapes into 'shapes'**?" in w.value for w in at.warning)
    assert job.running and not job.stop.is_set()  # nothing stops before the confirmation
    at.button(key=f"cancel-build-shapes-{job.started}-no").click().run()
    assert not any("Stop **" in w.value for w in at.warning) and not job.stop.is_set()
    at.button(key=f"cancel-build-shapes-{job.started}-ask").click().run()
    at.button(key=f"cancel-build-shapes-{job.started}-yes").click().run()
    deadline = time.time() + 30
    while job.running and time.time() < deadline:
        time.sleep(0.1)
    assert job.cancelled and not job.running and job.error is None  # its process was ended, not failed


# --- issue 13: what a first walk through every page hit ------------------------------------------------
@pytest.mark.slow
def test_weights_forms_check_the_cache_first_and_use_the_same_words(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    from test_net import write_densenet121_checkpoint

    make_class_images(workdir / "data" / "pets", {"a": 3, "b": 3}, size=32)
    monkeypatch.setenv("TORCH_HOME", str(workdir / "torch_home"))
    for page, key in (("app_pages/build.py", "index-weights"), ("app_pages/train.py", "train-weights")):
        at = open_app(page)
        if page.endswith("train.py"):
            at.radio(key="train-mode").set_value("full").run()
        radio = at.radio(key=key)
        assert radio.options == ["ImageNet weights", "Scratch (random init)", "An earlier simimg model"]
        assert radio.value == "none"  # offline and not cached: a choice that works is preselected
        note = next(c.value for c in at.caption if "not on this machine" in c.value)
        assert "densenet121-a639ec97.pth" in note and str(workdir / "torch_home" / "hub" / "checkpoints") in note
    write_densenet121_checkpoint(workdir / "torch_home")
    at = open_app("app_pages/build.py")
    assert at.radio(key="index-weights").value == "imagenet"
    assert not any("not on this machine" in c.value for c in at.caption)


def test_errors_in_the_app_never_name_a_command(workdir: Path):
    from simimg.app.shared import app_message

    library_messages = [
        "no index catalog at x/catalog.sqlite: build it with `simimg index`",
        "index 'p' has no finished version yet: run `simimg index` on it",
        "index 'p' is inconsistent (FAISS 3 vectors, catalog 4); re-run `simimg index` to repair it",
        "index catalog c was written by another version of simimg (schema 1, this one reads 2); run `simimg upgrade "
        "--name p` to convert it",
        "index 'p' keeps no model ab (in m); `simimg models --name p` lists the ones it has",
        "model ab of 'p' has no trained classifier: run `simimg train DATA_DIR --name p` (add --head-only for one in "
        "seconds)",
        "index 'p' has no finished version yet, so no model serves it: run `simimg index` on it, `simimg use MODEL "
        "--name p`, or pass --model",
        "ImageNet weights for densenet121 are not cached and cannot be fetched (x). Download u on a connected machine "
        "and put it at t (or set TORCH_HOME ...); or use --weights none to start from random init, or --weights PATH "
        "for an earlier simimg model.",
        "--head-only fits on an index's stored embeddings, and 'p' has none yet: run `simimg index DATA_DIR --name p` "
        "first",
    ]
    for message in library_messages:
        shown = app_message(message)
        assert "`simimg" not in shown and " --" not in shown and not shown.startswith("--"), shown


@pytest.mark.slow
def test_a_failed_new_attempt_shows_its_error_alone(workdir: Path):
    make_class_images(workdir / "data" / "mixed", {"red": 3, "green": 3}, size=32)
    at = open_app("app_pages/build.py")
    at.text_input(key="index-folder").set_value("data/mixed")
    at.radio(key="index-weights").set_value("none")
    at.select_slider(key="index-size").set_value(64)
    next(b for b in at.button if b.label == "Build or update").click().run()
    run_until(at, lambda a: bool(a.success))
    assert "Index **mixed** is at version 1" in at.success[0].value
    assert at.text_input(key="index-folder").value == "data/mixed"  # the form kept what the user chose
    assert at.radio(key="index-weights").value == "none" and at.select_slider(key="index-size").value == 64
    at.text_input(key="index-folder").set_value("data/nothing-here").run()
    next(b for b in at.button if b.label == "Build or update").click().run()
    assert "there is no folder 'data/nothing-here'" in at.error[0].value
    assert not at.success  # the earlier result is not shown under a new attempt's error


def test_browse_pages_through_a_class_and_finds_similar(indexed: Path):
    at = open_app("app_pages/browse.py")
    assert at.get("button_group")[0].proto.options[0].content == "all classes · 18"
    captions = [c.value for c in at.caption if " · " in c.value and "/" in c.value]
    assert len(captions) == 18 and any(c.startswith("squares · squares/") for c in captions)
    at.session_state["browse-class"] = "triangles"
    at.run()
    captions = [c.value for c in at.caption if " · " in c.value and "/" in c.value]
    assert len(captions) == 6 and all(c.startswith("triangles · ") for c in captions)
    at.button(key="browse-triangles/triangles_002.png").click().run()
    assert not at.exception


def test_an_untrained_index_says_so_and_scores_are_put_in_context(indexed: Path):
    at = open_app()
    assert any("model is **untrained**" in w.value for w in at.warning)
    assert any("nearest neighbour scores" in c.value and "random pair" in c.value for c in at.caption)
    assert at.get("camera_input")  # a photo can be the query too


@pytest.mark.slow
def test_the_models_tab_exports_onnx_and_the_bundle(indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copytree(indexed / "indexes", tmp_path / "home")
    monkeypatch.setenv("SIMIMG_HOME", str(tmp_path / "home"))
    at = open_app("app_pages/inspect.py")
    for what in ("ONNX", "safetensors bundle"):
        next(b for b in at.button if b.label == f"Prepare {what}").click().run()
        assert not at.exception and not at.error
    downloads = at.get("download_button")
    assert len(downloads) == 2


# --- the audit and explanations ------------------------------------------------------------------------
@pytest.mark.slow
def test_audit_tab_shows_findings_and_opens_them_in_search(
    indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shutil.copytree(indexed / "indexes", tmp_path / "home")  # the audit keeps its report in the index folder
    monkeypatch.setenv("SIMIMG_HOME", str(tmp_path / "home"))
    data = tmp_path / "roots" / "shapes"  # the index's collection, moved here, plus a cross-class copy it lacks
    shutil.copytree(indexed / "data" / "shapes", data)
    with sqlite3.connect(tmp_path / "home" / "shapes" / "catalog.sqlite") as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'data_root'", (str(data),))
    shutil.copy(data / "circles" / "circles_000.png", data / "squares" / "copy.png")
    monkeypatch.setenv("SIMIMG_DATA_ROOTS", str(tmp_path / "roots"))
    at = open_app("app_pages/inspect.py")
    assert any("No audit of this index yet" in c.value for c in at.caption)
    assert at.text_input(key="audit-folder").value == str(data)  # the index's own collection by default
    next(b for b in at.button if b.label == "Audit this folder").click().run()
    run_until(at, lambda a: any(m.label == "Exact duplicates" for m in a.metric) or bool(a.error))
    assert not at.error, at.error[0].value
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Exact duplicates"] == "1" and int(metrics["Cross-class"]) >= 1
    assert any("**exact** duplicate (same bytes) :red-badge[cross-class]" in m.value for m in at.markdown)
    captions = [c for i in at.image for c in i.captions]
    assert "circles · circles/circles_000.png" in captions and "squares · squares/copy.png" in captions
    at.radio(key="audit-kind").set_value("Label issues").run()
    assert not at.exception
    at.radio(key="audit-kind").set_value("Duplicates").run()
    at.button(key="audit-open-0-squares/copy.png").click().run()
    assert not at.exception, at.exception
    assert at.image[0].captions == ["copy.png"]  # Search, querying with that file: it finds its indexed twin
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert "score 1.000" in cards[0] and "circles" in cards[0]


@pytest.mark.slow
def test_explain_skips_the_query_itself_and_draws_no_flat_map(indexed: Path):
    """Issue 18: the default target was the query itself (cosine 1.000), drawn as a uniform blue overlay."""
    at = open_app()
    upload(at, "query.png", png_bytes(indexed / "data" / "shapes" / "circles" / "circles_000.png"))
    at.toggle(key="explain").set_value(True).run()
    assert not at.exception, at.exception
    chooser = at.selectbox(key="explain-target")  # no classifier: the results but the copy of the query
    assert chooser.value != "circles/circles_000.png" and len(chooser.options) == 11
    assert not any(o.endswith("circles/circles_000.png") for o in chooser.options)
    # 32 px into a densenet leaves a one-cell feature map: nothing to draw, and the page says why
    assert len(at.image) == 13 and any("is flat" in i.value and "**Train** page" in i.value for i in at.info)
    picked = chooser.value
    at.button(key=f"similar-2-{picked}").click().run()  # "Find similar" on the first other result
    assert not at.exception and at.image[0].captions == [Path(picked).name]
    chooser = at.selectbox(key="explain-target")
    assert len(chooser.options) == 11 and not any(o.endswith(picked) for o in chooser.options)


def test_confusion_cell_filters_and_sorts():
    from simimg.app import shared

    items = [
        {"path": "a", "label": "ant", "predicted": "bee", "probability": 0.6},
        {"path": "b", "label": "ant", "predicted": "bee", "probability": 0.9},
        {"path": "c", "label": "bee", "predicted": "ant", "probability": 0.7},
    ]
    assert [it["path"] for it in shared.confusion_cell(items, "ant", "bee")] == ["b", "a"]
    assert shared.confusion_cell(items, "ant", "ant") == []


# --- the Review page -------------------------------------------------------------------------------------
@pytest.fixture
def pooled(workdir: Path, shapes_index: Built, monkeypatch: pytest.MonkeyPatch) -> Built:
    """A copy of 'shapes' with an unlabeled pool of 6 images, indexed."""
    built = copy_built(shapes_index, workdir / "base")
    make_class_images(built.data / "unlabeled", {"circles": 2, "squares": 2, "triangles": 2}, size=48, seed=5)
    simimg.build_index(built.data, built.name, built.home)
    monkeypatch.setenv("SIMIMG_HOME", str(built.home))
    monkeypatch.setenv("SIMIMG_DATA_ROOTS", str(built.base / "data"))
    return built


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def cards(at: AppTest) -> list[str]:
    """The paths of the Review page's cards, in queue order (each card's selection box is labelled with it)."""
    return [c.label for c in at.checkbox if c.key.startswith("review-pick")]


@pytest.mark.slow
def test_review_accepts_the_least_certain_suggestion_refits_and_undoes(pooled: Built):
    at = open_app("app_pages/review.py")
    (advice,) = [i.value for i in at.info if "no audit to review" in i.value]  # the default queue, before any audit
    assert advice.endswith("audit it in the Audit tab of the **Inspect** page first")
    at.segmented_control(key="review-queue").set_value("unlabeled").run()
    assert not at.exception, at.exception
    first = simimg.review_queue(pooled.name, "unlabeled", home=pooled.home)[0]
    assert cards(at)[0] == first.path  # the least certain first
    assert metrics(at)["Labels given"] == "0"
    at.button(key="review-Accept:shapes").click().run()  # nothing selected: the first image
    assert not at.exception and not at.warning, at.exception or at.warning[0].value
    assert metrics(at)["Labels given"] == "1" and metrics(at)["Validation accuracy"].endswith("%")
    said = at.success[0].value
    assert said.startswith("Accepted: 1 image, index version 3. Classifier refit in ") and "validation accuracy" in said
    assert simimg.label_edits(pooled.name, pooled.home)[0]["new_label"] == first.suggested
    assert simimg.label_edits(pooled.name, pooled.home)[0]["source"] == "prediction"
    assert first.path not in cards(at)
    assert simimg.list_models(pooled.name, pooled.home)[0].kind == "head"  # refit and served
    picked = cards(at)[:2]
    for path in picked:
        at.checkbox(key=f"review-pick {path}:shapes").check().run()
    at.selectbox(key="review-to:shapes").set_value("triangles").run()
    at.button(key="review-Relabel:shapes").click().run()
    assert metrics(at)["Labels given"] == "3"
    assert {e["path"]: e["new_label"] for e in simimg.label_edits(pooled.name, pooled.home)}.keys() >= set(picked)
    at.button(key="review-undo:shapes").click().run()
    at.button(key="review-undo:shapes").click().run()
    assert metrics(at)["Labels given"] == "0" and not at.exception
    assert len(cards(at)) == 6


def test_review_keeps_one_of_a_duplicate_group_and_skips(pooled: Built):
    shutil.copy(pooled.data / "circles/circles_000.png", pooled.data / "squares/copy.png")
    simimg.build_index(pooled.data, pooled.name, pooled.home)
    simimg.audit(pooled.data, pooled.name, pooled.home, workers=0)
    at = open_app("app_pages/review.py")
    at.segmented_control(key="review-queue").set_value("duplicates").run()
    paths = cards(at)
    assert {"circles/circles_000.png", "squares/copy.png"} <= set(paths)
    at.button(key="review-keep squares/copy.png:shapes").click().run()
    assert not at.exception, at.exception
    assert metrics(at)["Excluded"] == "1"
    assert "squares/copy.png" not in cards(at)
    edits = simimg.label_edits(pooled.name, pooled.home)
    assert [(e["path"], e["action"]) for e in edits] == [("circles/circles_000.png", "exclude")]
    at.segmented_control(key="review-queue").set_value("class").run()
    at.selectbox(key="review-class").set_value("circles").run()
    shown = cards(at)
    at.button(key="review-Skip:shapes").click().run()
    assert shown[0] not in cards(at) and not at.exception
    at.button(key="review-skipped:shapes").click().run()
    assert cards(at) == shown


# --- who may use the app (issue 22, item 6) ----------------------------------------------------------------------
def address(value: str) -> None:
    """Set Streamlit's server.address, as `--server.address` would (the workdir fixture restores it)."""
    st_config.set_option("server.address", value)


def test_on_another_address_the_app_refuses_without_a_login_unless_allowed_open(indexed, monkeypatch):
    address("0.0.0.0")
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and "listens on **0.0.0.0**" in at.error[0].value
    assert "SIMIMG_ALLOW_OPEN=1" in at.error[0].value and not at.file_uploader  # nothing else is shown
    monkeypatch.setenv("SIMIMG_ALLOW_OPEN", "1")
    at.run()
    assert not at.error and uploader(at) is not None
    monkeypatch.delenv("SIMIMG_ALLOW_OPEN")
    address("")  # no address at all: Streamlit listens on every interface
    assert "listens on every network interface" in AppTest.from_file(APP, default_timeout=120).run().error[0].value
    address("127.0.0.1")
    assert not AppTest.from_file(APP, default_timeout=120).run().error  # loopback: open, as before


def test_with_an_auth_section_only_a_logged_in_user_gets_the_app(indexed):
    address("0.0.0.0")
    at = AppTest.from_file(APP, default_timeout=120)
    at.secrets["auth"] = {"redirect_uri": "http://example.test/oauth2callback", "cookie_secret": "x"}
    at.run()
    assert not at.exception and not at.error
    assert [b.label for b in at.button] == ["Log in"] and not at.file_uploader
