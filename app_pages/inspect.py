"""Inspect: how good the model is, what the collection looks like as a map, and which images are near-duplicates."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

import simimg
from simimg.app import audit_view, shared
from simimg.app.background import Task

MAP_LIMIT = 3000
DUPLICATE_LIMIT = 20000
PAIRS_SHOWN = 12


def main() -> None:
    with shared.friendly_errors():
        service = shared.index_header("Inspect")
        if service is None:
            return
        name = service.folder.name
        evaluation, models, embedding_map, duplicates, audit = st.tabs(
            ["Evaluation", "Models", "Embedding map", "Near-duplicates", "Audit"]
        )
        with evaluation:
            evaluation_ui(name, service.info()["classifier"])
        with models:
            models_ui(name)
        with embedding_map:
            map_ui(name, service.snapshot.version, service.data_root)
        with duplicates:
            duplicates_ui(name, service.snapshot.version, service.data_root)
        with audit:
            audit_view.audit_tab(name, service.data_root)


# --- evaluation ----------------------------------------------------------------------------------------
def evaluation_ui(name: str, has_classifier: bool) -> None:
    if not has_classifier:
        st.info(
            "This index has no classifier: train one on the **Train** page, then evaluate it here.",
            icon=":material/school:",
        )
        return
    job = shared.own_job("evaluate")
    job = job if job is not None and job.index == name else None
    if job is not None and job.running:
        shared.watch(
            job, lambda j: shared.job_progress(j, f"Evaluating: {j.done:,} of {j.total:,} images" if j.total else None)
        )
        return
    if st.button("Evaluate on the validation images", type="primary", icon=":material/fact_check:"):
        shared.start_job(
            name,
            "evaluate",
            f"Evaluation of '{name}'",
            Task(simimg.evaluate, {"data_dir": None, "name": name, "home": str(shared.home())}),
        )
        st.rerun()
    if job is None or shared.job_failed(job):
        return
    metrics_ui(job.result)
    confusion_ui(job.result)


def metrics_ui(result: dict) -> None:
    retrieval = result.get("retrieval") or {}
    values = [
        ("Accuracy", result["accuracy"]),
        ("Macro F1", result["macro_f1"]),
        ("Precision@1", retrieval.get("p_at_1")),
        ("Precision@10", retrieval.get("p_at_10")),
        ("mAP", retrieval.get("map")),
    ]
    for col, (label, value) in zip(st.columns(len(values)), values):
        col.metric(label, "–" if value is None else f"{value:.1%}")
    per_class = pd.DataFrame(result["per_class"]).T
    st.dataframe(
        per_class,
        width="stretch",
        column_config={
            c: st.column_config.ProgressColumn(c, min_value=0.0, max_value=1.0, format="percent")
            for c in ("precision", "recall", "f1")
        },
    )


def confusion_ui(result: dict) -> None:
    """The confusion matrix; choosing a cell lists the evaluated images behind it."""
    classes = list(result.get("classes") or result["per_class"])
    matrix = pd.DataFrame(result["confusion_matrix"], index=classes, columns=classes)
    st.subheader("Confusion matrix", anchor=False)
    st.caption("Rows are the true classes, columns the predictions. Choose a cell to see its images.")
    event = st.dataframe(
        matrix.style.background_gradient(cmap="Reds", axis=None),
        key="confusion",
        on_select="rerun",
        selection_mode="single-cell",
    )
    cells = event.selection.cells if event else []
    if not cells:
        return
    row, column = cells[0]
    true_label, predicted = classes[row], str(column)
    items = shared.confusion_cell(result.get("predictions") or result.get("most_confused", []), true_label, predicted)
    st.markdown(f"**{matrix.loc[true_label, predicted]}** images of **{true_label}** predicted as **{predicted}**")
    if not items:
        st.caption("The evaluation lists images for its most confident mistakes only; none fall in this cell.")
    root = Path(result.get("data_dir", "."))
    shared.image_strip(
        [(shared.gallery_path(root, it["path"]), f"{it['probability']:.0%} · {it['path']}") for it in items]
    )


# --- models --------------------------------------------------------------------------------------------
def models_ui(name: str) -> None:
    """Every model the index keeps, newest first; any of them can be served again."""
    entries = simimg.list_models(name, shared.home())
    table = pd.DataFrame(
        [
            {
                "serving": "✔" if m.serving else "",
                "model": m.fingerprint,
                "kind": m.kind,
                "arch": m.arch,
                "val accuracy": m.val_accuracy,
                "created": m.created[:19].replace("T", " "),
                "source": m.source,
            }
            for m in entries
        ]
    )
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={
            "val accuracy": st.column_config.ProgressColumn(
                "val accuracy", min_value=0.0, max_value=1.0, format="percent"
            )
        },
    )
    job = shared.own_job("use")
    if job is not None and job.running and job.index == name:
        shared.watch(job, shared.job_progress)
        return
    fingerprints = [m.fingerprint for m in entries]
    serving = next((i for i, m in enumerate(entries) if m.serving), 0)
    shared.follow("chosen-model", fingerprints[serving], (name, fingerprints[serving]))
    chosen = st.selectbox(
        "Model",
        fingerprints,
        key="chosen-model",
        format_func=lambda fp: _describe_model(fp, entries),
        help="The serving model is chosen first: it is what Search answers with.",
    )
    serve, onnx, bundle = st.columns(3)
    if serve.button(
        "Serve this model",
        icon=":material/swap_horiz:",
        width="stretch",
        disabled=next(m.serving for m in entries if m.fingerprint == chosen),
    ):
        shared.start_job(
            name,
            "use",
            f"Switching '{name}' to model {chosen}",
            Task(simimg.use_model, {"model": chosen, "name": name, "home": str(shared.home())}, callbacks="phases"),
        )
        st.rerun()
    with onnx:
        export_ui(name, chosen, "onnx")
    with bundle:
        export_ui(name, chosen, "bundle")
    if job is not None and job.index == name and not shared.job_failed(job):
        st.success(
            f"Model {job.result.model} serves **{name}** from version {job.result.version} "
            f"({job.result.indexed} images needed embedding).",
            icon=":material/check_circle:",
        )


EXPORTS = {
    "onnx": ("model.onnx", "ONNX", "application/octet-stream"),
    "bundle": ("model.zip", "safetensors bundle", "application/zip"),
}


def export_ui(name: str, model: str, format: str) -> None:
    """A download of the chosen model: written on demand (ONNX is checked against onnxruntime first)."""
    filename, what, mime = EXPORTS[format]
    target = simimg.export_path(name, model, format, shared.home())
    if not target.is_file():
        if st.button(f"Prepare {what}", icon=":material/build:", width="stretch", key=f"export-{format}"):
            with st.spinner(f"Writing the {what}…"):
                simimg.export_model(name, target, format, shared.home(), model)
            st.rerun()
        return
    st.download_button(
        f"Download {what}",
        target.read_bytes(),
        file_name=f"{name}-{model[:8]}-{filename}",
        mime=mime,
        icon=":material/download:",
        width="stretch",
        key=f"download-{format}",
    )


def _describe_model(fingerprint: str, entries: list) -> str:
    m = next(e for e in entries if e.fingerprint == fingerprint)
    accuracy = "" if m.val_accuracy is None else f", val {m.val_accuracy:.1%}"
    serving = " · serving" if m.serving else ""
    return f"{fingerprint} ({m.kind}{accuracy}, {m.created[:16].replace('T', ' ')}){serving}"


# --- embedding map -------------------------------------------------------------------------------------
def map_ui(name: str, version: int, data_root: Path) -> None:
    left, right = st.columns([1, 3])
    method = left.radio("Projection", simimg.PROJECTIONS, format_func={"pca": "PCA (fast)", "tsne": "t-SNE"}.get)
    limit = left.select_slider("Points", [500, 1000, 2000, MAP_LIMIT], value=1000)
    points = embedding_map(str(shared.home()), name, version, method, limit)
    pick = alt.selection_point(name="pick", fields=["path"], on="click")
    chart = (
        alt.Chart(points)
        .mark_circle(size=70, opacity=0.8)
        .encode(
            x=alt.X("x:Q", axis=None),
            y=alt.Y("y:Q", axis=None),
            color=alt.Color("label:N", title="label", scale=alt.Scale(scheme="tableau10")),
            tooltip=["label:N", "path:N"],
        )
        .add_params(pick)
        .properties(height=520)
    )
    with right:
        event = st.altair_chart(chart, width="stretch", key="map", on_select="rerun")
    chosen = (event.selection.get("pick") or [{}])[0].get("path") if event else None
    with left:
        if chosen:
            shared.image_strip([(data_root / chosen, chosen)], columns=1)
        else:
            st.caption("Hover a point to see its file; click it to see the image.")


@st.cache_data(max_entries=16, show_spinner="Projecting the embeddings…")
def embedding_map(home: str, name: str, version: int, method: str, limit: int) -> pd.DataFrame:
    """x, y, label and path of up to `limit` images of one published version (a fixed sample when larger)."""
    return pd.DataFrame(shared.search_service(name).map_2d(method, limit))


# --- near-duplicates -----------------------------------------------------------------------------------
def duplicates_ui(name: str, version: int, data_root: Path) -> None:
    pairs, rule = duplicate_pairs(str(shared.home()), name, version, None)
    threshold = st.slider(
        "Similarity threshold",
        0.80,
        1.0,
        round(rule, 3),
        0.001,
        help="Pairs at least this similar (cosine). It starts at the collection's own threshold, the rule the "
        "Audit tab applies (cleanlab Datalab's: 1 - 0.13 x the median distance to an image's nearest "
        "neighbour). 1.0 means identical embeddings.",
    )
    st.caption(shared.landmarks_caption(str(shared.home()), name, version))
    if threshold != round(rule, 3):
        pairs, _ = duplicate_pairs(str(shared.home()), name, version, threshold)
    if pairs.empty:
        st.success("No pairs above this threshold.", icon=":material/check_circle:")
        return
    st.markdown(
        f"**{len(pairs)}** pairs at or above {threshold:.3f}" + (" (the first 500)" if len(pairs) >= 500 else "")
    )
    rows = list(pairs.head(PAIRS_SHOWN).itertuples())
    for start in range(0, len(rows), 2):
        for column, row in zip(st.columns(2), rows[start : start + 2]):
            with column.container(border=True):
                shared.image_strip(
                    [(data_root / row.a, row.a), (data_root / row.b, row.b)],
                    columns=2,
                    header=f":orange-badge[score {row.score:.4f}]",
                )
    st.dataframe(pairs, hide_index=True, width="stretch")


@st.cache_data(max_entries=32, show_spinner="Looking for near-duplicates…")
def duplicate_pairs(home: str, name: str, version: int, threshold: float | None) -> tuple[pd.DataFrame, float]:
    """The pairs at or above `threshold` (None: the collection's own), and the threshold used."""
    pairs, used = shared.search_service(name).near_duplicates(threshold, sample=DUPLICATE_LIMIT)
    frame = pd.DataFrame({"score": [p.score for p in pairs], "a": [p.a for p in pairs], "b": [p.b for p in pairs]})
    return frame, used


main()
