"""Shared pieces of the Streamlit pages: warm cached services, the index picker, messages, thumbnails, jobs.

The pages only wire widgets to the package; what two pages need lives here, once (forms: ui_forms.py).
"""

from __future__ import annotations

import io
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import streamlit as st
from PIL import ImageOps

import simimg
from simimg import IndexFolder, SearchService
from simimg.app.background import WRITERS, Job, JobBoard, Task
from simimg.errors import BadImageError, SimimgError

log = logging.getLogger(__name__)

INDEX_KEY = "index_name"
INDEX_PARAM = "index"  # the URL's query parameter naming the chosen index
SIMILAR_KEY = "similar_to"  # a gallery path the Search page queries with ("Find similar")
UPLOADER_KEY = "uploader_generation"
SCROLL_KEY = "scroll_to_query"
THUMB_PX = 320


# --- errors ------------------------------------------------------------------------------------------
# The library's messages advise CLI commands; a page names the page or control that does the same instead.
APP_ADVICE = [
    (
        r"(?:re-)?run `simimg upgrade[^`]*` to convert it",
        "build it again on the **Build** page, which converts it first and keeps every vector",
    ),
    (
        r"(?:re-)?run `simimg index[^`]*`(?: on it| once)?(?: first)?(?: to (?:rebuild|repair) it)?",
        "build it on the **Build** page",
    ),
    (r"build it with `simimg index[^`]*`", "build it on the **Build** page"),
    (r" \(`simimg index [^`]*`(?:, then train with --name \S+)?\)", " on the **Build** page"),
    (r"pass --embed-missing", "tick **Embed the images the index does not hold**"),
    (r" \(without --head-only\)", " (**Full** training)"),
    (r"`simimg train[^`]*`(?: \(add --head-only[^)]*\))?", "the **Train** page"),
    (r"`simimg use[^`]*`", "the Models tab of the **Inspect** page"),
    (r"`simimg models[^`]*` lists the ones it has", "the Models tab of the **Inspect** page lists them"),
    (
        r"use --weights none to start from random init, or --weights PATH for an earlier simimg model",
        "start from **Scratch (random init)** or from **An earlier simimg model** instead",
    ),
    (r"--weights none", "**Scratch (random init)**"),
    (r",? or pass --model", ""),
    (r"--head-only", "Quick training"),
    (r"run `simimg audit[^`]*`", "audit it in the Audit tab of the **Inspect** page"),
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


# --- the page's look ----------------------------------------------------------------------------------
STYLE = """<style>
/* A narrow window keeps room for the page: the sidebar shrinks from 300 px. */
@media (max-width: 1000px) {
  section[data-testid="stSidebar"] { width: 220px !important; min-width: 220px !important; }
}
</style>"""


def style() -> None:
    """The app's few style rules (an entry point's choice: `app.py` calls it once per run)."""
    st.html(STYLE)


# --- who may use the app ---------------------------------------------------------------------------------
ALLOW_OPEN_ENV = "SIMIMG_ALLOW_OPEN"


def access_gate() -> bool:
    """Whether this run may show the app (an entry point's choice: `app.py` calls it first).

    With an `[auth]` section in .streamlit/secrets.toml, only a logged-in user may (Streamlit's `st.login`, any
    OIDC provider). Without one, the app answers anyone who can reach it, which is right on localhost only: on
    another address it refuses, saying what to do, unless $SIMIMG_ALLOW_OPEN=1 (a proxy in front does the login).
    """
    if _login_configured():
        if st.user.get("is_logged_in"):  # a Mapping: AppTest runs have no user at all
            return True
        st.title("simimg", anchor=False)
        st.button("Log in", type="primary", icon=":material/login:", on_click=st.login)
        return False
    address = st.get_option("server.address")  # unset: Streamlit listens on every interface
    if (address and simimg.is_loopback(address)) or os.environ.get(ALLOW_OPEN_ENV) == "1":
        return True
    where = f"on **{address}**" if address else "on every network interface"
    st.error(
        f"This app listens {where}, where other machines can reach it, and nothing asks who they are. "
        'Configure a login (an `[auth]` section in `.streamlit/secrets.toml`: see README, "The app for a '
        f'team"), or put a proxy that logs people in in front and set `{ALLOW_OPEN_ENV}=1`, or listen on '
        "localhost (`--server.address localhost`).",
        icon=":material/lock:",
    )
    return False


def _login_configured() -> bool:
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, st.errors.StreamlitSecretNotFoundError):
        return False


