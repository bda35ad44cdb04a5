"""Shared pieces of the Streamlit pages: warm cached services, the index picker, messages, thumbnails, jobs.

The pages only wire widgets to the package; what two pages need lives here, once (forms: ui_forms.py).
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import streamlit as st
from PIL import ImageOps

from simimg import api
from simimg.catalog import reading
from simimg.demo import DemoJob, build_demo
from simimg.errors import BadImageError, SimimgError
from simimg.explore import score_landmarks
from simimg.images import load_image
from simimg.jobs import WRITERS, Job, JobBoard, Task
from simimg.layout import IndexFolder, list_indexes, resolve_home
from simimg.roots import data_roots
from simimg.search import SearchService

log = logging.getLogger(__name__)

INDEX_KEY = "index_name"
SIMILAR_KEY = "similar_to"  # a gallery path the Search page queries with ("Find similar")
UPLOADER_KEY = "uploader_generation"
SCROLL_KEY = "scroll_to_query"
THUMB_PX = 320


# --- errors ------------------------------------------------------------------------------------------
# The library's messages advise CLI commands; a page names the page or control that does the same instead.
APP_ADVICE = [
    (r"(?:re-)?run `simimg upgrade[^`]*` to convert it", "build it again on the **Build** page, which converts "
                                                         "it first and keeps every vector"),
    (r"(?:re-)?run `simimg index[^`]*`(?: on it| once)?(?: first)?(?: to (?:rebuild|repair) it)?",
     "build it on the **Build** page"),
    (r"build it with `simimg index[^`]*`", "build it on the **Build** page"),
    (r"`simimg train[^`]*`(?: \(add --head-only[^)]*\))?", "the **Train** page"),
    (r"`simimg use[^`]*`", "the Models tab of the **Inspect** page"),
    (r"`simimg models[^`]*` lists the ones it has", "the Models tab of the **Inspect** page lists them"),
    (r"use --weights none to start from random init, or --weights PATH for an earlier simimg model",
     "start from **Scratch (random init)** or from **An earlier simimg model** instead"),
    (r"--weights none", "**Scratch (random init)**"),
    (r",? or pass --model", ""),
    (r"--head-only", "Quick training"),
]


def app_message(text: str) -> str:
    """A library message in the app's words: no command lines, the page or control to use instead."""
    for pattern, replacement in APP_ADVICE:
        text = re.sub(pattern, replacement, text)
    return text


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Show a user's mistake as one st.error line, never a traceback; the page keeps working."""
    try:
        yield
    except SimimgError as err:
        st.error(app_message(str(err)), icon=":material/error:")


# --- the index picker and warm services ----------------------------------------------------------------
def home() -> Path:
    return resolve_home()


def index_names() -> list[str]:
    """Indexes under $SIMIMG_HOME, newest first (the default)."""
    return [p.name for p in list_indexes(home())]


def sidebar() -> None:
    """The index selector every page shares; its choice survives switching pages."""
    names = index_names()
    if not names:
        st.sidebar.caption(f"No index yet under `{home()}`.")
        st.session_state.pop(INDEX_KEY, None)
        return
    current = st.session_state.get(INDEX_KEY)
    st.session_state[INDEX_KEY] = st.sidebar.selectbox(
        "Index", names, index=names.index(current) if current in names else 0,
        help=f"Indexes under {home()}; the most recently built is the default.")


def current_index() -> str | None:
    return st.session_state.get(INDEX_KEY)


def search_service(name: str) -> SearchService:
    """The warm service for an index, shared by every session; it follows new versions and models by itself.

    The catalog's inode is part of the key, so an index deleted and built again under the same name loads anew.
    """
    paths = IndexFolder.of(home(), name)
    with reading(paths.catalog) as catalog:
        if catalog.published() is None:
            raise SimimgError(f"index '{name}' is not finished: its first build stopped before the end. Run it again "
                              "on the **Build** page with the same folder: the work already done is kept.")
    return _service(str(home()), name, paths.catalog.stat().st_ino)


@st.cache_resource(show_spinner="Loading the model and index…", max_entries=8)
def _service(home_dir: str, name: str, catalog_inode: int) -> SearchService:
    log.info("loading index '%s'", name)
    return api.open_index(name, home_dir)


def open_index(title: str) -> SearchService | None:
    """A page's header for the chosen index, or the first-run guide (and None) when there is no index yet."""
    name = current_index()
    if name is None:
        first_run_guide()
        return None
    st.title(title, anchor=False)
    service = search_service(name)
    st.caption(describe_index(service.info()))
    return service


