"""Shared pieces of the Streamlit pages: warm cached services, the index picker, thumbnails, background jobs.

The pages only wire widgets to the package; what two pages need lives here, once.
"""

from __future__ import annotations

import io
import logging
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import streamlit as st
from PIL import ImageOps

from simimg import api
from simimg.demo import DemoJob, build_demo
from simimg.errors import BadImageError, SimimgError
from simimg.images import load_image
from simimg.jobs import WRITERS, Job, JobBoard
from simimg.layout import IndexFolder, list_indexes, resolve_home
from simimg.roots import data_roots, list_collections, resolve_data_dir
from simimg.search import SearchService

log = logging.getLogger(__name__)

INDEX_KEY = "index_name"
THUMB_PX = 320


# --- errors ------------------------------------------------------------------------------------------
@contextmanager
def friendly_errors() -> Iterator[None]:
    """Show a user's mistake as one st.error line, never a traceback; the page keeps working."""
    try:
        yield
    except SimimgError as err:
        st.error(str(err), icon=":material/error:")


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
    if not paths.catalog.exists():
        raise SimimgError(f"index '{name}' has no catalog yet: build it on the Build page")
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
    """One line a user reads in the sidebar: size, backbone, classifier."""
    kind = f"classifier over {len(info['classes'])} classes" if info["classifier"] else "no classifier yet"
    return (f"**{info['total']:,}** images · `{info['arch']}` ({info['source']}) · {info['image_size']} px · "
            f"{kind} · version {info['version']}")


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


# --- folders -------------------------------------------------------------------------------------------
def folder_input(key: str) -> str:
    """A folder box prefilled with the first collection under the data roots; checked later by `resolve_folder`."""
    roots = data_roots()
    choices = [str(p) for p in list_collections(roots)]
    typed = st.text_input("Image folder", value=choices[0] if choices else "", key=f"{key}-folder",
                          placeholder="data/my-photos",
                          help="A folder of class folders (<folder>/<class>/<image>) under "
                               + ", ".join(f"`{r}`" for r in roots) + ". Add more roots with $SIMIMG_DATA_ROOTS.")
    if choices:
        st.caption("Collections found: " + " · ".join(f"`{Path(c).name}`" for c in choices))
    return typed


def resolve_folder(typed: str) -> Path:
    """The real folder, only if it lies under an allowed data root (SimimgError otherwise)."""
    return resolve_data_dir(typed, data_roots())


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


def start_job(index: str, kind: str, label: str, work: Callable[[Job], object]) -> Job:
    """Start `work` for this session; a conflicting job on the same index (any tab's) is refused by name."""
    job = board().start(index, kind, label, work, owner=session_id())
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
    with friendly_errors():
        form()
    if job is not None and not job_failed(job):
        result(job)


def job_failed(job: Job) -> bool:
    """Show a finished job's error, if it had one."""
    if job.error:
        st.error(job.error, icon=":material/error:")
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