# --- the index picker and warm services ----------------------------------------------------------------
def home() -> Path:
    return simimg.resolve_home()


def index_names() -> list[str]:
    """Indexes under $SIMIMG_HOME, newest first."""
    return simimg.list_indexes(home())


def sidebar() -> None:
    """The index selector every page shares. The choice survives switching pages, and the URL keeps it
    (`?index=NAME`), so a reload or a shared link opens the same index."""
    names = index_names()
    if not names:
        st.sidebar.caption(f"No index yet under `{home()}`.")
        st.session_state.pop(INDEX_KEY, None)
        return
    chosen = st.sidebar.selectbox(
        "Index",
        names,
        index=names.index(default_index(names)),
        help=f"Indexes under {home()}. A new tab opens the one in its URL, else the most "
        "recently built that can be searched.",
    )
    st.session_state[INDEX_KEY] = chosen
    st.query_params[INDEX_PARAM] = chosen


def default_index(names: list[str]) -> str:
    """This session's choice, else the URL's, else the newest index with a published version: an index whose
    first build is still running cannot answer yet, so a new tab opens one that can."""
    for wanted in (st.session_state.get(INDEX_KEY), st.query_params.get(INDEX_PARAM)):
        if wanted in names:
            return wanted
    return next((n for n in names if published(n)), names[0])


def published(name: str) -> bool:
    """Whether the index has a version readers can load (its first build finished)."""
    try:
        return simimg.serving_model(name, home()) is not None
    except SimimgError:
        return False


def current_index() -> str | None:
    return st.session_state.get(INDEX_KEY)


def select_index(name: str, keeping: str | None = None) -> None:
    """Make `name` the selected index (a job started on it); the widget `keeping` keeps its value (the folder the
    job was started with) instead of following the switch."""
    st.session_state[INDEX_KEY] = name
    if keeping is not None:
        st.session_state[f"{keeping}:for"] = name


def follow(key: str, default: object, source: object) -> None:
    """Reset the widget `key` to `default` whenever `source` changes (the selected index, its serving model):
    a form never keeps a value that belonged to another index. Call it before drawing the widget (no `value=`)."""
    if key not in st.session_state or st.session_state.get(f"{key}:for") != source:
        st.session_state[key] = default
        st.session_state[f"{key}:for"] = source


def search_service(name: str) -> SearchService:
    """The warm service for an index, shared by every session; it follows new versions and models by itself.

    The catalog's inode is part of the key, so an index deleted and built again under the same name loads anew.
    """
    paths = IndexFolder.of(home(), name)
    if not published(name):
        raise SimimgError(
            f"index '{name}' is not finished: its first build stopped before the end. Run it again "
            "on the **Build** page with the same folder: the work already done is kept."
        )
    return _service(str(home()), name, paths.catalog.stat().st_ino)


@st.cache_resource(show_spinner="Loading the model and index…", max_entries=8)
def _service(home_dir: str, name: str, catalog_inode: int) -> SearchService:
    log.info("loading index '%s'", name)
    return simimg.open_index(name, home_dir)


def index_header(title: str) -> SearchService | None:
    """A page's header for the chosen index, or the first-run guide (and None) when there is no index yet, or
    the progress of its first build (and None) while that runs."""
    name = current_index()
    if name is None:
        first_run_guide()
        return None
    st.title(title, anchor=False)
    building = [j for j in board().running(name) if j.kind == "build"]
    if building and not published(name):
        st.info(
            f"**{name}** is being built: it can be searched once its first version is published. Meanwhile "
            "choose another index in the sidebar.",
            icon=":material/hourglass_top:",
        )
        watch(building[0], job_progress)
        return None
    service = search_service(name)
    service.refresh(wait=False)  # the header and the page's answers then come from the same version
    st.caption(describe_index(service.info()))
    return service


