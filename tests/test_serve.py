"""server.py and http_inputs.py: the HTTP API on a free local port, driven by a real HTTP client (httpx).

Most tests run the app `simimg serve` runs in a uvicorn.Server thread of this process (the queue and timeout tests
hold its model thread, so a full queue and a late answer happen on cue); the token server is the real command in a
subprocess with two worker processes, which the README's curl example also runs against (e2e).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

import simimg
from conftest import ROOT, copy_built, free_tcp_port, make_class_images, run_main
from simimg.cli import build_parser
from simimg.errors import SimimgError
from simimg.http.batching import answer
from simimg.http.server import ServeConfig, check_exposure, create_app, wait_until_ready

CLASSES = {"circles": 6, "squares": 6, "triangles": 6}  # conftest.SHAPES
TOKEN = "s3cret-token"


def start_cli_server(
    home: Path, *flags: str, token: str | None = None, prefix: Sequence[str] = ()
) -> tuple[str, subprocess.Popen]:
    """The real `simimg serve` in a subprocess on a free port, its output in a file (a pipe nobody reads fills);
    `prefix` runs it under another command (a read-only mount: tests/test_faults.py)."""
    port, log = free_tcp_port(), tempfile.TemporaryFile("w+")  # noqa: SIM115 - the server writes it after we return
    env = {k: v for k, v in os.environ.items() if k != "SIMIMG_API_TOKEN"}
    env.update({"SIMIMG_OFFLINE": "1", **({"SIMIMG_API_TOKEN": token} if token else {})})
    proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "simimg.cli",
            "serve",
            "--home",
            str(home),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--threads",
            "1",
            *flags,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, token, 180, proc)
    except SimimgError as err:
        stop(proc)
        log.seek(0)
        raise AssertionError(f"{err}:\n{log.read()[-3000:]}") from None
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@contextmanager
def thread_server(config: ServeConfig, token: str | None = None, run_batch=answer) -> Iterator[str]:
    """The app `simimg serve` runs, in a uvicorn.Server thread of this process on `config.port`; yields its URL."""
    app = create_app(config, token, run_batch=run_batch)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    try:
        wait_until_ready(url, token)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def built(shapes_index, tmp_path_factory) -> tuple[Path, Path]:
    """(data root, home): a copy of the session's index 'shapes' (three classes, 32 px, random-init weights); the
    tests add files and indexes to it."""
    copy = copy_built(shapes_index, tmp_path_factory.mktemp("serve") / "base")
    return copy.data, copy.home


@pytest.fixture(scope="module")
def server(built, free_port):
    """The server with a 1 MB upload cap and 4 files per request (`simimg serve --max-mb 1 --max-files 4`)."""
    config = ServeConfig(home=str(built[1]), port=free_port(), device="cpu", max_mb=1, max_files=4)
    with thread_server(config) as url:
        yield url


@pytest.fixture(scope="module")
def local(built):
    """The same index opened in this process, through the API the CLI calls (`simimg query/info --json`)."""
    return simimg.open_index("shapes", built[1], "cpu")


def query(url: str, name: str = "shapes", files: list | None = None, paths: list | None = None, **params):
    upload = None if files is None else [("file", (n, data)) for n, data in files]
    return httpx.post(f"{url}/v1/indexes/{name}/query", params=params, files=upload, json=paths, timeout=60)


def test_health_readiness_and_docs(server):
    assert httpx.get(f"{server}/healthz").json() == {"ok": True}
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["ready"] is True and ready["loaded"] == ["shapes"]
    assert httpx.get(f"{server}/docs").status_code == 200
    paths = httpx.get(f"{server}/openapi.json").json()["paths"]
    assert {"/v1/indexes", "/v1/indexes/{name}", "/v1/indexes/{name}/query", "/v1/indexes/{name}/embed"} <= set(paths)
    assert set(paths["/v1/indexes/{name}/query"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
    }


def test_indexes_and_info(built, server, local):
    assert {"name": "shapes", "loaded": True} in httpx.get(f"{server}/v1/indexes").json()
    info = httpx.get(f"{server}/v1/indexes/shapes").json()
    assert info == local.info()
    assert info["labels"] == CLASSES and info["data_root"] == str(built[0].resolve())


def test_a_gallery_path_query_answers_as_the_cli_does(built, server, local):
    found = query(server, paths=["squares/squares_002.png"], k=4, min_score=0.5).json()
    expected = local.search([str(built[0] / "squares" / "squares_002.png")], k=4, min_score=0.5)
    assert [r["query"] for r in found] == ["squares/squares_002.png"]
    assert [{**r, "query": None} for r in found] == [{**r.to_dict(), "query": None} for r in expected]
    assert found[0]["neighbors"][0] == {"path": "squares/squares_002.png", "label": "squares", "score": 1.0}


def test_uploads_are_answered_in_order_with_each_one_named(built, server):
    data = built[0]
    names = ["circles/circles_001.png", "triangles/triangles_003.png", "squares/squares_004.png"]
    found = query(server, files=[(Path(n).name, (data / n).read_bytes()) for n in names], k=2)
    assert found.status_code == 200
    assert [r["query"] for r in found.json()] == [Path(n).name for n in names]
    assert [r["neighbors"][0]["path"] for r in found.json()] == names
    assert all(r["prediction"] is None and len(r["neighbors"]) == 2 for r in found.json())


def test_label_filter_and_large_k(server):
    only = query(server, paths=["circles/circles_000.png"], k=50, label="squares").json()[0]["neighbors"]
    assert [n["label"] for n in only] == ["squares"] * CLASSES["squares"]
    everything = query(server, paths=["circles/circles_000.png"], k=1000).json()[0]["neighbors"]
    assert len(everything) == sum(CLASSES.values())
    assert query(server, paths=["circles/circles_000.png"], label="no-such-label").json()[0]["neighbors"] == []


def test_embed_gives_unit_vectors_of_the_serving_model(built, server, local):
    path = built[0] / "triangles" / "triangles_000.png"
    got = httpx.post(f"{server}/v1/indexes/shapes/embed", files=[("file", ("t.png", path.read_bytes()))]).json()
    info = httpx.get(f"{server}/v1/indexes/shapes").json()
    assert [(e["query"], e["model"], e["embedding"]) for e in got] == [("t.png", info["model"], info["embedding"])]
    vector = np.array(got[0]["vector"], dtype=np.float32)
    assert vector.shape == (info["dim"],) and abs(np.linalg.norm(vector) - 1) < 1e-4
    np.testing.assert_allclose(vector, local.embed([local.load(path)])[0], atol=1e-5)


def bomb() -> bytes:
    """A 64-megapixel 1-bit PNG of a few kB: over the 40-megapixel cap."""
    return png(Image.new("1", (8000, 8000)))


@pytest.mark.parametrize(
    "case, status, error",
    [
        ("text", 415, "not an image: the file holds text"),
        ("truncated", 400, "truncated or corrupt"),
        ("empty", 400, "empty file"),
        ("bomb", 413, "decompression bomb"),
        ("too big", 413, "the limit is 1 MB"),
    ],
)
def test_a_bad_upload_gets_a_json_error_naming_it(built, server, case, status, error):
    good = (built[0] / "circles" / "circles_000.png").read_bytes()
    data = {
        "text": b"just some words, not pixels\n" * 20,
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "bomb": bomb(),
        "too big": os.urandom(2 * 2**20),
    }[case]
    response = query(server, files=[("good.png", good), (f"{case}.png", data)])
    assert response.status_code == status
    body = response.json()
    assert body["file"] == f"{case}.png" and error in body["error"]


@pytest.mark.parametrize(
    "path, status",
    [
        ("../../../etc/passwd", 403),
        ("/etc/hostname", 403),
        ("circles/../../shapes-outside.png", 403),
        ("circles/missing.png", 404),
        ("escape", 403),
    ],
)
def test_gallery_paths_must_stay_inside_the_data_root(built, server, path, status):
    data = built[0]
    (data.parent / "shapes-outside.png").write_bytes((data / "circles" / "circles_000.png").read_bytes())
    link = data / "escape"
    if not link.exists():
        link.symlink_to(data.parent / "shapes-outside.png")
    response = query(server, paths=["circles/circles_000.png", path])
    assert response.status_code == status and response.json()["file"] == path


@pytest.mark.parametrize(
    "request_kwargs, status, error",
    [
        ({"files": [("image", ("a.png", b"x"))]}, 400, "no images in the request"),
        ({"data": {"file": "not a file"}, "files": [("other", ("a.png", b"x"))]}, 400, "must hold files"),
        ({"json": {"paths": ["a.png"]}}, 400, "must be a list of gallery paths"),
        ({"content": b"[not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": []}, 400, "no images in the request"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
        ({"files": [("file", (f"{i}.png", b"x")) for i in range(5)]}, 400, "Too many files"),
        ({"json": ["circles/circles_000.png"] * 5}, 413, "5 images in one request; the limit is 4"),
    ],
)
def test_malformed_requests_are_told_what_to_send(server, request_kwargs, status, error):
    response = httpx.post(f"{server}/v1/indexes/shapes/query", **request_kwargs)
    assert response.status_code == status and error in response.json()["error"]


def test_unknown_index_and_bad_parameters(server):
    assert query(server, "nope", paths=["a.png"]).status_code == 404
    assert "no index named 'nope'" in httpx.get(f"{server}/v1/indexes/nope").json()["error"]
    assert httpx.get(f"{server}/v1/indexes/..%2Fetc").status_code == 404
    bad_k = query(server, paths=["circles/circles_000.png"], k=0)
    assert bad_k.status_code == 422 and bad_k.json()["error"].startswith("k: ")
    assert query(server, paths=["circles/circles_000.png"], min_score=2).status_code == 422


def test_a_body_over_the_cap_is_refused_before_it_is_read(server):
    """A client announcing 1 GB gets 413 at once, without sending it."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/indexes/shapes/query HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 1000000000\r\n\r\n"
        )
        reply = b""
        while not reply.endswith(b"}") and (chunk := s.recv(65536)):  # headers, then the JSON error
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"the limit is 5.0 MB" in reply


