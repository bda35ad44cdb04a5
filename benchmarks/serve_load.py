"""HTTP load on `simimg serve`: micro-batched serving against one-at-a-time serving, in the same run.

    python benchmarks/serve_load.py --data DIR --requests 400 --concurrency 16 --json
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --name pets --requests 400 --concurrency 16 --json

With --data (or neither --data nor --url: generated 500x375 JPEGs) it indexes the folder into a temporary home
(`--weights none`), starts two servers on free loopback ports, `--max-batch 16` and `--max-batch 1`, and loads
them in turn, `--repeats` times (rates are medians; latencies pool every batched request). With --url it loads
that server; the one-at-a-time figure then needs --unbatched-url, a second server started with `--max-batch 1`.
Every request uploads one real gallery image (read from the index's data root, or from --images DIR) to
`/v1/indexes/NAME/query`; `$SIMIMG_API_TOKEN` is sent when set. Loopback servers only; it stops after --requests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import torch

from _common import finish, hardware, make_jpegs, median, parser, percentile, status_mib
from simimg.dataset.scan import is_image_name
from simimg.http.server import TOKEN_ENV, is_loopback, wait_until_ready

NAME = "bench"
SENT_IMAGES = 64
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class Load:
    """One load run against one server."""

    latencies_ms: list[float]
    errors: int
    seconds: float
    batches: int | None
    images: int | None

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds


def main() -> None:
    args = _arguments()
    headers = _auth_headers()
    with ExitStack() as stack:
        pids: dict[str, int] = {}
        if args.url:
            urls = {"batched": _loopback(args.url), "unbatched": args.unbatched_url and _loopback(args.unbatched_url)}
        else:
            servers = _start_servers(stack, args)
            urls = {kind: url for kind, (url, _) in servers.items()}
            pids = {kind: proc.pid for kind, (_, proc) in servers.items()}
        payloads = _payloads(urls["batched"], args, headers)
        runs: dict[str, list[Load]] = {kind: [] for kind, url in urls.items() if url}
        for url in filter(None, urls.values()):
            asyncio.run(_load(url, args.name, payloads, 2 * args.concurrency, args.concurrency, headers, args))
        for _ in range(args.repeats):
            for kind in runs:  # interleaved, so both see the same load from other processes
                runs[kind].append(
                    asyncio.run(_load(urls[kind], args.name, payloads, args.requests, args.concurrency, headers, args))
                )
        peaks = {kind: status_mib("VmHWM", pid) for kind, pid in pids.items()}  # servers this run started
    _report(runs, peaks, args)


def _arguments():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (loopback only); default: start two on free local ports")
    p.add_argument("--unbatched-url", help="with --url: a second server started with --max-batch 1")
    p.add_argument("--name", default=NAME, help="the index to query (default: the one this script builds)")
    p.add_argument("--data", help="folder of class folders to index and send (default: generated JPEGs)")
    p.add_argument("--gallery", type=int, default=64, help="generated JPEGs when there is no --data (default 64)")
    p.add_argument("--images", help="folder of images to send (default: the index's data root)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch (default 16)")
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as an error")
    p.add_argument("--threads", type=int, help="the started servers' --threads (default: torch's)")
    p.set_defaults(repeats=2)
    return p.parse_args()


def _loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    if not is_loopback(host):
        sys.exit(f"serve_load: {url} is not on this machine; this load test runs against loopback servers only")
    return url.rstrip("/")


def _start_servers(stack: ExitStack, args) -> dict[str, tuple[str, subprocess.Popen]]:
    """Index --data (or generated JPEGs) into a temporary home; start a batched and a one-at-a-time server on it:
    each one's URL and process."""
    import simimg

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    data = Path(args.data) if args.data else make_jpegs(tmp / "photos", args.gallery)
    simimg.build_index(
        data, args.name, tmp / "home", arch=args.arch, weights="none", image_size=args.image_size, device=args.device
    )
    servers = {
        kind: _serve(stack, tmp / "home", args, batch)
        for kind, batch in (("batched", args.max_batch), ("unbatched", 1))
    }
    for url, proc in servers.values():
        wait_until_ready(url, os.environ.get(TOKEN_ENV), START_TIMEOUT_S, proc)
    return servers


