"""Review: work through a queue of images (the audit's findings, the unlabeled pool, one class) and fix labels.

Each action is one batch of label edits, published as an index version; then the classifier head refits on the
stored embeddings (seconds) and the queue reorders. Buttons act on the selected images, or on the first one when
none is selected, so the keyboard alone (A, L, X, D, S, U) walks a queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

import simimg
from simimg import ReviewItem, SimimgError
from simimg.app import shared

PAGE = 12
COLUMNS = 4
QUEUE_NAMES = {
    "issues": "Label issues",
    "duplicates": "Duplicates",
    "unlabeled": "Unlabeled, least certain first",
    "class": "A class, least typical first",
}
SOURCES = {"issues": "audit", "duplicates": "user", "unlabeled": "prediction", "class": "prediction"}
ACTIONS_DONE = {
    "accept": "Accepted",
    "relabel": "Relabelled",
    "exclude": "Excluded",
    "dismiss": "Dismissed",
    "keep": "Kept one, excluded the rest",
    "undo": "Undid the last batch",
}
CHANGES_LABELS = {"accept", "relabel", "exclude", "keep", "undo"}  # what a refit follows (dismiss and skip do not)


@dataclass(frozen=True)
class Action:
    """One press: what to do, to which images, and for `relabel` the class (for `keep`, the group's others)."""

    kind: str
    items: tuple[ReviewItem, ...]
    to: str | None = None
    group: tuple[str, ...] = ()


def main() -> None:
    with shared.friendly_errors():
        service = shared.index_header("Review")
        if service is None:
            return
        name, data_root = service.folder.name, service.data_root
        info = service.info()
        run_pending(name, data_root)
        said = st.session_state.pop(_key("said", name), None)
        if said:
            (st.warning if "not refit" in said else st.success)(said, icon=":material/done_all:")
        progress_ui(name)
        queue, label = queue_choice(info)
        try:
            items = open_items(name, queue, label, service.snapshot.version)
        except SimimgError as e:
            st.info(shared.app_message(str(e)), icon=":material/info:")
            return
        items = [i for i in items if i.path not in skipped(name)]
        if not items:
            st.success("Nothing left in this queue.", icon=":material/task_alt:")
            skipped_ui(name)
            return
        shown = items[:PAGE]
        actions_ui(name, queue, shown, [c for c in info["labels"] if c])
        grid_ui(name, queue, shown, items, data_root)
        st.caption(f"{len(items):,} images in this queue; the first {len(shown)} are shown.")
        skipped_ui(name)


def queue_choice(info: dict) -> tuple[str, str | None]:
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    queue = left.segmented_control(
        "Queue", list(QUEUE_NAMES), format_func=QUEUE_NAMES.get, default="issues", key="review-queue"
    )
    queue = queue or "issues"
    label = None
    if queue == "class":
        label = right.selectbox("Class", [c for c in info["labels"] if c], key="review-class")
    return queue, label


@st.cache_data(max_entries=32, show_spinner="Ordering the queue…")
def _queue(home_dir: str, name: str, queue: str, label: str | None, version: int, audit_mtime: int) -> list:
    """`review_queue` of one published version and one audit (the keys): reruns that only select reuse it."""
    return simimg.review_queue(name, queue, label, home_dir)


def open_items(name: str, queue: str, label: str | None, version: int) -> list[ReviewItem]:
    audit = simimg.IndexFolder.of(shared.home(), name).audit
    mtime = audit.stat().st_mtime_ns if audit.exists() else 0
    return _queue(str(shared.home()), name, queue, label, version, mtime)


# --- what the user did, and how accuracy moved ---------------------------------------------------------
def progress_ui(name: str) -> None:
    """Labels given, images excluded and findings dismissed (the edits in force), and the last refit's accuracy."""
    edits = simimg.label_edits(name, shared.home())
    counts = {a: sum(e["action"] == a for e in edits) for a in ("set", "exclude", "dismiss")}
    history = st.session_state.get(_key("accuracy", name), [])
    cols = st.columns(4)
    cols[0].metric("Labels given", counts["set"])
    cols[1].metric("Excluded", counts["exclude"])
    cols[2].metric("Dismissed", counts["dismiss"])
    if len(history) >= 2:
        before, after = history[-2], history[-1]
        cols[3].metric("Validation accuracy", f"{after:.1%}", f"{(after - before) * 100:+.1f} pts since the last batch")
    elif history:
        cols[3].metric("Validation accuracy", f"{history[-1]:.1%}")
    else:
        cols[3].metric("Validation accuracy", "–", help="measured when the classifier refits after a batch")


def skipped(name: str) -> set[str]:
    return st.session_state.setdefault(_key("skips", name), set())


def skipped_ui(name: str) -> None:
    if skipped(name) and st.button(
        f"Show the {len(skipped(name))} skipped images again", icon=":material/replay:", key=_key("skipped", name)
    ):
        skipped(name).clear()
        st.rerun()


def _key(what: str, name: str) -> str:
    return f"review-{what}:{name}"


# --- acting on images ------------------------------------------------------------------------------------
def actions_ui(name: str, queue: str, shown: list[ReviewItem], classes: list[str]) -> None:
    """The bar of batch actions with their keys: on the selected images, else on the first one."""
    picked = [i for i in shown if st.session_state.get(_pick_key(name, i.path))]
    target = tuple(picked or shown[:1])
    st.caption(
        f"Acting on the **{len(picked)} selected** images."
        if picked
        else "Nothing selected: the buttons and keys act on the **first** image."
    )
    cols = st.columns([2, 1, 1, 1, 1, 1, 1])
    to = cols[0].selectbox("Relabel to", classes, key=_key("to", name), label_visibility="collapsed")
    suggested = tuple(i for i in target if i.suggested)
    buttons = [
        ("Accept", "A", Action("accept", suggested), not suggested),
        ("Relabel", "L", Action("relabel", target, to), to is None),
        ("Exclude", "X", Action("exclude", target), False),
        ("Dismiss", "D", Action("dismiss", target), queue == "unlabeled"),
        ("Skip", "S", Action("skip", target), False),
    ]
    for col, (text, key, action, disabled) in zip(cols[1:], buttons):
        col.button(
            text,
            key=_key(text, name),
            shortcut=key,
            disabled=disabled,
            on_click=_press,
            args=(name, queue, action),
            width="stretch",
        )
    cols[-1].button(
        "Undo",
        key=_key("undo", name),
        shortcut="U",
        on_click=_press,
        args=(name, queue, Action("undo", ())),
        width="stretch",
        help="undo the last batch of edits",
    )
    picks = [_pick_key(name, i.path) for i in shown]
    st.checkbox("Select every image shown", key=_key("all", name), on_change=_select_all, args=(name, picks))
    st.toggle("Refit the classifier after each batch", value=True, key=_key("refit", name))


def grid_ui(name: str, queue: str, shown: list[ReviewItem], items: list[ReviewItem], data_root: Path) -> None:
    groups: dict[int | None, tuple[str, ...]] = {}
    for i in items:
        groups[i.group] = (*groups.get(i.group, ()), i.path)
    for start in range(0, len(shown), COLUMNS):
        for column, item in zip(st.columns(COLUMNS), shown[start : start + COLUMNS]):
            with column:
                card_ui(name, queue, item, groups[item.group], data_root, first=item is shown[0])


def card_ui(
    name: str, queue: str, item: ReviewItem, group: tuple[str, ...], data_root: Path, first: bool = False
) -> None:
    path = shared.gallery_path(data_root, item.path)
    shared.card_image(path)
    st.checkbox(item.path, key=_pick_key(name, item.path))
    st.markdown(describe(queue, item) + (" :red-badge[first]" if first else ""))
    left, right = st.columns(2)
    if queue == "duplicates":
        left.button(
            "Keep this",
            key=_key(f"keep {item.path}", name),
            on_click=_press,
            args=(name, queue, Action("keep", (item,), group=group)),
            icon=":material/check:",
            help="exclude the other images of this group",
            width="stretch",
        )
    elif item.suggested:
        left.button(
            "Accept",
            key=_key(f"accept {item.path}", name),
            on_click=_press,
            args=(name, queue, Action("accept", (item,))),
            icon=":material/check:",
            help=f"label it {item.suggested}",
            width="stretch",
        )
    if right.button("Similar", key=_key(f"similar {item.path}", name), icon=":material/image_search:", width="stretch"):
        shared.search_from(path)


def describe(queue: str, item: ReviewItem) -> str:
    label = f":blue-badge[{item.label}]" if item.label else ":gray-badge[no label]"
    if queue == "duplicates":
        return f"{label} :orange-badge[group {item.group}] :gray-badge[score {item.score:.3f}]"
    if not item.suggested:
        return f"{label} :gray-badge[typicality {item.score:.3f}]"
    chance = f" {item.probability:.0%}" if item.probability is not None else ""
    detail = {"issues": f"issue score {item.score:.3f}", "unlabeled": f"margin {item.score:.2f}"}.get(
        queue, f"typicality {item.score:.3f}"
    )
    return f"{label} → :green-badge[{item.suggested}{chance}] :gray-badge[{detail}]"


def _pick_key(name: str, path: str) -> str:
    return _key(f"pick {path}", name)


def _select_all(name: str, picks: list[str]) -> None:
    for key in picks:
        st.session_state[key] = st.session_state[_key("all", name)]


def _press(name: str, queue: str, action: Action) -> None:
    """A button's callback: clear the selection and leave the action for this run to carry out (in the page,
    where its progress and its errors can show)."""
    for item in action.items:
        st.session_state.pop(_pick_key(name, item.path), None)
    st.session_state[_key("all", name)] = False
    st.session_state[_key("pending", name)] = (queue, action)


def run_pending(name: str, data_root: Path) -> None:
    """Carry out the last press: one batch of edits (a new index version), then the head's refit; then draw the
    page again from the new version, saying what was done."""
    pending = st.session_state.pop(_key("pending", name), None)
    if pending is None:
        return
    queue, action = pending
    if action.kind == "skip":
        skipped(name).update(i.path for i in action.items)
        return
    done = ACTIONS_DONE[action.kind]
    with st.spinner(f"{done}: saving the batch…"):
        report = apply(name, queue, action)
    said = f"{done}: {report.edits} image{'s' * (report.edits != 1)}, index version {report.version}."
    if action.kind in CHANGES_LABELS and st.session_state.get(_key("refit", name), True):
        with st.spinner("Refitting the classifier on the stored embeddings…"):
            said += " " + refit(name, data_root)
    shared.search_service(name).refresh(wait=True)
    st.session_state[_key("said", name)] = said
    st.rerun()


def apply(name: str, queue: str, action: Action) -> simimg.LabelsReport:
    home, paths = shared.home(), [i.path for i in action.items]
    if action.kind == "accept":
        return simimg.apply_labels(name, {i.path: str(i.suggested) for i in action.items}, home, SOURCES[queue])
    if action.kind == "relabel":
        return simimg.set_labels(name, paths, str(action.to), home)
    if action.kind == "exclude":
        return simimg.exclude_images(name, paths, home)
    if action.kind == "dismiss":
        return simimg.dismiss_findings(name, paths, home)
    if action.kind == "keep":
        return simimg.keep_one(name, paths[0], list(action.group), home)
    return simimg.undo_labels(name, home)


def refit(name: str, data_root: Path) -> str:
    """A head-only fit on the corrected labels, served at once; its validation accuracy joins the history (the
    serving model's own figure first, as the "before"). Returns what to tell the user."""
    history = st.session_state.setdefault(_key("accuracy", name), [])
    if not history:
        serving = [m for m in simimg.list_models(name, shared.home()) if m.serving and m.val_accuracy is not None]
        history += [serving[0].val_accuracy] if serving else []
    try:
        report = simimg.train(data_root, name, shared.home(), head_only=True)
    except SimimgError as e:
        return f"The classifier was not refit: {shared.app_message(str(e))}"
    history.append(report.val_accuracy)
    before = f"{history[-2]:.1%} → " if len(history) > 1 else ""
    return f"Classifier refit in {report.seconds:.1f} s: validation accuracy {before}{report.val_accuracy:.1%}."


main()
