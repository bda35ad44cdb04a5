"""`simimg serve`: the HTTP API for programs, FastAPI on uvicorn, a thin shell over `simimg.open_index`.

Each index under HOME is opened once per server process, on first use (so an index built after the start is
served too), and stays warm: `SearchService` follows new index versions and models by itself. Uploads are read
within limits and decoded in the request's worker thread; the forward passes run on one model thread, where
`batching.MicroBatcher` gathers concurrent requests into batches. A full queue answers 503 at once, a request
not answered within `timeout_s` gets 504, and without `$SIMIMG_API_TOKEN` the server binds to loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from simimg import QueryResult, SearchService, list_indexes, open_index, resolve_home
from simimg.errors import SimimgError, checked_options
from simimg.http.batching import Embedded, MicroBatcher, QueueFull, Work, answer
from simimg.http.config import TOKEN_ENV, ServeConfig, is_loopback
from simimg.http.inputs import ApiError, decode_inputs, read_inputs
from simimg.http.schema import (
    IMAGE_ERRORS,
    EmbeddingAnswer,
    Health,
    IndexEntry,
    IndexInfo,
    QueryAnswer,
    Readiness,
    answers,
    images_body,
)

log = logging.getLogger(__name__)

WORKER_START_S = 120
CONFIG_ENV = "SIMIMG_SERVE_CONFIG"  # how `--workers N` hands the config to each worker process
MAX_K = 1000
OPEN_PATHS = frozenset({"/healthz"})


def serve(
    home: str | Path | None = None,
    host: str = ServeConfig.host,
    port: int = ServeConfig.port,
    workers: int = ServeConfig.workers,
    token: str | None = None,
    **options: Any,
) -> None:
    """Serve HOME's indexes over HTTP until interrupted (`simimg serve`); see the README's "The HTTP API".

    `token` (default `$SIMIMG_API_TOKEN`) makes every request but /healthz need `Authorization: Bearer <token>`;
    without one only a loopback `host` is allowed. `options` are `ServeConfig` fields (device, max_batch,
    max_wait_ms, max_queue, timeout_s, max_mb, max_pixels, max_files, threads, access_log).
    """
    config = checked_options(
        ServeConfig, home=str(resolve_home(home)), host=host, port=port, workers=workers, **options
    )
    run_server(config, token or os.environ.get(TOKEN_ENV) or None)


def check_exposure(host: str, token: str | None) -> None:
    """Without a token only this machine may connect: a non-loopback address is refused with what to do."""
    if token or is_loopback(host):
        return
    raise SimimgError(
        f"--host {host} would let other machines query your indexes without a password: set "
        f"{TOKEN_ENV} to a secret (clients then send `Authorization: Bearer <it>`), or bind 127.0.0.1"
    )


def run_server(config: ServeConfig, token: str | None) -> None:
    """Serve until interrupted (uvicorn handles Ctrl-C and SIGTERM)."""
    check_exposure(config.host, token)
    import uvicorn

    use_threads(config)

    options: dict[str, Any] = {"host": config.host, "port": config.port, "access_log": config.access_log}
    if config.workers == 1:
        uvicorn.run(create_app(config, token), **options)
        return
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))  # each worker process rebuilds the app from these
    if token:
        os.environ[TOKEN_ENV] = token
    # a worker answers the supervisor's ping only once torch is imported: uvicorn's 5 s default killed and restarted
    # workers forever at load average 5 on 2 cores
    uvicorn.run(
        "simimg.http.server:app_from_env",
        factory=True,
        workers=config.workers,
        timeout_worker_healthcheck=WORKER_START_S,
        **options,
    )


def app_from_env() -> FastAPI:
    """The app of one `--workers N` worker process: its config from the parent, its token from the environment."""
    config = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    use_threads(config)
    return create_app(config, os.environ.get(TOKEN_ENV) or None)


def use_threads(config: ServeConfig) -> None:
    """The server process's torch threads, which OpenVINO's follow (process-wide: only a server's entry point
    calls this)."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)


