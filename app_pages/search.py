"""Search: drop an image (or take one with the camera), see its predicted class and the most similar images."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st
from PIL import Image

from simimg import DEFAULT_MAX_MB, UPLOAD_TYPES, Neighbor, Prediction, SearchService, validate_upload
from simimg.app import audit_view, shared

SEEN_UPLOAD_KEY = "upload_seen"
CARD_MIN_PX = 210  # the results grid fits as many columns of at least this width as the window allows


def main() -> None:
    with shared.friendly_errors():
        service = shared.index_header("Search")
        if service is None:
            return
        info = service.info()
        shared.untrained_notice(info)
        k, label, min_score = controls_ui(info)
        query = query_ui(service)
        if query is None:
            st.info(
                f"Drop an image above (up to {cap_mb()} MB), or take one with the camera, to find the most "
                f"similar pictures in **{info['name']}**.",
                icon=":material/image_search:",
            )
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
        st.caption(shared.landmarks_caption(str(shared.home()), info["name"], info["version"]))
    return k, None if choice == "any label" else choice, None if minimum <= -1.0 else minimum


def query_ui(service: SearchService) -> tuple[Image.Image, str, bool] | None:
    """The image to search with: a fresh upload or photo, or a gallery image chosen with "Find similar"."""
    generation = st.session_state.setdefault(shared.UPLOADER_KEY, 0)
    upload_tab, camera_tab = st.tabs(["Upload", "Camera"])
    upload = upload_tab.file_uploader(
        "Drop an image to search with",
        type=list(UPLOAD_TYPES),
        key=f"upload-{generation}",
        help=f"JPEG, PNG, WebP, BMP, GIF or TIFF, up to {cap_mb()} MB",
    )
    photo = camera_tab.camera_input("Take a picture to search with", key=f"camera-{generation}")
    fresh = photo or upload
    if fresh is not None and fresh.file_id != st.session_state.get(SEEN_UPLOAD_KEY):
        st.session_state[SEEN_UPLOAD_KEY] = fresh.file_id
        st.session_state.pop(shared.SIMILAR_KEY, None)
    if shared.SIMILAR_KEY in st.session_state:
        path = Path(st.session_state[shared.SIMILAR_KEY])
        return service.load(path), path.name, True
    if fresh is None:
        return None
    image = validate_upload(fresh.name, fresh.getvalue(), cap_mb(), draft_size=service.draft_size)
    return image, fresh.name, False


def cap_mb() -> int:
    """The largest image the page accepts, in MB: simimg's cap, or server.maxUploadSize when that is smaller.

    The server takes files up to server.maxUploadSize (200 MB in .streamlit/config.toml), so a file over the cap
    reaches `validate_upload` and is refused in the page with the limit, not only by a red chip on the file.
    """
    return min(DEFAULT_MAX_MB, int(st.get_option("server.maxUploadSize")))


def results_ui(
    service: SearchService,
    image: Image.Image,
    caption: str,
    from_gallery: bool,
    k: int,
    label: str | None,
    min_score: float | None,
) -> None:
    result = service.query(image, k, label, min_score, query=caption)
    if st.session_state.pop(shared.SCROLL_KEY, False):
        scroll_to_top()
    left, right = st.columns(2, gap="large")
    with left:
        st.image(image, caption=caption, width="stretch")
        if from_gallery:
            st.caption(f"Searching with **{caption}** from the collection (Find similar).")
    with right:  # the prediction, then the explanation beside the query rather than an empty block
        prediction_ui(result.prediction)
        audit_view.explain_ui(service, image, result)
    if not result.neighbors:
        st.warning("Nothing matches: lower the minimum score or clear the label filter.")
        return
    st.subheader(f"{len(result.neighbors)} most similar", anchor=False)
    grid_ui(result.neighbors, service.data_root)


def scroll_to_top() -> None:
    """Bring the new query into view after "Find similar" was clicked at the bottom of the grid."""
    st.html(
        "<script>window.parent.document.querySelector('section.stMain, [data-testid=stMain]')"
        "?.scrollTo({top: 0, behavior: 'smooth'});</script>",
        unsafe_allow_javascript=True,
    )


def prediction_ui(prediction: Prediction | None) -> None:
    if prediction is None:
        st.info(
            "This index has no classifier yet: train one on the **Train** page to see predicted classes.",
            icon=":material/school:",
        )
        return
    st.metric("Predicted class", prediction.label)
    st.caption(f"{prediction.probability:.1%} probability")
    top = pd.DataFrame(prediction.top)
    chart = (
        alt.Chart(top)
        .mark_bar(cornerRadiusEnd=4)
        .encode(
            x=alt.X("probability:Q", title="probability", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("label:N", sort="-x", title=None),
            color=alt.condition(alt.datum.label == prediction.label, alt.value("#ff4b4b"), alt.value("#9aa5b1")),
            tooltip=["label", alt.Tooltip("probability:Q", format=".1%")],
        )
    )
    # The pixel height goes to Streamlit itself: set only on the chart, it was squeezed to a sliver.
    st.altair_chart(chart.properties(height=alt.Step(30)), width="stretch", height=30 * len(top) + 60)


def grid_ui(neighbors: list[Neighbor], data_root: Path) -> None:
    """Cards in a responsive grid: as many columns as fit at CARD_MIN_PX, fewer on a narrow window."""
    with st.grid("auto", min_column_width=CARD_MIN_PX):
        for rank, n in enumerate(neighbors, 1):
            with st.container(border=True):
                card_ui(rank, n, shared.gallery_path(data_root, n.path))


def card_ui(rank: int, n: Neighbor, path: Path) -> None:
    shared.card_image(path)
    st.markdown(f"**#{rank}** :green-badge[score {n.score:.3f}] :blue-badge[{n.label or 'no label'}]")
    st.caption(n.path, wrap=False)
    st.button(
        "Find similar",
        key=f"similar-{rank}-{n.path}",
        icon=":material/search:",
        width="stretch",
        on_click=shared.queue_similar,
        args=(path,),
    )


main()
