"""The one exception type for problems a user can cause and fix."""


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