def wait_until_ready(
    url: str, token: str | None = None, timeout_s: float = 120, process: subprocess.Popen | None = None
) -> None:
    """Poll `GET /readyz` until it answers 200: for scripts that start `simimg serve` and then use it.

    Raises SimimgError when `process` (the server, if the caller started it) exits first or time runs out."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SimimgError(f"the server for {url} exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SimimgError(f"the server at {url} was not ready within {timeout_s:g} s")


class Indexes:
    """One warm SearchService per index name, opened on first use and kept for the life of the process."""

    def __init__(self, home: str | Path, device: str, precision: str = "auto") -> None:
        self.home, self.device, self.precision = Path(home), device, precision
        self._services: dict[str, SearchService] = {}
        self._opening = threading.Lock()  # one index opens at a time; warm ones answer meanwhile

    def names(self) -> list[str]:
        return list_indexes(self.home)

    def loaded(self) -> list[str]:
        return sorted(self._services)

    def get(self, name: str) -> SearchService:
        service = self._services.get(name)
        if service is None:
            with self._opening:
                service = self._services.get(name) or self._open(name)
        return service

    def _open(self, name: str) -> SearchService:
        if name not in list_indexes(self.home):
            raise ApiError(404, f"no index named {name!r} under {self.home}: GET /v1/indexes lists them")
        try:
            service = open_index(name, self.home, self.device, self.precision)
        except SimimgError as err:
            raise ApiError(503, str(err)) from None
        self._services[name] = service
        return service

    def close(self) -> None:
        for service in self._services.values():
            service.close()


class State:
    """What the routes share: config, warm indexes, the batcher, readiness and the count of requests in flight."""

    def __init__(self, config: ServeConfig, run_batch: Callable[[list[Work]], Sequence]) -> None:
        self.config = config
        self.indexes = Indexes(config.home, config.device, config.precision)
        self.batcher = MicroBatcher(run_batch, config.max_batch, config.max_wait_ms / 1000, config.max_queue)
        self.ready = threading.Event()
        self.in_flight = 0

    def warm_up(self) -> None:
        """Open every index there is and run one forward pass each, so the first queries pay no loading."""
        for name in self.indexes.names():
            try:
                service = self.indexes.get(name)
                size = service.model.bundle.preprocess.crop_size
                service.embed([Image.new("RGB", (size, size))])
            except (ApiError, SimimgError) as err:
                log.warning("index %s is not served: %s", name, err)
        self.ready.set()

    @contextlib.contextmanager
    def admit(self):
        """Count a request in flight; beyond the queue's size, refuse it before reading its body."""
        if self.in_flight >= self.config.max_queue:
            raise ApiError(
                503,
                f"{self.in_flight} requests are in flight (the limit is {self.config.max_queue}); try again shortly",
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        self.batcher.close(timeout=self.config.timeout_s)
        self.indexes.close()


def create_app(
    config: ServeConfig, token: str | None = None, run_batch: Callable[[list[Work]], Sequence] = answer
) -> FastAPI:
    """The ASGI app; `run_batch` is what the model thread runs on each batch (`batching.answer`)."""
    state = State(config, run_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.warm_up, name="simimg-warm-up", daemon=True).start()
        yield
        await run_in_threadpool(state.close)

    app = FastAPI(
        title="simimg",
        version=_version(),
        lifespan=lifespan,
        description="Similar-image search and classification over the indexes under "
        f"{config.home}. With {TOKEN_ENV} set, send `Authorization: Bearer <token>`.",
    )
    _error_handlers(app)
    _routes(app, state)
    if token:
        app.add_middleware(BearerAuth, token=token)
    return app


def _version() -> str:
    from simimg import __version__

    return __version__


class BearerAuth:
    """Every request but /healthz must carry `Authorization: Bearer <token>`; 401 with a JSON error otherwise."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = "a wrong token" if given else "no token"
        response = JSONResponse(
            {"error": f"this server needs `Authorization: Bearer <{TOKEN_ENV}>`; the request had {message}"},
            401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def _error_handlers(app: FastAPI) -> None:
    """Every error a client can get is JSON: {"error": ..., "file": ...}."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.to_dict(), err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(err).__name__}): see the server's log"}, 500)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": problems}, 422)


