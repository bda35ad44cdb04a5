"""Which folders the app may read collections from: ./data plus $SIMIMG_DATA_ROOTS, nothing outside them.

A web page that takes a folder path must not become a way to read the whole disk, so every folder input is
resolved (links and `..` included) and must land under one of these roots.
"""

from __future__ import annotations

import os
from pathlib import Path

from simimg.errors import SimimgError

DEFAULT_ROOT = "data"
ROOTS_ENV = "SIMIMG_DATA_ROOTS"


def data_roots(env: str | None = None) -> list[Path]:
    """./data, then each entry of $SIMIMG_DATA_ROOTS (os.pathsep-separated), resolved and without repeats."""
    extra = os.environ.get(ROOTS_ENV, "") if env is None else env
    roots: list[Path] = []
    for entry in [DEFAULT_ROOT, *extra.split(os.pathsep)]:
        root = Path(entry.strip()).expanduser().resolve() if entry.strip() else None
        if root is not None and root not in roots:
            roots.append(root)
    return roots


def resolve_data_dir(text: str, roots: list[Path]) -> Path:
    """The real folder a user typed, if it lies under an allowed root; relative paths are tried against each root."""
    if not text or not text.strip():
        raise SimimgError("choose a folder of images (root/<class>/<image>)")
    typed = Path(text.strip()).expanduser()
    candidates = [typed] if typed.is_absolute() else [Path.cwd() / typed, *(root / typed for root in roots)]
    inside = [c.resolve() for c in candidates if _under(c.resolve(), roots)]
    for real in inside:
        if real.is_dir():
            return real
    allowed = ", ".join(str(r) for r in roots)
    exists_outside = any(c.resolve().is_dir() for c in candidates)
    if inside and not exists_outside:
        raise SimimgError(
            f"there is no folder {text!r} under the allowed data roots ({allowed}): check the name, "
            "or pick one of the collections listed below the box"
        )
    raise SimimgError(
        f"{text!r} is outside the allowed data roots ({allowed}): the app reads only folders under "
        f"them; move your class folders there, or add a root to ${ROOTS_ENV} before starting the app"
    )


def list_collections(roots: list[Path]) -> list[Path]:
    """Every non-hidden folder directly under a root, links that leave the roots excepted: what a user can pick."""
    found = []
    for root in roots:
        if root.is_dir():
            found += sorted(
                p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _under(p.resolve(), roots)
            )
    return found


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)
