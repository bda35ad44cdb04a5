"""What an HTTP request hands the server: uploaded files or gallery paths, read within limits, then decoded.

A request body is read through a byte counter, so an oversized upload is refused as soon as it passes the cap
(or at once, when its Content-Length says so) instead of being spooled whole. Uploads are checked exactly as the
app checks them (`uploads.validate_upload`: size, pixels, decompression bombs, then a real decode); gallery paths
must resolve, links and `..` included, inside the index's data root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive

from simimg import SearchService, validate_upload
from simimg.errors import BadImageError, ImageTooLargeError, NotAnImageError
from simimg.http.config import Limits

FILE_FIELD = "file"
JSON_LIMIT = 1 << 20  # a list of paths; a megabyte is thousands of them
HOW_TO_SEND = (
    f"send images as multipart/form-data in the field `{FILE_FIELD}` (repeat it for several), "
    "or a JSON list of gallery paths"
)


class ApiError(Exception):
    """A refusal with its HTTP status; `file` names the upload or path it is about."""

    def __init__(self, status: int, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.file = status, message, file

    def to_dict(self) -> dict:
        return {"error": self.message} if self.file is None else {"error": self.message, "file": self.file}


@dataclass(frozen=True)
class Input:
    """One image a request names: an upload's bytes, or a path into the gallery."""

    name: str
    data: bytes | None = None


async def read_inputs(request: Request, limits: Limits) -> list[Input]:
    """The request's images, undecoded: multipart uploads in `file`, or a JSON list of gallery paths."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        inputs = await _uploads(_limited(request, limits.body_bytes), limits)
    elif kind == "application/json":
        inputs = await _paths(_limited(request, JSON_LIMIT))
    else:
        raise ApiError(415, f"unsupported content type {kind or '(none)'!r}: {HOW_TO_SEND}")
    if not inputs:
        raise ApiError(400, f"no images in the request: {HOW_TO_SEND}")
    if len(inputs) > limits.max_files:
        raise ApiError(413, f"{len(inputs)} images in one request; the limit is {limits.max_files}")
    return inputs


def decode_inputs(inputs: list[Input], service: SearchService, limits: Limits) -> list[Image.Image]:
    """Decode every input as `simimg index` decoded the gallery, or raise ApiError naming the first bad one."""
    images = []
    for item in inputs:
        try:
            if item.data is None:
                images.append(service.load(gallery_file(service.data_root, item.name)))
            else:
                images.append(
                    validate_upload(
                        item.name, item.data, limits.max_mb, limits.max_pixels, draft_size=service.draft_size
                    )
                )
        except BadImageError as err:
            raise ApiError(image_status(err), err.reason, item.name) from None
    return images


def image_status(err: BadImageError) -> int:
    """413 for an image over a cap, 415 for a file that is no image at all, 400 for a damaged one."""
    return 413 if isinstance(err, ImageTooLargeError) else 415 if isinstance(err, NotAnImageError) else 400


def gallery_file(data_root: Path, text: str) -> Path:
    """The file a gallery path names (relative to the data root, or absolute), if it really lies inside the root."""
    if "\0" in text:
        raise ApiError(400, "a gallery path cannot hold a NUL byte", text)
    root = data_root.resolve()
    real = (root / text).resolve()
    if not real.is_relative_to(root):
        raise ApiError(403, f"outside the index's data root {root}: only gallery images can be named by path", text)
    if not real.is_file():
        raise ApiError(404, "no such image under the index's data root", text)
    return real


def _limited(request: Request, limit: int) -> Request:
    """The same request, read through a counter that refuses a body over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared) / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB")
    return Request(request.scope, _counting(request.receive, limit))


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise ApiError(413, f"the request body is over the {limit / 2**20:.1f} MB limit")
        return message

    return counted


async def _uploads(request: Request, limits: Limits) -> list[Input]:
    async with request.form(max_files=limits.max_files, max_fields=limits.max_files) as form:
        found = form.getlist(FILE_FIELD)
        files = [item for item in found if isinstance(item, UploadFile)]
        if len(files) < len(found):
            raise ApiError(400, f"the field `{FILE_FIELD}` must hold files, not text: {HOW_TO_SEND}")
        return [Input(item.filename or f"upload {i}", await item.read()) for i, item in enumerate(files)]


async def _paths(request: Request) -> list[Input]:
    try:
        paths = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err}): {HOW_TO_SEND}") from None
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ApiError(400, f"the JSON body must be a list of gallery paths (strings): {HOW_TO_SEND}")
    return [Input(p) for p in paths]