def _routes(app: FastAPI, state: State) -> None:
    @app.get(
        "/healthz",
        summary="the process is up (no token needed)",
        response_model=None,
        responses={200: {"model": Health}},
    )
    async def healthz() -> dict:
        return {"ok": True}

    @app.get(
        "/readyz",
        summary="the indexes present at start are warm and the model thread runs",
        response_model=None,
        responses={**answers(Readiness), 503: {"model": Readiness, "description": "not ready yet"}},
    )
    async def readyz() -> JSONResponse:
        b = state.batcher
        ready = state.ready.is_set() and b.alive
        return JSONResponse(
            {
                "ready": ready,
                "loaded": state.indexes.loaded(),
                "queued": b.queued,
                "in_flight": state.in_flight,
                "batches": b.batches,
                "images": b.items,
            },
            200 if ready else 503,
        )

    @app.get(
        "/v1/indexes",
        summary="every index under HOME, newest first",
        response_model=None,
        responses=answers(list[IndexEntry]),
    )
    async def indexes() -> list[dict]:
        loaded = set(state.indexes.loaded())
        return [{"name": name, "loaded": name in loaded} for name in await run_in_threadpool(state.indexes.names)]

    @app.get(
        "/v1/indexes/{name}",
        summary="what an index holds: counts per label, model, classifier, data root",
        response_model=None,
        responses=answers(IndexInfo, 404, 422, 503),
    )
    async def info(name: str) -> dict:
        return await run_in_threadpool(_info, state.indexes, name)

    @app.post(
        "/v1/indexes/{name}/query",
        openapi_extra=images_body(state.config.limits.max_files),
        summary="nearest gallery images (and the predicted class) of each image: `simimg query --json`",
        responses=answers(list[QueryAnswer], *IMAGE_ERRORS),
    )
    async def query(
        request: Request,
        name: str,
        k: int = Query(10, ge=1, le=MAX_K),
        label: str | None = None,
        min_score: float | None = Query(None, ge=-1.0, le=1.0),
    ) -> JSONResponse:
        found = await _answer(state, request, name, k=k, label=label, min_score=min_score)
        return JSONResponse([result.to_dict() for result in found])

    @app.post(
        "/v1/indexes/{name}/embed",
        openapi_extra=images_body(state.config.limits.max_files),
        summary="the unit-length embedding of each image, with the model that made it",
        responses=answers(list[EmbeddingAnswer], *IMAGE_ERRORS),
    )
    async def embed(request: Request, name: str) -> JSONResponse:
        found = await _answer(state, request, name, embed=True)
        return JSONResponse([result.to_dict() for result in found])


def _info(indexes: Indexes, name: str) -> dict:
    service = indexes.get(name)
    service.refresh(wait=False)
    return service.info()


async def _answer(state: State, request: Request, name: str, **options: Any) -> list[QueryResult | Embedded]:
    """Admit, read and decode the request's images, queue them for the model thread, and wait for the answers.

    `options` are the `Work` fields of every image of the request (k, label, min_score, or embed)."""
    started = time.monotonic()
    with state.admit():
        service = await run_in_threadpool(state.indexes.get, name)
        inputs = await read_inputs(request, state.config.limits)
        images = await run_in_threadpool(decode_inputs, inputs, service, state.config.limits)
        try:
            futures = state.batcher.submit(
                [Work(service, image, item.name, **options) for image, item in zip(images, inputs)]
            )
        except QueueFull as err:
            raise ApiError(503, str(err)) from None
        left = state.config.timeout_s - (time.monotonic() - started)
        try:
            return await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), max(left, 0.001))
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                f"no answer within {state.config.timeout_s:g} s: the server is overloaded; try "
                "again later (or start it with a larger --timeout)",
            ) from None
        except SimimgError as err:
            raise ApiError(500, str(err)) from None
