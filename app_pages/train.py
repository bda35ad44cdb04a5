"""Train: fine-tune a backbone on a folder of class folders, with live curves; then index it for search."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import streamlit as st

from simimg import ui
from simimg.indexing import IndexJob, run_index
from simimg.model import ARCHITECTURES, DEFAULT_ARCH
from simimg.train import TrainConfig, TrainReport, run_training

JOB_KEY = "train"


def main() -> None:
    st.title("Train", anchor=False)
    st.caption("Teach a DenseNet your classes: pick a folder of class folders, and watch it learn.")
    ui.job_page(JOB_KEY, form_ui, progress_ui, result_ui, live=lambda job: curves_ui(job.events))


def form_ui() -> None:
    with st.form("train-form", border=True):
        typed = ui.folder_input("train")
        name = st.text_input("Model / index name", value="", placeholder="the folder's name",
                             help="Training replaces this index's model; the folder is then indexed with it.")
        left, right = st.columns(2)
        arch = left.selectbox("Backbone", sorted(ARCHITECTURES), index=sorted(ARCHITECTURES).index(DEFAULT_ARCH))
        weights = right.radio("Start from", ["imagenet", "none"], horizontal=True,
                              format_func={"imagenet": "ImageNet weights", "none": "scratch (random)"}.get)
        epochs = left.number_input("Epochs", min_value=1, max_value=500, value=None, placeholder="auto",
                                   help="auto: 15 from ImageNet weights, 80 from scratch, with early stopping.")
        image_size = right.select_slider("Image size", [64, 96, 128, 160, 192, 224], value=224)
        reindex = st.checkbox("Index the folder with the trained model afterwards", value=True)
        if not st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:"):
            return
    data_dir = ui.resolve_folder(typed)
    config = TrainConfig(data_dir=str(data_dir), name=name.strip() or data_dir.name, home=str(ui.home()),
                         arch=arch, weights=weights, epochs=epochs, image_size=image_size)
    ui.start_job(JOB_KEY, lambda job: train_then_index(job, config, reindex))
    st.session_state[ui.INDEX_KEY] = config.name
    st.rerun()


def train_then_index(job: ui.Job, config: TrainConfig, reindex: bool) -> TrainReport:
    """The background work: train (cancellable between batches), then embed the folder with the new model."""
    job.stage = "training"
    report = run_training(config, on_epoch=job.events.append, progress=job.progress, should_stop=job.stop.is_set)
    if reindex and report.best_epoch and not report.cancelled:
        job.stage, job.done, job.total = "indexing", 0, 0
        run_index(IndexJob(data_dir=config.data_dir, name=config.name, home=config.home), progress=job.progress)
    return report


def progress_ui(job: ui.Job) -> None:
    epoch = len(job.events) + 1
    label = f"Epoch {epoch}: batch {job.done} of {job.total}" if job.stage == "training" else \
        f"Indexing with the trained model: {job.done} of {job.total} images"
    st.progress(job.fraction(), text=label if job.total else "Preparing…")
    if job.stop.is_set():
        st.info("Stopping after this batch; the best model so far is kept.")
    elif st.button("Cancel training", icon=":material/stop_circle:"):
        job.stop.set()
    st.caption(f"{job.seconds():.0f} s elapsed")


def curves_ui(events: list) -> None:
    """Loss and accuracy per epoch, train against validation."""
    if not events:
        st.caption("The curves appear after the first epoch.")
        return
    history = pd.DataFrame([asdict(e) for e in events]).set_index("epoch")
    last = events[-1]
    cols = st.columns(4)
    cols[0].metric("Epoch", last.epoch, last.phase, delta_color="off")
    cols[1].metric("Validation accuracy", f"{last.val_accuracy:.1%}")
    cols[2].metric("Validation loss", f"{last.val_loss:.3f}")
    cols[3].metric("Speed", f"{last.images_per_s:.0f} img/s")
    left, right = st.columns(2)
    left.markdown("**Loss**")
    left.line_chart(history[["train_loss", "val_loss"]], x_label="epoch")
    right.markdown("**Accuracy**")
    right.line_chart(history[["train_accuracy", "val_accuracy"]], x_label="epoch")


def result_ui(job: ui.Job) -> None:
    report: TrainReport = job.result
    if report.cancelled:
        st.warning(f"Training was cancelled. The best model so far (epoch {report.best_epoch}) is saved; "
                   "update the index on the Build page to search with it.", icon=":material/stop_circle:")
    else:
        done = "stopped early" if report.stopped_early else "finished"
        st.success(f"Training {done} in {report.seconds:.0f} s: best validation accuracy "
                   f"{report.val_accuracy:.1%} at epoch {report.best_epoch}. **{report.name}** is ready to search.",
                   icon=":material/check_circle:")
    curves_ui(report.history)
    ui.skipped_table(report.skipped)


main()
