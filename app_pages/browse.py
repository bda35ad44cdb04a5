"""Browse: the collection an index holds, page by page, by class, with each class's count."""

from __future__ import annotations

import math
from pathlib import Path

import streamlit as st

from simimg import ui

PAGE_SIZE = 24
ALL = "all classes"


def main() -> None:
    with ui.friendly_errors():
        service = ui.open_index("Browse")
        if service is None:
            return
        snapshot = service.snapshot
        counts = service.info()["labels"]
        choice = st.pills("Class", [ALL, *counts], default=ALL, key="browse-class",
                          format_func=lambda c: f"{c or '(no class)'} · {counts[c]:,}" if c != ALL else
                          f"{ALL} · {len(snapshot.paths):,}")
        rows = [(p, lab) for p, lab in zip(snapshot.paths, snapshot.labels) if choice in (None, ALL) or lab == choice]
        pages = max(1, math.ceil(len(rows) / PAGE_SIZE))
        page = st.pagination(pages, key=f"browse-page-{choice}") if pages > 1 else 1
        first = (page - 1) * PAGE_SIZE
        st.caption(f"Images {first + 1:,}–{min(first + PAGE_SIZE, len(rows)):,} of {len(rows):,}")
        gallery_ui(rows[first:first + PAGE_SIZE], service.data_root)


def gallery_ui(rows: list[tuple[str, str | None]], data_root: Path) -> None:
    """Thumbnails in a responsive grid; "Find similar" opens Search with that image as the query."""
    with st.grid("auto", min_column_width=180):
        for path, label in rows:
            with st.container(border=True):
                full = ui.gallery_path(data_root, path)
                ui.card_image(full)
                st.caption(f"{label or 'no class'} · {path}")
                if st.button("Find similar", key=f"browse-{path}", icon=":material/search:", width="stretch"):
                    ui.search_from(full)


main()