def describe_index(info: dict) -> str:
    """One line a user reads under a page's title: size, model, classifier."""
    kind = f"classifier over {len(info['classes'])} classes" if info["classifier"] else "no classifier yet"
    return (f"**{info['total']:,}** images · `{info['arch']}` {info['kind']} model `{info['model'][:8]}` "
            f"({info['source']}) · {info['image_size']} px · {kind} · version {info['version']}")


def untrained_notice(info: dict) -> None:
    """Say so when the index's model is a random-init backbone: its similarity scores mean little."""
    if info["untrained"]:
        st.warning("This index's model is **untrained** (random weights): nearly every pair of images scores "
                   "0.95 or more, and neighbours are weak. Train a model on the **Train** page (a full run), or "
                   "build the index with ImageNet weights, for meaningful similarity.", icon=":material/science:")


def queue_similar(path: Path) -> None:
    """Make a gallery image the Search page's query (a button callback): the uploader is cleared, so it shows
    no older file, and the page scrolls back up to the new query."""
    st.session_state[SIMILAR_KEY] = str(path)
    st.session_state[UPLOADER_KEY] = st.session_state.get(UPLOADER_KEY, 0) + 1
    st.session_state[SCROLL_KEY] = True


def search_from(path: Path) -> None:
    """From another page: search with a gallery image."""
    queue_similar(path)
    st.switch_page("app_pages/search.py")


def search_link(name: str) -> None:
    """After a job: the way to its index's results."""
    st.session_state[INDEX_KEY] = name
    st.page_link("app_pages/search.py", label=f"Search **{name}**", icon=":material/image_search:")


# --- the published vectors, for maps, duplicates and score landmarks ------------------------------------
@st.cache_data(max_entries=8, show_spinner="Reading the index's vectors…")
def published_vectors(home_dir: str, name: str, version: int) -> tuple[list[str], list[str | None], np.ndarray]:
    """Paths, labels and vectors of the published version, read as one snapshot (`version` keys the cache)."""
    with reading(IndexFolder.of(home_dir, name).catalog) as catalog:
        snapshot, vectors = catalog.snapshot_with_vectors()
    return snapshot.paths, snapshot.labels, vectors


@st.cache_data(max_entries=16, show_spinner=False)
def landmarks(home_dir: str, name: str, version: int) -> dict[str, float]:
    """`explore.score_landmarks` of the published version: what a score means in this index."""
    return score_landmarks(published_vectors(home_dir, name, version)[2])


def landmarks_caption(home_dir: str, name: str, version: int) -> str:
    marks = landmarks(home_dir, name, version)
    if not marks:
        return ""
    kth = next(key for key in marks if key.startswith("neighbour_"))
    return (f"In this index an image's nearest neighbour scores {marks['nearest']:.3f} (median), its "
            f"{kth.split('_')[1]}th {marks[kth]:.3f}, and a random pair {marks['random_pair']:.3f}.")


# --- images --------------------------------------------------------------------------------------------
def thumbnail(path: Path) -> bytes | None:
    """A square JPEG preview of a gallery file, cached until the file changes; None if it cannot be read."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    return _thumbnail(str(path), mtime)


@st.cache_data(max_entries=4000, show_spinner=False)
def _thumbnail(path: str, mtime_ns: int) -> bytes | None:
    try:
        image = load_image(path, draft_size=THUMB_PX)
    except BadImageError:
        return None
    buffer = io.BytesIO()
    ImageOps.fit(image, (THUMB_PX, THUMB_PX)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def card_image(path: Path) -> None:
    """A result or gallery card's picture, or a line saying it cannot be read."""
    thumb = thumbnail(path)
    if thumb is None:
        st.warning("image missing or unreadable")
    else:
        st.image(thumb, width="stretch")


def image_strip(items: list[tuple[Path, str]], columns: int = 6, header: str | None = None) -> None:
    """Thumbnails side by side with captions, wrapping every `columns`; unreadable files say so."""
    if header:
        st.markdown(header)
    for start in range(0, len(items), columns):
        for column, (path, caption) in zip(st.columns(columns), items[start:start + columns]):
            thumb = thumbnail(path)
            if thumb is None:
                column.warning(f"cannot read {caption}")
            else:
                column.image(thumb, caption=caption, width="stretch")


