"""Search: drop an image, see its predicted class and the most similar images in the collection."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st
from PIL import Image

from simimg import ui, ui_audit
from simimg.search import Neighbor, Prediction, SearchService
from simimg.uploads import UPLOAD_TYPES, validate_upload

COLUMNS = 4
SIMILAR_KEY = "similar_to"
SEEN_UPLOAD_KEY = "upload_seen"


def main() -> None:
    with ui.friendly_errors():
        service = ui.open_index("Search")
        if service is None:
            return
        info = service.info()
        k, label, min_score = controls_ui(info)
        query = query_ui(service)
        if query is None:
            st.info(f"Drop an image above to find the most similar pictures in **{info['name']}**.",
                    icon=":material/image_search:")
            return
        results_ui(service, *query, k, label, min_score)


def controls_ui(info: dict) -> tuple[int, str | None, float | None]:
    """k, a label filter and a minimum score, in the sidebar where they stay out of the way."""
    with st.sidebar:
        st.subheader("Search options", anchor=False)
        k = st.slider("Results (k)", 1, 48, 12)
        labels = [lab for lab in info["labels"] if lab]
        choice = st.selectbox("Only label", ["any label", *labels])
        minimum = st.slider("Minimum score", -1.0, 1.0, -1.0, 0.01, help="Cosine similarity: 1 means identical.")
    return k, None if choice == "any label" else choice, None if minimum <= -1.0 else minimum


def query_ui(service: SearchService) -> tuple[Image.Image, str] | None:
    """The image to search with: a fresh upload, or a gallery image chosen with "Find similar"."""
    upload = st.file_uploader("Drop an image to search with", type=list(UPLOAD_TYPES), key="upload",
                              help="JPEG, PNG, WebP, BMP, GIF or TIFF")
    if upload is not None and upload.file_id != st.session_state.get(SEEN_UPLOAD_KEY):
        st.session_state[SEEN_UPLOAD_KEY] = upload.file_id
        st.session_state.pop(SIMILAR_KEY, None)
    if SIMILAR_KEY in st.session_state:
        path = Path(st.session_state[SIMILAR_KEY])
        return service.load(path), path.name
    if upload is None:
        return None
    return (validate_upload(upload.name, upload.getvalue(), st.get_option("server.maxUploadSize"),
                            draft_size=service.draft_size), upload.name)


def results_ui(service: SearchService, image: Image.Image, caption: str, k: int, label: str | None,
               min_score: float | None) -> None:
    result = service.query(image, k, label, min_score, query=caption)
    left, right = st.columns([1, 2], gap="large")
    with left:
        st.image(image, caption=caption, width="stretch")
        ui_audit.explain_ui(service, image, result)
    with right:
        prediction_ui(result.prediction)
    st.subheader(f"{len(result.neighbors)} most similar", anchor=False)
    if not result.neighbors:
        st.warning("Nothing matches: lower the minimum score or clear the label filter.")
    grid_ui(result.neighbors, service.data_root)


def prediction_ui(prediction: Prediction | None) -> None:
    if prediction is None:
        st.info("This index has no classifier yet: train one on the **Train** page to see predicted classes.",
                icon=":material/school:")
        return
    st.metric("Predicted class", prediction.label, f"{prediction.probability:.1%} sure", delta_color="off")
    top = pd.DataFrame(prediction.top)
    chart = alt.Chart(top).mark_bar(cornerRadiusEnd=4).encode(
        x=alt.X("probability:Q", title="probability", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=alt.Y("label:N", sort="-x", title=None),
        color=alt.condition(alt.datum.label == prediction.label, alt.value("#ff4b4b"), alt.value("#9aa5b1")),
        tooltip=["label", alt.Tooltip("probability:Q", format=".1%")])
    # The pixel height goes to Streamlit itself: set only on the chart, it was squeezed to a sliver.
    st.altair_chart(chart.properties(height=alt.Step(30)), width="stretch", height=30 * len(top) + 60)


def grid_ui(neighbors: list[Neighbor], data_root: Path) -> None:
    """Cards in rows of COLUMNS: thumbnail, score, label, path, and a button to search from that image."""
    for start in range(0, len(neighbors), COLUMNS):
        for column, (rank, n) in zip(st.columns(COLUMNS), enumerate(neighbors[start:start + COLUMNS], start + 1)):
            with column.container(border=True):
                card_ui(rank, n, ui.gallery_path(data_root, n.path))


def card_ui(rank: int, n: Neighbor, path: Path) -> None:
    thumb = ui.thumbnail(path)
    if thumb is None:
        st.warning("image missing or unreadable")
    else:
        st.image(thumb, width="stretch")
    st.markdown(f"**#{rank}** :green-badge[score {n.score:.3f}] :blue-badge[{n.label or 'no label'}]")
    st.caption(n.path)
    st.button("Find similar", key=f"similar-{rank}-{n.path}", icon=":material/search:", width="stretch",
              on_click=st.session_state.__setitem__, args=(SIMILAR_KEY, str(path)))


main()
