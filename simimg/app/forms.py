"""Form widgets the Build and Train pages share: the folder box, the starting weights, the classes preview.

Widget values persist for the browser session (`persist_state="session"`), so a form keeps what the user chose
while a job runs and after it ends. The same words name the same choices on every page.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

import simimg
from simimg import DEFAULT_ARCH
from simimg.app import shared
from simimg.errors import SimimgError

WEIGHTS = {"imagenet": "ImageNet weights", "none": "Scratch (random init)", "model": "An earlier simimg model"}


def folder_input(key: str, index: str | None) -> str:
    """A folder box prefilled with the selected index's own collection (else the first one found under the data
    roots); checked by `resolve_folder`. Its state is kept per index, so switching index in the sidebar brings
    that index's folder back rather than keeping the previous one's."""
    roots = simimg.data_roots()
    choices = [str(p) for p in simimg.list_collections()]
    own = index_collection(index)
    shared.follow(f"{key}-folder", str(own) if own is not None else choices[0] if choices else "", index)
    typed = st.text_input(
        "Image folder",
        key=f"{key}-folder",
        placeholder="data/my-photos",
        persist_state="session",
        help="A folder of class folders (<folder>/<class>/<image>) under "
        + ", ".join(f"`{r}`" for r in roots)
        + ". Add more roots with $SIMIMG_DATA_ROOTS.",
    )
    if choices:
        st.caption("Collections found: " + " · ".join(f"`{Path(c).name}`" for c in choices))
    return typed


def checked_folder(typed: str) -> Path | None:
    """The folder typed, resolved; an empty box is None, a wrong one says why under the box (the form stays)."""
    if not typed.strip():
        return None
    try:
        return resolve_folder(typed)
    except SimimgError as err:
        st.error(str(err), icon=":material/error:")
        return None


def index_collection(index: str | None) -> Path | None:
    """The folder index INDEX was built from, or None when there is no such index (or it records none)."""
    if index is None:
        return None
    try:
        return simimg.collection_folder(index, shared.home())  # the same answer the API's refusals give
    except SimimgError:
        return None


def other_folder(folder: Path, index: str | None) -> Path | None:
    """The index's own collection when `folder` is another one (a warning is due), else None."""
    own = index_collection(index)
    return own if own is not None and own.resolve() != folder.resolve() else None


def resolve_folder(typed: str) -> Path:
    """The real folder, only if it lies under an allowed data root (SimimgError saying which problem otherwise)."""
    return simimg.check_data_dir(typed)


def weights_input(key: str, arch: str | None) -> str:
    """Where a new model starts: ImageNet (preselected only when its file is on this machine), random init, or a
    model an index keeps. Returns a `--weights` value."""
    arch = arch or DEFAULT_ARCH
    target, cached = simimg.imagenet_weights(arch)
    choice = st.radio(
        "Start from",
        list(WEIGHTS),
        format_func=WEIGHTS.get,
        index=0 if cached else 1,
        horizontal=True,
        key=f"{key}-weights",
        persist_state="session",
        help="ImageNet: pretrained features (the best start). Scratch: random weights, for a quick "
        "try. An earlier simimg model: transfer from a model one of your indexes keeps.",
    )
    if not cached:
        st.caption(
            f"ImageNet weights for {arch} are not on this machine: they are downloaded on first use when it "
            f"is online; offline, put `{target.name}` in `{target.parent}`."
        )
    if choice != "model":
        return choice
    models = kept_models()
    if not models:
        raise SimimgError("no index keeps a model yet: start from ImageNet weights or from scratch")
    return st.selectbox(
        "Earlier model", list(models), format_func=models.get, key=f"{key}-model", persist_state="session"
    )


def kept_models() -> dict[str, str]:
    """{model folder: 'index · fingerprint · kind · accuracy'} for every model of every index, newest index first."""
    found = {}
    for name in simimg.list_indexes(shared.home()):
        for m in simimg.list_models(name, shared.home()):
            accuracy = "" if m.val_accuracy is None else f" · val {m.val_accuracy:.0%}"
            found[m.path] = f"{name} · {m.fingerprint[:8]} · {m.kind}{accuracy}"
    return found


def class_preview(folder: Path) -> None:
    """The classes a training run would see in `folder`, with their train and validation counts."""
    try:
        counts, unreadable = _class_counts(str(folder), folder.stat().st_mtime_ns)
    except SimimgError as err:
        st.warning(f"This folder cannot train a classifier yet: {err}", icon=":material/warning:")
        return
    st.dataframe(counts, hide_index=True, width="stretch")
    if unreadable:
        st.warning(
            "Some files do not open as images: they are not counted above and training skips them. Fix or "
            "remove them first. " + "; ".join(unreadable),
            icon=":material/broken_image:",
        )


@st.cache_data(max_entries=32, show_spinner="Reading the class folders…")
def _class_counts(folder: str, mtime_ns: int) -> tuple[pd.DataFrame, list[str]]:
    """Per class, the images that open (headers only); and per class with files that do not, how many and which."""
    source, counts = simimg.class_counts(folder)
    validation = f"validation ({source})"
    table = pd.DataFrame([{"class": c.label, "train": c.train, validation: c.val} for c in counts])
    unreadable = [
        f"**{c.label}**: {len(c.unreadable)} ("
        + ", ".join(f"`{p}`" for p in c.unreadable[:3])
        + (", …)" if len(c.unreadable) > 3 else ")")
        for c in counts
        if c.unreadable
    ]
    return table, unreadable