def describe_index(info: dict) -> str:
    """One line a user reads under a page's title: size, model, classifier."""
    kind = f"classifier over {len(info['classes'])} classes" if info["classifier"] else "no classifier yet"
    if info["untrained"]:  # random weights are no "pretrained" model, whatever the bundle's kind says
        model = f"`{info['arch']}` {'head on a ' if info['kind'] == 'head' else ''}random-init (untrained) model"
    else:
        model = f"`{info['arch']}` {info['kind']} model"
    source = "" if info["untrained"] else f" ({info['source']})"
    return (
        f"**{info['total']:,}** images · {model} `{info['model'][:8]}`{source} · {info['image_size']} px · "
        f"{kind} · version {info['version']}"
    )


def untrained_notice(info: dict) -> None:
    """Say so when the index's model is a random-init backbone: its similarity scores mean little."""
    if info["untrained"]:
        st.warning(
            "This index's model is **untrained** (random weights): nearly every pair of images scores "
            "0.95 or more, and neighbours are weak. Train a model on the **Train** page (a full run), or "
            "build the index with ImageNet weights, for meaningful similarity.",
            icon=":material/science:",
        )


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


# --- evaluation results ------------------------------------------------------------------------------
def confusion_cell(items: list[dict], true_label: str, predicted: str) -> list[dict]:
    """The evaluated images whose label is `true_label` and whose prediction is `predicted`, surest first."""
    chosen = [it for it in items if it.get("label") == true_label and it.get("predicted") == predicted]
    return sorted(chosen, key=lambda it: -float(it.get("probability", 0.0)))


# --- what a score means in this index ---------------------------------------------------------------------
@st.cache_data(max_entries=16, show_spinner=False)
def landmarks(home_dir: str, name: str, version: int) -> dict[str, float]:
    """`SearchService.score_landmarks` of the published version (`version` keys the cache)."""
    return search_service(name).score_landmarks()


def landmarks_caption(home_dir: str, name: str, version: int) -> str:
    marks = landmarks(home_dir, name, version)
    if not marks:
        return ""
    kth = next(key for key in marks if key.startswith("neighbour_"))
    return (
        f"In this index an image's nearest neighbour scores {marks['nearest']:.3f} (median), its "
        f"{kth.split('_')[1]}th {marks[kth]:.3f}, and a random pair {marks['random_pair']:.3f}."
    )


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
        image = simimg.load_image(path, draft_size=THUMB_PX)
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
        for column, (path, caption) in zip(st.columns(columns), items[start : start + columns]):
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
    st.dataframe(
        pd.DataFrame(rows, columns=["path", "reason"]), hide_index=True, width="stretch", column_config={"path": "file"}
    )


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
        "3. **Search** by dropping an image here."
    )
    st.info(
        "No data at hand? Build a small demo collection: 36 generated images in 3 classes, indexed in a few "
        "seconds, with no download.",
        icon=":material/auto_awesome:",
    )
    if st.button("Build the demo collection", type="primary", icon=":material/rocket_launch:"):
        with friendly_errors():
            with st.status("Drawing and indexing the demo images…", expanded=True) as status:
                bar = st.progress(0.0)
                report = simimg.make_demo(home(), progress=lambda done, total: bar.progress(done / max(total, 1)))
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


def job_page(
    kind: str,
    form: Callable[[], bool | None],
    progress: Callable[[Job], None],
    result: Callable[[Job], None],
    every: float = 0.5,
    live: Callable[[Job], None] | None = None,
) -> None:
    """A page around one kind of background job: this session's running job, else the form and its last result.

    `progress` is redrawn every `every` seconds, so it must stay light; `live` (curves, tables) is drawn once per
    full run, which `watch` triggers whenever the job reports a new event. A writer another tab started on this
    index is shown with its progress and a Cancel of its own.
    """
    job = own_job(kind)
    if job is not None and job.running:
        watch(job, progress, every)
        if live is not None:
            live(job)
        return
    others = [j for j in board().running(current_index() or "") if j.kind in WRITERS and j.owner != session_id()]
    if others:
        st.info(
            f"**{others[0].label}** is running on this index (started {others[0].seconds():.0f} s ago, in "
            "another tab or session). Searches keep working meanwhile; a new job on this index waits for it.",
            icon=":material/hourglass_top:",
        )
        watch(others[0], job_progress, every)
    try:
        refused = form() is False  # a form returns False when it refused a new attempt (and said why)
    except SimimgError as err:
        st.error(app_message(str(err)), icon=":material/error:")
        refused = True
    if refused:  # a new attempt's error stands alone: no older result under it
        return
    if job is not None and not job_failed(job):
        result(job)


