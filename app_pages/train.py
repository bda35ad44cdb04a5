"""Train: a classifier in seconds on the index's stored embeddings, or a full fine-tune with live curves.

Either way the new model is kept as a version of the index and served when the run ends; Search keeps answering
from the current model meanwhile. The run itself happens in a child process (simimg/app/background.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

import simimg
from simimg import ARCHITECTURES, DEFAULT_ARCH, TrainReport
from simimg.app import shared
from simimg.app.background import Task
from simimg.app.forms import checked_folder, class_preview, folder_input, other_folder, weights_input

JOB_KIND = "train"
QUICK, FULL = "quick", "full"
MODES = {QUICK: "Quick: train the classifier only", FULL: "Full: fine-tune the whole network"}


def main() -> None:
    st.title("Train", anchor=False)
    st.caption("Teach the model your classes: pick a folder of class folders (<folder>/<class>/<image>).")
    shared.job_page(JOB_KIND, form_ui, progress_ui, result_ui, live=lambda job: curves_ui(job.events))


def form_ui() -> None:
    mode = st.radio(
        "How",
        list(MODES),
        format_func=MODES.get,
        horizontal=True,
        key="train-mode",
        persist_state="session",
        help="Quick fits a classifier on the embeddings the index already holds: seconds, and nothing "
        "is embedded again. Full fine-tunes the network itself: better features, minutes to hours.",
    )
    with st.container(border=True):
        typed = folder_input("train", shared.current_index())
        data_dir = checked_folder(typed)
        if data_dir is not None:
            class_preview(data_dir)
        if mode == QUICK:
            quick_form_ui(data_dir)
        else:
            full_form_ui(data_dir)


def quick_form_ui(data_dir: Path | None) -> None:
    name = shared.current_index()
    if name is None:
        st.info("Quick training fits on an index's stored embeddings: build one on the **Build** page first.")
        return
    st.markdown(f"The classifier learns from the embeddings of index **{name}**'s serving model.")
    own = other_folder(data_dir, name) if data_dir is not None else None
    if own is not None:
        st.warning(
            f"`{data_dir}` is not the folder index **{name}** was built from (`{own}`). Quick training "
            "fits on the images the index holds, so it stops when the folder's images are not in the index, "
            "unless you let it embed them here (slower; they are not added, and the classifier serves "
            f"**{name}** with this folder's classes). To search another collection, build an index of it on "
            "the **Build** page.",
            icon=":material/warning:",
        )
    embed_missing = st.checkbox(
        "Embed the images the index does not hold",
        value=False,
        key="train-embed-missing",
        help="Off: only images the index holds as they are now are used, and the run stops "
        "if the folder has others. On: those are embedded with the serving model for "
        "this fit (not added to the index).",
    )
    if st.button("Train the classifier", type="primary", icon=":material/bolt:") and data_dir is not None:
        start(
            name,
            f"Quick training of '{name}'",
            Task(
                simimg.train,
                {
                    "data_dir": str(data_dir),
                    "name": name,
                    "home": str(shared.home()),
                    "head_only": True,
                    "embed_missing": embed_missing,
                },
                callbacks="hooks",
            ),
        )


def full_form_ui(data_dir: Path | None) -> None:
    name = st.text_input(
        "Model / index name",
        value="",
        placeholder="the folder's name",
        key="train-name",
        persist_state="session",
        help="The new model joins this index's kept models and serves it when training ends.",
    )
    left, right = st.columns(2)
    arch = left.selectbox(
        "Backbone",
        sorted(ARCHITECTURES),
        index=sorted(ARCHITECTURES).index(DEFAULT_ARCH),
        key="train-arch",
        persist_state="session",
    )
    with right:
        weights = weights_input("train", arch)
    epochs = left.number_input(
        "Epochs",
        min_value=1,
        max_value=500,
        value=None,
        placeholder="auto",
        key="train-epochs",
        persist_state="session",
        help="auto: 15 from ImageNet weights, 80 from scratch, with early stopping.",
    )
    image_size = right.select_slider(
        "Image size", [64, 96, 128, 160, 192, 224], value=224, key="train-size", persist_state="session"
    )
    serve = st.checkbox(
        "Serve the new model when training ends (re-indexes the collection)",
        value=True,
        key="train-serve",
        persist_state="session",
    )
    if st.button("Start training", type="primary", icon=":material/play_arrow:") and data_dir is not None:
        name = name.strip() or data_dir.name
        start(
            name,
            f"Training of '{name}'",
            Task(
                simimg.train,
                {
                    "data_dir": str(data_dir),
                    "name": name,
                    "home": str(shared.home()),
                    "weights": weights,
                    "arch": arch if weights in ("imagenet", "none") else None,
                    "epochs": epochs,
                    "image_size": image_size,
                    "index": serve,
                },
                callbacks="hooks",
            ),
        )


def start(name: str, label: str, task: Task) -> None:
    shared.start_job(name, JOB_KIND, label, task)
    shared.select_index(name, keeping="train-folder")
    st.rerun()


def progress_ui(job: shared.Job) -> None:
    text = None
    if job.phase == "training" and job.total:
        text = f"Epoch {len(job.events) + 1}: batch {job.done} of {job.total}"
    shared.job_progress(job, text)


def curves_ui(events: list) -> None:
    """Loss and accuracy per epoch, train against validation, as points joined by lines on whole epochs."""
    if not events:
        return
    last = events[-1]
    cols = st.columns(4)
    cols[0].metric("Epoch", last.epoch)
    cols[1].metric("Validation accuracy", f"{last.val_accuracy:.1%}")
    cols[2].metric("Validation loss", f"{last.val_loss:.3f}")
    cols[3].metric("Speed", f"{last.images_per_s:.0f} img/s")
    history = pd.DataFrame([asdict(e) for e in events])
    left, right = st.columns(2)
    for column, metric in ((left, "loss"), (right, "accuracy")):
        long = history.melt("epoch", [f"train_{metric}", f"val_{metric}"], var_name="split", value_name=metric)
        long["split"] = long["split"].str.replace(f"_{metric}", "").str.replace("val", "validation")
        chart = (
            alt.Chart(long)
            .mark_line(point=True)
            .encode(
                x=alt.X("epoch:Q", axis=alt.Axis(format="d", tickMinStep=1), scale=alt.Scale(nice=False)),
                y=alt.Y(f"{metric}:Q"),
                color="split:N",
                tooltip=["epoch", "split", alt.Tooltip(metric, format=".3f")],
            )
        )
        column.altair_chart(chart.properties(title=metric.capitalize(), height=260), width="stretch")


def result_ui(job: shared.Job) -> None:
    report: TrainReport = job.result
    if report.cancelled:
        kept = (
            f"The best epoch ({report.best_epoch}) is kept as model `{report.model}`; serve it from the "
            "Models tab of the **Inspect** page."
            if report.model
            else "No epoch finished, so no model was kept."
        )
        st.warning(f"Training was cancelled. {kept}", icon=":material/stop_circle:")
    else:
        how = "fitted" if report.kind == "head" else "stopped early" if report.stopped_early else "finished"
        served = (
            f" **{report.name}** now serves it (version {report.index.version})."
            if report.index
            else " It is kept, not served: serve it from the Models tab of the **Inspect** page."
        )
        st.success(
            f"Training {how} in {report.seconds:.0f} s: validation accuracy {report.val_accuracy:.1%}." + served,
            icon=":material/check_circle:",
        )
        if report.index:
            shared.search_link(report.name)
    curves_ui(report.history)
    shared.skipped_table(report.skipped)


main()
