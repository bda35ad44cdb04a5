"""Browse: the collection an index holds, page by page, by class, with each class's count."""

from __future__ import annotations

import math
from pathlib import Path

import streamlit as st

from simimg.app import shared

PAGE_SIZE = 24
ALL = "all classes"


def main() -> None:
    with shared.friendly_errors():
        service = shared.index_header("Browse")
        if service is None:
            return
        counts = service.info()["labels"]
        choice = st.pills(
            "Class",
            [ALL, *counts],
            default=ALL,
            key="browse-class",
            format_func=lambda c: (
                f"{c or '(no class)'} · {counts[c]:,}" if c != ALL else f"{ALL} · {sum(counts.values()):,}"
            ),
        )
        label = None if choice in (None, ALL) else choice
        pages = max(1, math.ceil((sum(counts.values()) if label is None else counts[label]) / PAGE_SIZE))
        page = service.browse(label, pager(pages, f"browse-page-{choice}", "top"), PAGE_SIZE)
        first = (page.page - 1) * PAGE_SIZE
        st.caption(f"Images {first + 1:,}–{first + len(page.items):,} of {page.total:,}")
        gallery_ui(page.items, service.data_root)
        pager(page.pages, f"browse-page-{choice}", "bottom")


def pager(pages: int, key: str, where: str) -> int:
    """Page numbers above and below the grid, kept in step: the bottom one saves scrolling back up."""
    if pages <= 1:
        return 1
    mine, other = f"{key}-{where}", f"{key}-{'bottom' if where == 'top' else 'top'}"
    return st.pagination(pages, key=mine, on_change=_copy, args=(mine, other))


def _copy(source: str, target: str) -> None:
    st.session_state[target] = st.session_state[source]


def gallery_ui(rows: list[tuple[str, str | None]], data_root: Path) -> None:
    """Thumbnails in a responsive grid; "Find similar" opens Search with that image as the query."""
    with st.grid("auto", min_column_width=180):
        for path, label in rows:
            with st.container(border=True):
                full = shared.gallery_path(data_root, path)
                shared.card_image(full)
                st.caption(f"{label or 'no class'} · {path}", wrap=False)
                if st.button("Find similar", key=f"browse-{path}", icon=":material/search:", width="stretch"):
                    shared.search_from(full)


main()
