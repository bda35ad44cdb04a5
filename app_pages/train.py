"""Train: a classifier in seconds on the index's stored embeddings, or a full fine-tune with live curves.

Either way the new model is kept as a version of the index and served when the run ends; Search keeps answering
from the current model meanwhile.
"""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import streamlit as st

from simimg import api, ui
from simimg.model import ARCHITECTURES, DEFAULT_ARCH
from simimg.training import TrainReport

JOB_KIND = "train"
QUICK, FULL = "quick", "full"
MODES = {QUICK: "Quick: train the classifier only", FULL: "Full: fine-tune the whole network"}
PHASES = {"loading": "Loading the images", "training": "Training", "validating": "Validating",
          "saving": "Saving the model", "indexing": "Re-indexing the collection with the new model"}


def main() -> None:
    st.title("Train", anchor=False)
    st.caption("Teach the model your classes: pick a folder of class folders (<folder>/<class>/<image>).")
    ui.job_page(JOB_KIND, form_ui, progress_ui, result_ui, live=lambda job: curves_ui(job.events))


def form_ui() -> None:
    mode = st.radio("How", list(MODES), format_func=MODES.get, horizontal=True, key="train-mode",
                    help="Quick fits a classifier on the embeddings the index already holds: seconds, and nothing "
                         "is embedded again. Full fine-tunes the network itself: better features, minutes to hours.")
    if mode == QUICK:
        quick_form_ui()
    else:
        full_form_ui()


def quick_form_ui() -> None:
    name = ui.current_index()
    if name is None:
        st.info("Quick training fits on an index's stored embeddings: build one on the **Build** page first.")
        return
    with st.form("quick-train-form", border=True):
        st.markdown(f"Index **{name}**: its serving model's embeddings become a classifier's input.")
        typed = ui.folder_input("quick")
        if not st.form_submit_button("Train the classifier", type="primary", icon=":material/bolt:"):
            return
    data_dir = ui.resolve_folder(typed)
    start(name, f"Quick training of '{name}'", lambda job: api.train(data_dir, name, ui.home(), head_only=True,
                                                                      hooks=hooks_for(job)))


def full_form_ui() -> None:
    with st.form("train-form", border=True):
        typed = ui.folder_input("train")
        name = st.text_input("Model / index name", value="", placeholder="the folder's name",
                             help="The new model joins this index's kept models and serves it when training ends.")
        left, right = st.columns(2)
        arch = left.selectbox("Backbone", sorted(ARCHITECTURES), index=sorted(ARCHITECTURES).index(DEFAULT_ARCH))
        weights = right.radio("Start from", ["imagenet", "none"], horizontal=True,
                              format_func={"imagenet": "ImageNet weights", "none": "scratch (random)"}.get)
        epochs = left.number_input("Epochs", min_value=1, max_value=500, value=None, placeholder="auto",
                                   help="auto: 15 from ImageNet weights, 80 from scratch, with early stopping.")
        image_size = right.select_slider("Image size", [64, 96, 128, 160, 192, 224], value=224)
        serve = st.checkbox("Serve the new model when training ends (re-indexes the collection)", value=True)
        if not st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:"):
            return
    data_dir = ui.resolve_folder(typed)
    name = name.strip() or data_dir.name
    start(name, f"Training of '{name}'", lambda job: api.train(
        data_dir, name, ui.home(), hooks=hooks_for(job), arch=arch, weights=weights, epochs=epochs,
        image_size=image_size, index=serve))


def start(name: str, label: str, work) -> None:
    ui.start_job(name, JOB_KIND, label, work)
    st.session_state[ui.INDEX_KEY] = name
    st.rerun()


def hooks_for(job: ui.Job) -> api.Hooks:
    """The run reports into the job the page polls; the page's Cancel button sets `job.stop`."""
    return api.Hooks(on_epoch=job.events.append, progress=job.progress, on_phase=job.on_phase,
                     should_stop=job.stop.is_set)


def progress_ui(job: ui.Job) -> None:
    phase = PHASES.get(job.phase, "Starting")
    if job.phase == "training":
        phase = f"Epoch {len(job.events) + 1}: batch {job.done} of {job.total}" if job.total else phase
    elif job.total:
        phase = f"{phase}: {job.done} of {job.total}"
    st.progress(job.fraction(), text=f"{phase}…")
    if job.stop.is_set():
        st.info("Stopping after this batch; the best model so far is kept.")
    elif job.phase in ("training", "validating") and st.button("Cancel training", icon=":material/stop_circle:"):
        job.stop.set()
    st.caption(f"{job.seconds():.0f} s elapsed. Search keeps answering from the current model meanwhile.")


def curves_ui(events: list) -> None:
    """Loss and accuracy per epoch, train against validation."""
    if not events:
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
        kept = (f"The best epoch ({report.best_epoch}) is kept as model `{report.model}`; serve it from the "
                "**Inspect** page's Models tab." if report.model else "No epoch finished, so no model was kept.")
        st.warning(f"Training was cancelled. {kept}", icon=":material/stop_circle:")
    else:
        how = "fitted" if report.kind == "head" else "stopped early" if report.stopped_early else "finished"
        served = (f" **{report.name}** now serves it (version {report.index.version})." if report.index else
                  " It is kept, not served: serve it from the **Inspect** page's Models tab.")
        st.success(f"Training {how} in {report.seconds:.0f} s: validation accuracy {report.val_accuracy:.1%}."
                   + served, icon=":material/check_circle:")
    curves_ui(report.history)
    ui.skipped_table(report.skipped)


main()
