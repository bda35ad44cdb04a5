"""Build: index a folder (or bring an index up to date), then see what went in and what was skipped."""

from __future__ import annotations

from dataclasses import asdict

import streamlit as st

from simimg import ui
from simimg.indexing import IndexReport
from simimg.jobs import Task
from simimg.model import ARCHITECTURES, DEFAULT_ARCH
from simimg.ui_forms import folder_input, resolve_folder, weights_input

JOB_KIND = "build"


def main() -> None:
    st.title("Build an index", anchor=False)
    st.caption("Embed every image of a folder so it can be searched. Running it again embeds only new or changed "
               "files.")
    ui.job_page(JOB_KIND, form_ui, progress_ui, result_ui)


def form_ui() -> None:
    with st.container(border=True):
        typed = folder_input("index")
        name = st.text_input("Index name", value="", placeholder="the folder's name", key="index-name",
                             persist_state="session",
                             help="A new name builds a new index; an existing one is updated with its own model.")
        with st.expander("Model for a new index"):
            arch = st.selectbox("Backbone", sorted(ARCHITECTURES), index=sorted(ARCHITECTURES).index(DEFAULT_ARCH),
                                key="index-arch", persist_state="session")
            weights = weights_input("index", arch)
            image_size = st.select_slider("Image size", [64, 96, 128, 160, 192, 224], value=224, key="index-size",
                                          persist_state="session")
        if not st.button("Build or update", type="primary", icon=":material/play_arrow:"):
            return
    folder = resolve_folder(typed)
    name = name.strip() or folder.name
    fresh = name not in ui.index_names()
    options = {"arch": arch if weights in ("imagenet", "none") else None, "weights": weights,
               "image_size": image_size} if fresh else {}
    ui.start_job(name, JOB_KIND, f"Indexing {folder.name} into '{name}'", Task(
        "simimg.api:build_index", {"data_dir": str(folder), "name": name, "home": str(ui.home()), **options}))
    st.session_state[ui.INDEX_KEY] = name
    st.rerun()


def progress_ui(job: ui.Job) -> None:
    text = f"Embedded {job.done:,} of {job.total:,} images" if job.total else "Starting: scanning the folder…"
    st.progress(job.fraction(), text=text)
    st.caption(f"{job.seconds():.0f} s so far; the app stays usable meanwhile.")


def result_ui(job: ui.Job) -> None:
    report: IndexReport = job.result
    st.success(f"Index **{report.name}** is at version {report.version}: {report.total:,} images.",
               icon=":material/check_circle:")
    ui.search_link(report.name)
    cols = st.columns(5)
    for col, (label, value) in zip(cols, [("Embedded", report.indexed), ("Removed", report.removed),
                                          ("In the index", report.total), ("Skipped", len(report.skipped)),
                                          ("Seconds", f"{report.seconds:.1f}")]):
        col.metric(label, value)
    if report.rebuilt:
        st.info("The model's embedding changed since the last version, so the search index was rebuilt with it.")
    ui.skipped_table([asdict(s) for s in report.skipped])


main()
