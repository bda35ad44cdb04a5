"""The one exception type for problems a user can cause and fix."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class SimimgError(Exception):
    """A user-facing error; its message says what went wrong and what to do."""


class BadImageError(SimimgError):
    """A file that cannot be turned into an RGB image; `reason` is short and human."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ImageTooLargeError(BadImageError):
    """Over a size or pixel cap (a decompression bomb included): a smaller copy of the image would do."""


class NotAnImageError(BadImageError):
    """Data no image decoder recognises (text, random bytes): the wrong kind of file, not a damaged image."""


def checked_options(cls: type[T], **values: Any) -> T:
    """A config dataclass from keyword options; an unknown option is a user error that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SimimgError(f"unknown option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return cls(**values)
