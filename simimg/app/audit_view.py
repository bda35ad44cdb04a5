"""The app's dataset audit (a tab of the Inspect page) and explanations (a toggle on the Search page).

Streamlit over `api.audit` and `SearchService.explain`, kept out of the pages so that each page only adds a tab
or a toggle and one call. Any image of a finding opens in Search through Search's own "find similar" query.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
from PIL import Image

import simimg
from simimg import AuditReport, QueryResult, SearchService
from simimg.app import shared
from simimg.app.background import Task
from simimg.app.forms import resolve_folder

SHOWN = 12
KINDS = ("Duplicates", "Label issues", "Outliers")
CLASS_TARGET = "its predicted class"


# --- the Audit tab -------------------------------------------------------------------------------------
def audit_tab(name: str, data_root: Path) -> None:
    """Audit the index's own collection in the background; show the last audit's findings.

    The folder box is kept per index, so switching index in the sidebar never audits one index's folder with
    another's model (the audit refuses a folder outside the index's collection anyway).
    """
    job = shared.own_job("audit")
    job = job if job is not None and job.index == name else None
    if job is not None and job.running:
        shared.watch(job, shared.job_progress)
        return
    shared.follow("audit-folder", str(data_root), name)
    typed = st.text_input(
        "Folder to audit",
        key="audit-folder",
        help="The index's collection (<folder>/<class>/<image>), with train/ and val/ folders or "
        "without; images in it that the index does not hold yet are embedded with its model, "
        "not added.",
    )
    if typed.strip() and Path(typed.strip()).resolve() != data_root.resolve():
        st.warning(
            f"This is not the folder **{name}** was built from (`{data_root}`): an audit belongs to the "
            "index's own collection.",
            icon=":material/warning:",
        )
    if st.button("Audit this folder", type="primary", icon=":material/health_and_safety:"):
        folder = resolve_folder(typed)
        shared.start_job(
            name,
            "audit",
            f"Audit of '{name}'",
            Task(
                simimg.audit,
                {"data_dir": str(folder), "name": name, "home": str(shared.home())},
                callbacks="phases",
            ),
        )
        st.rerun()
    if job is not None and shared.job_failed(job):
        return
    report = simimg.last_audit(name, shared.home())
    if report is None:
        st.caption(
            "No audit of this index yet: it looks for likely label errors, duplicates (across classes and "
            "between train and val), outliers and class imbalance."
        )
        return
    report_ui(report)


def report_ui(report: AuditReport) -> None:
    s = report.summary
    values = [
        ("Label issues", s["label_issues"]),
        ("Exact duplicates", s["exact_duplicates"]),
        ("Near duplicates", s["near_duplicates"]),
        ("Cross-class", s["cross_class"]),
        ("Cross-split", s["cross_split"]),
        ("Outliers", s["outliers"]),
    ]
    for column, (label, value) in zip(st.columns(len(values)), values):
        column.metric(label, value)
    balance = s["imbalance"]
    counts = " · ".join(f"{c} **{n}**" for c, n in balance["counts"].items())
    st.markdown(
        f"`{s['data_dir']}`: {s['images']} images ({s['split']} split), model `{s['model']}`, near-duplicates "
        f"from cosine {s['near_threshold']:.4f}. Classes: {counts}"
        + (f" :orange-badge[imbalanced {balance['ratio']:.1f}x]" if balance["imbalanced"] else "")
    )
    kind = st.radio("Findings", KINDS, horizontal=True, key="audit-kind", label_visibility="collapsed")
    root = Path(s["data_dir"])
    if kind == "Duplicates":
        findings = [(d["paths"], d["labels"], _duplicate_header(d)) for d in report.duplicates]
    elif kind == "Label issues":
        findings = [
            (
                [i["path"]],
                [i["label"]],
                f":red-badge[labelled {i['label']}] → :green-badge[looks like "
                f"{i['suggested']}] label quality {i['score']:.3f}",
            )
            for i in report.label_issues
        ]
    else:
        findings = [([o["path"]], [""], f":violet-badge[outlier score {o['score']:.3f}]") for o in report.outliers]
    if not findings:
        st.success(f"No {kind.lower()} found.", icon=":material/check_circle:")
        return
    st.caption(
        f"{len(findings)} found"
        + (f"; the first {SHOWN} shown, all in the table below" if len(findings) > SHOWN else "")
        + ". **Open in Search** finds the images most similar to one."
    )
    for number, (paths, labels, header) in enumerate(findings[:SHOWN]):
        finding_ui(number, [shared.gallery_path(root, p) for p in paths], paths, labels, header)
    table = {"Duplicates": report.duplicates, "Label issues": report.label_issues, "Outliers": report.outliers}[kind]
    st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")


def finding_ui(number: int, files: list[Path], paths: list[str], labels: list[str], header: str) -> None:
    """One finding in a bordered box: its images side by side, each with its label and an Open in Search button."""
    with st.container(border=True):
        st.markdown(header)
        for column, file, path, label in zip(st.columns(max(len(files), 3)), files, paths, labels):
            thumb = shared.thumbnail(file)
            if thumb is None:
                column.warning(f"cannot read {path}")
                continue
            column.image(thumb, caption=f"{label} · {path}" if label else path, width="stretch")
            if column.button("Open in Search", key=f"audit-open-{number}-{path}", icon=":material/image_search:"):
                shared.search_from(file)


def _duplicate_header(d: dict) -> str:
    flags = [":red-badge[cross-class]"] * d["cross_class"] + [":orange-badge[cross-split: train/val leak]"] * d[
        "cross_split"
    ]
    score = "same bytes" if d["kind"] == "exact" else f"cosine {d['score']:.4f}"
    return f"**{d['kind']}** duplicate ({score}) " + " ".join(flags)


# --- the Search page's explanation toggle -----------------------------------------------------------
def explain_ui(service: SearchService, image: Image.Image, result: QueryResult) -> None:
    """A toggle: where the model looks in the query, for its predicted class or for its likeness to a result
    other than the query itself (whose map is flat: the cosine is at its maximum there)."""
    if not st.toggle(
        "Explain",
        key="explain",
        help="Where the model looks: Grad-CAM on its last convolutional block, for the class's score "
        "or for the cosine similarity between the query and the chosen result.",
    ):
        return
    others = service.explain_targets(result, st.session_state.get(shared.SIMILAR_KEY))  # the "Find similar" query
    choices = ([CLASS_TARGET] if result.prediction is not None else []) + [n.path for n in others]
    if not choices:
        st.info(
            "Nothing to explain: this model has no classifier, and the only results are the query itself.",
            icon=":material/info:",
        )
        return
    target = st.selectbox(
        "Explain",
        choices,
        key="explain-target",
        format_func=lambda c: c if c == CLASS_TARGET else f"its similarity to {c}",
    )
    neighbor = None if target == CLASS_TARGET else shared.gallery_path(service.data_root, target)
    with st.spinner("Computing the map…"):
        explanation = service.explain(image, neighbor)
    what = (
        f"class {explanation.target} ({explanation.score:.1%})"
        if explanation.kind == "class"
        else f"similarity to {target} (cosine {explanation.score:.3f})"
    )
    if not explanation.informative:
        st.info(flat_map_message(what, service.model.bundle.random_features), icon=":material/blur_on:")
        return
    st.image(
        explanation.overlay(image),
        width="stretch",
        caption=f"Grad-CAM of its {what}: red marks the regions that raise it most, blue those that raise "
        "it least or not at all (and what lies outside the centre crop the model sees).",
    )


def flat_map_message(what: str, untrained: bool) -> str:
    """Why a flat map is not drawn, and what to do about it."""
    advice = (
        "An untrained (random-init) model often gives this: train one on the **Train** page."
        if untrained
        else "Try another target."
    )
    return (
        f"The map of its {what} is flat: this model's features single out no region of the image for it, so "
        f"there is nothing to show. {advice}"
    )
