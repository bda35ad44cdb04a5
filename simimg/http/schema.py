"""The HTTP API as /openapi.json describes it: every request body, every answer and every status a route can give.

The routes return `JSONResponse`s built from the library's own dataclasses, so these models document and are
checked (schemathesis, `--checks all`, in tests/test_serve.py) rather than used to serialise. A client generated
from the schema, or a person reading /docs, then gets the API right: the multipart field `file` (repeatable), the
JSON list of gallery paths, and `{"error", "file"}` with each 4xx and 5xx the design gives.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from simimg.http.inputs import FILE_FIELD


class ErrorBody(BaseModel):
    """Every refusal: what went wrong, and the upload or gallery path it is about when it is about one."""

    error: str
    file: str | None = Field(None, description="the upload's file name or the gallery path at fault")


class Health(BaseModel):
    ok: bool


class Readiness(BaseModel):
    ready: bool
    loaded: list[str] = Field(description="indexes warm in this process")
    queued: int = Field(description="images waiting for the model thread")
    in_flight: int = Field(description="requests being answered")
    batches: int
    images: int


class IndexEntry(BaseModel):
    name: str
    loaded: bool


class IndexInfo(BaseModel):
    """`simimg info --json`: counts per label ("" for the unlabeled pool), model, classifier, data root."""

    model_config = ConfigDict(extra="allow")
    name: str
    total: int
    labels: dict[str, int]
    model: str
    classifier: bool
    classes: list[str]
    version: int
    data_root: str


class TopLabel(BaseModel):
    label: str
    probability: float


class PredictionBody(BaseModel):
    label: str
    probability: float
    top: list[TopLabel]


class NeighborBody(BaseModel):
    path: str
    label: str | None
    score: float


class QueryAnswer(BaseModel):
    """One image's answer, in request order: its predicted class (null without a classifier) and neighbours."""

    query: str
    prediction: PredictionBody | None
    neighbors: list[NeighborBody]


class EmbeddingAnswer(BaseModel):
    query: str
    model: str = Field(description="the model's fingerprint")
    embedding: str = Field(description="the embedding's fingerprint: vectors of one fingerprint compare")
    vector: list[float] = Field(description="unit length")


ERRORS = {
    400: "a damaged image, a body that is no JSON list of paths, or no image at all",
    401: "no token, or a wrong one (only when the server has $SIMIMG_API_TOKEN)",
    403: "a gallery path outside the index's data root",
    404: "no such index, or no such gallery image",
    413: "too many images, a body or an image over its cap",
    415: "neither multipart nor JSON, or a file that is no image",
    422: "a query parameter out of range",
    503: "the queue is full, or the index cannot be opened now (Retry-After)",
    504: "no answer within the server's --timeout",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these statuses, each with the error body and what it means here."""
    return {code: {"model": ErrorBody, "description": ERRORS[code]} for code in (401, *codes)}


def answers(model: type[BaseModel] | Any, *codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=`: the 200 answer and the errors."""
    return {200: {"model": model, "description": "OK"}, **errors(*codes)}


def images_body(max_files: int) -> dict[str, Any]:
    """`openapi_extra` of the image routes: uploads in the repeatable multipart field, or a JSON list of gallery
    paths; at most `max_files` of either (the server's --max-files)."""
    many = {"minItems": 1, "maxItems": max_files}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FILE_FIELD],
                        "properties": {
                            FILE_FIELD: {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                **many,
                                "description": "one or more images, jpg/png/webp/bmp/gif/tiff (repeat the field)",
                            }
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1, "pattern": "^[^\\x00]+$"},
                        **many,
                        "description": "gallery paths, relative to the index's data root",
                    }
                },
            },
        }
    }


IMAGE_ERRORS = (400, 403, 404, 413, 415, 422, 503, 504)