def job_failed(job: Job) -> bool:
    """Show a finished job's error or cancellation; True when it has no result to show."""
    if job.cancelled:
        st.warning(
            f"**{job.label}** was cancelled after {duration(job.seconds())}. {CANCELLED[job.kind]}",
            icon=":material/stop_circle:",
        )
    elif job.error:
        st.error(app_message(job.error), icon=":material/error:")
    return job.error is not None or job.cancelled


def watch(job: Job, render: Callable[[Job], None], every: float = 0.5) -> None:
    """Redraw `render(job)` every `every` seconds; rerun the whole page on a new event and when the job ends."""
    seen = len(job.events)

    @st.fragment(run_every=every)
    def panel() -> None:
        render(job)
        if not job.running or len(job.events) != seen:
            st.rerun()

    panel()


# What each step of a job is called on screen (jobs report them as `on_phase` / `Hooks.on_phase` names).
PHASES = {
    "": "Starting",
    "starting": "Starting (loading the libraries)",
    "scanning": "Scanning the folder",
    "loading the model": "Loading the model",
    "embedding": "Embedding",
    "publishing": "Publishing the new version",
    "loading": "Loading the images",
    "training": "Training",
    "validating": "Validating",
    "saving": "Saving the model",
    "indexing": "Re-indexing the collection with the new model",
}
# What a cancel keeps, by job kind: said before (to confirm) and after.
CANCELLED = {
    "build": "The images embedded so far are kept, up to the last 512 committed: building again continues from there.",
    "train": "A full training keeps its best epoch so far as a model, if one finished (the Models tab of "
    "**Inspect** lists it); quick training keeps nothing.",
    "use": "The index keeps serving its current model; the images embedded so far are kept.",
    "audit": "The previous audit, if any, is kept.",
    "evaluate": "Nothing was changed.",
}


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min': as precise as a person reads it."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def job_progress(job: Job, text: str | None = None, unit: str = "images") -> None:
    """A running job's step, a bar, the time elapsed and left, and a Cancel (any tab may stop it)."""
    step = PHASES.get(job.phase, job.phase.capitalize())
    counted = f"{step}: {job.done:,} of {job.total:,} {unit}" if job.total else f"{step}…"
    st.progress(job.fraction(), text=text or counted)
    left = job.seconds_left()
    st.caption(
        f"{duration(job.seconds())} elapsed"
        + (f" · about {duration(left)} left in this step" if left is not None else "")
        + ". Search keeps answering meanwhile."
    )
    cancel_ui(job)


def cancel_ui(job: Job) -> None:
    """Cancel, then a confirmation that says what is kept; from the tab that started the job or any other."""
    if job.stop.is_set():
        st.info("Stopping…", icon=":material/hourglass_top:")
        return
    asking = f"cancel-{job.kind}-{job.index}-{job.started}"
    if not st.session_state.get(asking):
        st.button("Cancel", icon=":material/stop_circle:", key=f"{asking}-ask", on_click=_set, args=(asking, True))
        return
    st.warning(f"Stop **{job.label}**? {CANCELLED.get(job.kind, '')}", icon=":material/help:")
    yes, no = st.columns(2)
    yes.button("Yes, stop it", type="primary", key=f"{asking}-yes", width="stretch", on_click=_stop, args=(job, asking))
    no.button("Keep it running", key=f"{asking}-no", width="stretch", on_click=_set, args=(asking, False))


def _set(key: str, value: object) -> None:
    st.session_state[key] = value


def _stop(job: Job, asking: str) -> None:
    job.stop.set()
    st.session_state[asking] = False