def _serve(stack: ExitStack, home: Path, args, max_batch: int) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simimg.cli",
            "serve",
            "--home",
            str(home),
            "--port",
            str(port),
            "--device",
            args.device,
            "--max-batch",
            str(max_batch),
            "--max-queue",
            str(max(64, 2 * args.concurrency)),
            "--timeout",
            str(args.timeout),
            *(["--threads", str(args.threads)] if args.threads else []),
        ],
        env={**os.environ, "SIMIMG_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
    )
    stack.enter_context(proc)  # on the way out: SIGTERM (uvicorn shuts down), then wait for it
    stack.callback(proc.terminate)
    return f"http://127.0.0.1:{port}", proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _auth_headers() -> dict:
    return {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"} if os.environ.get(TOKEN_ENV) else {}


def _payloads(url: str, args, headers: dict) -> list[tuple[str, bytes]]:
    """Up to 64 real images: from --images, else from the index's data root as the server reports it."""
    if args.images:
        root = Path(args.images)
    else:
        info = httpx.get(f"{url}/v1/indexes/{args.name}", headers=headers, timeout=30)
        if info.status_code != 200:
            sys.exit(f"serve_load: {url} has no index {args.name!r}: {info.text}")
        root = Path(info.json()["data_root"])
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p.name))[:SENT_IMAGES]
    if not files:
        sys.exit(f"serve_load: no images under {root}")
    return [(p.name, p.read_bytes()) for p in files]


async def _load(
    url: str, name: str, payloads: list[tuple[str, bytes]], requests: int, concurrency: int, headers: dict, args
) -> Load:
    """`requests` uploads from `concurrency` clients at once; latency and status of each."""
    latencies, errors, next_request = [], 0, iter(range(requests))
    before = _stats(url, headers)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in next_request:
            file = payloads[i % len(payloads)]
            start = time.perf_counter()
            try:
                response = await http.post(
                    f"{url}/v1/indexes/{name}/query", params={"k": 10}, files={"file": file}, headers=headers
                )
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                latencies.append((time.perf_counter() - start) * 1e3)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    after = _stats(url, headers)
    batches = images = None
    if before and after:
        batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    return Load(latencies, errors, seconds, batches, images)


def _stats(url: str, headers: dict) -> dict | None:
    try:
        return httpx.get(f"{url}/readyz", headers=headers, timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None


def _report(runs: dict[str, list[Load]], peaks: dict[str, float], args) -> None:
    rows = []
    for kind, loads in runs.items():
        latencies = [ms for load in loads for ms in load.latencies_ms] or [float("nan")]
        batches = sum(load.batches or 0 for load in loads)
        rows.append(
            {
                "server": f"{kind} (max batch {args.max_batch if kind == 'batched' else 1})",
                "rps": median([load.rps for load in loads]),
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "errors": sum(load.errors for load in loads),
                "mean_batch": sum(load.images or 0 for load in loads) / batches if batches else None,
            }
        )
    batched, unbatched = rows[0], rows[1] if len(rows) > 1 else None
    summary = {
        "benchmark": "serve_load",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "errors": batched["errors"],
        "p50_ms": batched["p50_ms"],
        "p99_ms": batched["p99_ms"],
        "rps": batched["rps"],
        "mean_batch": batched["mean_batch"],
        "rps_unbatched": unbatched and unbatched["rps"],
        "errors_unbatched": unbatched and unbatched["errors"],
        "p99_ms_unbatched": unbatched and unbatched["p99_ms"],
        "ratio": unbatched and batched["rps"] / unbatched["rps"],
        "server_peak_rss_mib": peaks.get("batched"),
        "server_peak_rss_mib_unbatched": peaks.get("unbatched"),
        "image_size": args.image_size,
        "arch": args.arch,
        "server_threads": args.threads,
        "hardware": hardware(torch.device("cpu")),
    }
    finish(
        f"simimg serve under load: {args.requests} requests x {args.repeats}, {args.concurrency} at once",
        rows,
        summary,
        args.json,
    )


if __name__ == "__main__":
    main()
