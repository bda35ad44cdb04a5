"""Build: index a folder (or bring an index up to date), then see what went in and what was skipped."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import streamlit as st

import simimg
from simimg import ARCHITECTURES, DEFAULT_ARCH, IndexReport
from simimg.app import shared
from simimg.app.background import Task
from simimg.app.forms import checked_folder, folder_input, other_folder, weights_input
from simimg.errors import SimimgError

JOB_KIND = "build"


def main() -> None:
    st.title("Build an index", anchor=False)
    st.caption(
        "Embed every image of a folder so it can be searched. Running it again embeds only new or changed files."
    )
    shared.job_page(JOB_KIND, form_ui, progress_ui, result_ui)


def form_ui() -> bool | None:
    with st.container(border=True):
        typed = folder_input("index", shared.current_index())
        name = st.text_input(
            "Index name",
            value="",
            placeholder="the folder's name",
            key="index-name",
            persist_state="session",
            help="A new name builds a new index; an existing one is updated with its own model.",
        )
        with st.expander("Model for a new index"):
            arch = st.selectbox(
                "Backbone",
                sorted(ARCHITECTURES),
                index=sorted(ARCHITECTURES).index(DEFAULT_ARCH),
                key="index-arch",
                persist_state="session",
            )
            weights = weights_input("index", arch)
            image_size = st.select_slider(
                "Image size", [64, 96, 128, 160, 192, 224], value=224, key="index-size", persist_state="session"
            )
        folder = checked_folder(typed)
        name = name.strip() or (folder.name if folder else "")
        if folder is not None:
            replaced_ui(folder, name)
        if not st.button("Build or update", type="primary", icon=":material/play_arrow:"):
            return
    if folder is None:  # a wrong box already says why under it; an empty one is told what to choose
        if not typed.strip():
            raise SimimgError("choose a folder of images (root/<class>/<image>)")
        return False
    fresh = name not in shared.index_names()
    options = (
        {"arch": arch if weights in ("imagenet", "none") else None, "weights": weights, "image_size": image_size}
        if fresh
        else {}
    )
    shared.start_job(
        name,
        JOB_KIND,
        f"Indexing {folder.name} into '{name}'",
        Task(
            simimg.build_index,
            {"data_dir": str(folder), "name": name, "home": str(shared.home()), **options},
            callbacks="phases",
        ),
    )
    shared.select_index(name, keeping="index-folder")
    st.rerun()


def replaced_ui(folder: Path, name: str) -> None:
    """Say so before an update replaces an index's images with another folder's."""
    own = other_folder(folder, name)
    if own is not None:
        st.warning(
            f"Index **{name}** was built from `{own}`. Updating it from `{folder}` replaces its images with "
            "this folder's: the files of its own folder leave it. Give a new index name to keep both.",
            icon=":material/warning:",
        )


def progress_ui(job: shared.Job) -> None:
    shared.job_progress(job)


def result_ui(job: shared.Job) -> None:
    report: IndexReport = job.result
    st.success(
        f"Index **{report.name}** is at version {report.version}: {report.total:,} images.",
        icon=":material/check_circle:",
    )
    shared.search_link(report.name)
    cols = st.columns(5)
    for col, (label, value) in zip(
        cols,
        [
            ("Embedded", report.indexed),
            ("Removed", report.removed),
            ("In the index", report.total),
            ("Skipped", len(report.skipped)),
            ("Time", shared.duration(job.seconds())),
        ],
    ):
        col.metric(label, value)
    st.caption(
        f"{shared.duration(job.seconds())} in all: {report.seconds:.1f} s scanning, loading the model, embedding "
        "and publishing; the rest starting the job's process and loading its libraries."
    )
    if report.rebuilt:
        st.info("The model's embedding changed since the last version, so the search index was rebuilt with it.")
    shared.skipped_table([asdict(s) for s in report.skipped])


main()