# --- the token ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_server(built):
    """Two worker processes behind a token (so `--workers` is exercised too)."""
    url, proc = start_cli_server(built[1], "--workers", "2", token=TOKEN)
    try:
        yield url
    finally:
        stop(proc)


@pytest.mark.e2e
def test_with_a_token_every_request_but_healthz_needs_it(token_server):
    assert httpx.get(f"{token_server}/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path in (
            ("GET", "/v1/indexes"),
            ("GET", "/docs"),
            ("GET", "/readyz"),
            ("POST", "/v1/indexes/shapes/query"),
        ):
            response = httpx.request(method, token_server + path, headers=headers, json=["circles/circles_000.png"])
            assert response.status_code == 401, (headers, path)
            assert "Authorization: Bearer" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
    good = {"Authorization": f"Bearer {TOKEN}"}
    found = httpx.post(f"{token_server}/v1/indexes/shapes/query", headers=good, json=["circles/circles_000.png"])
    assert found.status_code == 200 and found.json()[0]["neighbors"][0]["score"] == 1.0


def schemathesis(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The schemathesis CLI with this project's waivers (tests/schemathesis.toml), every check on; run in `cwd`,
    where it keeps its replay files."""
    config = str(ROOT / "tests" / "schemathesis.toml")
    command = [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", config, "run", *args]
    return subprocess.run([*command, "--checks", "all"], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.e2e
def test_generated_requests_get_answers_the_schema_documents_with_and_without_the_token(token_server, tmp_path):
    """schemathesis against `simimg serve --workers 2` with a token: no server error but the 503 and 504 the design
    gives, every answer as /openapi.json describes it, valid requests accepted and invalid ones refused; then the
    same schema without the token, where every route but /healthz answers 401."""
    good = {"Authorization": f"Bearer {TOKEN}"}
    with_token = schemathesis(
        tmp_path, f"{token_server}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}", "-n", "40"
    )
    assert with_token.returncode == 0, with_token.stdout[-6000:]
    assert "No issues found" in with_token.stdout
    schema = httpx.get(f"{token_server}/openapi.json", headers=good).json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    assert len(routes) == 6
    for method, path in routes:
        if path != "/healthz":
            assert "401" in schema["paths"][path][method.lower()]["responses"], path
            given = path.replace("{name}", "shapes")
            assert httpx.request(method, token_server + given, json=["circles/circles_000.png"]).status_code == 401
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    # unauthenticated, a method a route lacks is 401 too, not 405: the server says nothing before the token
    without = schemathesis(
        tmp_path,
        str(tmp_path / "openapi.json"),
        "--url",
        token_server,
        "-n",
        "10",
        "--exclude-checks",
        "unsupported_method",
    )
    assert without.returncode == 0, without.stdout[-6000:]


def test_without_a_token_only_loopback_may_be_bound(built, monkeypatch):
    monkeypatch.setenv("SIMIMG_API_TOKEN", "")
    code, out, err = run_main("serve", "--home", str(built[1]), "--host", "0.0.0.0")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()]
    assert "--host 0.0.0.0 would let other machines" in err and "SIMIMG_API_TOKEN" in err


@pytest.mark.parametrize(
    "settings, error",
    [
        (dict(max_files=10, max_queue=4), "could never be queued"),
        (dict(max_batch=0), "must be at least 1"),
        (dict(timeout_s=0), "--timeout"),
    ],
)
def test_bad_settings_are_refused(settings, error):
    with pytest.raises(SimimgError, match=error):
        ServeConfig(home="h", **settings)


@pytest.mark.parametrize(
    "host, token, allowed",
    [
        ("127.0.0.1", None, True),
        ("localhost", None, True),
        ("::1", None, True),
        ("127.0.0.2", None, True),
        ("0.0.0.0", None, False),
        ("192.168.1.5", None, False),
        ("example.com", None, False),
        ("0.0.0.0", TOKEN, True),
    ],
)
def test_only_loopback_is_bound_without_a_token(host, token, allowed):
    if allowed:
        check_exposure(host, token)
    else:
        with pytest.raises(SimimgError, match=f"--host {host} would let other machines"):
            check_exposure(host, token)


# --- a held model thread: full queue, timeout ------------------------------------------------------------
class HeldModel:
    """`batching.answer`, but each batch waits until the test lets it through."""

    def __init__(self) -> None:
        self.go, self.entered = threading.Event(), threading.Event()

    def __call__(self, works):
        self.entered.set()
        self.go.wait(60)
        return answer(works)


@pytest.fixture
def held_server(built, free_port):
    """The app in a uvicorn.Server thread; yields (url, model) and lets the held model go at the end."""
    with contextlib.ExitStack() as stack:
        models: list[HeldModel] = []
        stack.callback(lambda: [model.go.set() for model in models])

        def start(**config) -> tuple[str, HeldModel]:
            model = HeldModel()
            models.append(model)
            serve = ServeConfig(home=str(built[1]), port=free_port(), device="cpu", **config)
            return stack.enter_context(thread_server(serve, run_batch=model)), model

        yield start


def post_in_thread(url: str, paths: list[str]) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(query(url, paths=paths)))
    thread.start()
    return thread, out


def wait_for(url: str, key: str, value: int) -> None:
    deadline = time.time() + 30
    while httpx.get(f"{url}/readyz").json()[key] != value:
        assert time.time() < deadline, f"{key} never reached {value}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "held, error", [([1, 3], "3 images are already waiting for the model"), ([1, 1, 1], "3 requests are in flight")]
)
def test_a_full_queue_answers_503_at_once_and_the_queued_requests_still_finish(held_server, held, error):
    """The model thread holds the first request; the next ones fill the image queue or the requests in flight."""
    url, model = held_server(max_queue=3, max_files=3, max_batch=1)
    waiting = [post_in_thread(url, ["circles/circles_000.png"])]
    assert model.entered.wait(30)
    for n in held[1:]:
        waiting.append(post_in_thread(url, ["squares/squares_000.png"] * n))
        wait_for(url, "in_flight", len(waiting))
        wait_for(url, "queued", sum(held[1 : len(waiting)]))
    start = time.monotonic()
    refused = query(url, paths=["triangles/triangles_000.png"])
    assert refused.status_code == 503 and time.monotonic() - start < 5
    assert error in refused.json()["error"] and refused.headers["retry-after"] == "1"
    model.go.set()
    for thread, out in waiting:
        thread.join(60)
        assert out[0].status_code == 200
    assert [r["neighbors"][0]["path"] for r in waiting[-1][1][0].json()] == ["squares/squares_000.png"] * held[-1]


def test_a_request_not_answered_in_time_gets_504(held_server):
    url, model = held_server(timeout_s=0.5)
    start = time.monotonic()
    late = query(url, paths=["circles/circles_000.png"])
    assert late.status_code == 504 and "no answer within 0.5 s" in late.json()["error"]
    assert time.monotonic() - start < 10
    model.go.set()
    assert query(url, paths=["circles/circles_000.png"]).status_code == 200


# --- live updates ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_new_index_a_reindex_and_a_retrain_are_served_without_a_restart(built, server):
    data_root, home = built
    data = make_class_images(data_root.parent / "live", {"reds": 6, "greens": 6}, size=48, seed=3)
    assert "live" not in [i["name"] for i in httpx.get(f"{server}/v1/indexes").json()]
    simimg.build_index(data, "live", home, weights="none", image_size=32, workers=0)
    assert {"name": "live", "loaded": False} in httpx.get(f"{server}/v1/indexes").json()
    before = query(server, "live", paths=["reds/reds_000.png"], k=1).json()[0]
    assert before["prediction"] is None and before["neighbors"][0]["path"] == "reds/reds_000.png"

    make_class_images(data, {"reds": 0, "greens": 0, "blues": 6}, size=48, seed=4)
    assert query(server, "live", paths=["blues/blues_002.png"], k=1).json()[0]["neighbors"][0]["score"] < 0.9999
    simimg.build_index(data, "live", home, weights="none", image_size=32, workers=0)
    found = query(server, "live", paths=["blues/blues_002.png"], k=1).json()[0]
    assert found["neighbors"][0] == {"path": "blues/blues_002.png", "label": "blues", "score": 1.0}
    assert httpx.get(f"{server}/v1/indexes/live").json()["total"] == 18

    report = simimg.train(data, "live", home, head_only=True)
    trained = query(server, "live", paths=["greens/greens_001.png"], k=1).json()[0]
    assert trained["prediction"]["label"] in {"reds", "greens", "blues"}
    info = httpx.get(f"{server}/v1/indexes/live").json()
    assert info["model"] == report.model and info["classifier"] is True and info["version"] == 3


# --- the README's curl example ---------------------------------------------------------------------------
def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## The HTTP API", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].rstrip(" &") for line in block.splitlines() if line and not line.startswith("#")]


@pytest.mark.e2e
def test_the_readme_curl_example_runs(built, server, token_server, tmp_path):
    """Its `simimg serve` lines parse; its curl lines run against the two servers (8000: no token, 8001: token)."""
    make_class_images(tmp_path / "data" / "pets", {"cats": 4, "dogs": 4}, size=48, ext="jpg")
    for folder, prefix in (("cats", "cat"), ("dogs", "dog")):
        for old in sorted((tmp_path / "data" / "pets" / folder).iterdir()):
            old.rename(old.with_name(f"{prefix}_{old.stem.rsplit('_', 1)[1]}.jpg"))
    simimg.build_index(tmp_path / "data" / "pets", home=built[1], weights="none", image_size=32, workers=0)
    outputs = []
    for line in readme_commands():
        if line.startswith("simimg serve"):
            assert build_parser().parse_args(shlex.split(line)[1:]).command == "serve"
        elif line.startswith("curl"):
            line = line.replace("localhost:8000", server.removeprefix("http://"))
            line = line.replace("localhost:8001", token_server.removeprefix("http://"))
            proc = subprocess.run(
                ["bash", "-c", line],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "SIMIMG_API_TOKEN": TOKEN},
            )
            assert proc.returncode == 0, (line, proc.stderr)
            outputs.append(json.loads(proc.stdout))
    indexes, info, two, labelled, embedded, with_token = outputs
    assert {"name": "pets", "loaded": False} in indexes and info["total"] == 8
    assert [r["neighbors"][0]["path"] for r in two] == ["cats/cat_000.jpg", "dogs/dog_001.jpg"]
    assert {n["label"] for n in labelled[0]["neighbors"]} == {"cats"} and len(labelled[0]["neighbors"]) == 3
    assert embedded[0]["model"] == info["model"] and len(embedded[0]["vector"]) == info["dim"]
    assert with_token[0]["neighbors"][0]["path"] == "dogs/dog_001.jpg"