def skipped_table(rows: list[dict]) -> None:
    """Files a job passed over, with the reason; or a line saying there were none."""
    st.subheader("Skipped files", anchor=False)
    if not rows:
        st.caption("None: every image file was read.")
        return
    st.dataframe(pd.DataFrame(rows, columns=["path", "reason"]), hide_index=True, width="stretch",
                 column_config={"path": "file"})


def gallery_path(data_root: Path, path: str) -> Path:
    """Catalog paths are relative to the indexed folder; evaluation may give absolute ones."""
    p = Path(path)
    return p if p.is_absolute() else data_root / p


# --- first run -----------------------------------------------------------------------------------------
def first_run_guide() -> None:
    """No index yet: say how to get one, and offer a demo that needs no data and no network."""
    st.header("Welcome to simimg")
    st.markdown(
        "simimg learns your own image folders and finds similar pictures.\n\n"
        "1. **Put class folders under `data/`**: `data/<collection>/<class>/<image>.jpg`.\n"
        "2. **Train** a classifier on them (Train page), or just **index** them for similarity search (Build page).\n"
        "3. **Search** by dropping an image here.")
    st.info("No data at hand? Build a small demo collection: 36 generated images in 3 classes, indexed in a few "
            "seconds, with no download.", icon=":material/auto_awesome:")
    if st.button("Build the demo collection", type="primary", icon=":material/rocket_launch:"):
        with friendly_errors():
            with st.status("Drawing and indexing the demo images…", expanded=True) as status:
                bar = st.progress(0.0)
                job = DemoJob(data_dir=str(data_roots()[0] / "demo"), home=str(home()))
                report = build_demo(job, progress=lambda done, total: bar.progress(done / max(total, 1)))
                status.update(label=f"Demo ready: {report.total} images indexed", state="complete")
            st.session_state[INDEX_KEY] = report.name
            st.rerun()


# --- background jobs -----------------------------------------------------------------------------------
@st.cache_resource
def board() -> JobBoard:
    """The process's jobs: they outlive a page reload, so a returning user sees the training still running."""
    return JobBoard()


def session_id() -> str:
    """Who started a job: its result is shown to that browser session only."""
    return st.session_state.setdefault("session_id", uuid.uuid4().hex)


def own_job(kind: str) -> Job | None:
    """The last job of this kind this session started, while it is the board's current one."""
    key = st.session_state.get(f"job:{kind}")
    job = board().get(*key) if key else None
    return job if job is not None and job.owner == session_id() else None


def start_job(index: str, kind: str, label: str, task: Task) -> Job:
    """Start `task` for this session; a conflicting job on the same index (any tab's) is refused by name."""
    job = board().start(index, kind, label, task, owner=session_id())
    st.session_state[f"job:{kind}"] = (index, kind)
    return job


def job_page(kind: str, form: Callable[[], None], progress: Callable[[Job], None],
             result: Callable[[Job], None], every: float = 0.5, live: Callable[[Job], None] | None = None) -> None:
    """A page around one kind of background job: this session's running job, else the form and its last result.

    `progress` is redrawn every `every` seconds, so it must stay light; `live` (curves, tables) is drawn once per
    full run, which `watch` triggers whenever the job reports a new event.
    """
    job = own_job(kind)
    if job is not None and job.running:
        watch(job, progress, every)
        if live is not None:
            live(job)
        return
    others = [j for j in board().running(current_index() or "") if j.kind in WRITERS and j.owner != session_id()]
    if others:
        st.info(f"**{others[0].label}** is running on this index (started {others[0].seconds():.0f} s ago, in "
                "another tab or session). Searches keep working meanwhile; a new job on this index waits for it.",
                icon=":material/hourglass_top:")
    try:
        form()
    except SimimgError as err:  # a new attempt's error stands alone: no older result under it
        st.error(app_message(str(err)), icon=":material/error:")
        return
    if job is not None and not job_failed(job):
        result(job)


def job_failed(job: Job) -> bool:
    """Show a finished job's error, if it had one."""
    if job.error:
        st.error(app_message(job.error), icon=":material/error:")
    return job.error is not None


def watch(job: Job, render: Callable[[Job], None], every: float = 0.5) -> None:
    """Redraw `render(job)` every `every` seconds; rerun the whole page on a new event and when the job ends."""
    seen = len(job.events)

    @st.fragment(run_every=every)
    def panel() -> None:
        render(job)
        if not job.running or len(job.events) != seen:
            st.rerun()

    panel()
