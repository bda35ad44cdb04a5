"""A soak of `simimg serve`: mixed load for minutes, the server's memory and the errors it gives.

    python benchmarks/serve_soak.py --minutes 10 --json
    python benchmarks/serve_soak.py --data DIR --minutes 60 --concurrency 8 --json

Indexes --data (or generated JPEGs; `--weights none`) into a temporary home, starts one `simimg serve` on a free
loopback port, and for --minutes keeps --concurrency clients busy with a fixed mix: uploads to query (60%), gallery
paths to embed (25%), uploads of random bytes (10%, answered 415) and requests with too many images (5%, answered
413). Every other answer is an unexpected error, by status. The server's RSS is read from /proc every
--sample-s seconds: at the start, after --warmup-s (allocators and caches settled), and at the end; the figure is
the growth from warm-up to the end. Latency is reported as p99 per minute of the accepted requests. Targets
(issue 22): RSS growth after warm-up <= 10%, 0 unexpected errors.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from _common import finish, hardware, make_jpegs, parser, percentile, status_mib
from serve_load import _auth_headers, _payloads, _serve
from simimg.http.server import TOKEN_ENV, wait_until_ready

NAME = "soak"
MIX = (("query", 0.60), ("embed", 0.25), ("not_an_image", 0.10), ("too_many", 0.05))
EXPECTED = {"query": 200, "embed": 200, "not_an_image": 415, "too_many": 413}
MAX_RSS_GROWTH = 0.10


@dataclass
class Tally:
    """What the clients saw: latencies of accepted requests per minute, and every answer by kind and status."""

    started: float = field(default_factory=time.monotonic)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    answers: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)

    def add(self, kind: str, status: int, ms: float) -> None:
        self.answers[(kind, status)] += 1
        if status != EXPECTED[kind]:
            self.unexpected[f"{kind}: {status}"] += 1
        elif status == 200:
            self.latencies.setdefault(int((time.monotonic() - self.started) // 60), []).append(ms)


def main() -> None:
    args = _arguments()
    headers = _auth_headers()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        data = Path(args.data) if args.data else make_jpegs(tmp / "photos", args.gallery)
        import simimg

        simimg.build_index(data, NAME, tmp / "home", weights="none", image_size=args.image_size, device=args.device)
        url, proc = _serve(stack, tmp / "home", args, args.max_batch)
        wait_until_ready(url, os.environ.get(TOKEN_ENV), 300, proc)
        args.images, args.name = None, NAME
        uploads = _payloads(url, args, headers)
        gallery = sorted(str(p.relative_to(data)) for p in data.rglob("*.jpg"))[:64]
        rss, tally = asyncio.run(_soak(url, proc.pid, uploads, gallery, headers, args))
    _report(rss, tally, args)


def _arguments():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=60.0, help="RSS after this long is the baseline (default 60)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS readings (default 5)")
    p.add_argument("--data", help="folder of class folders to index and send (default: generated JPEGs)")
    p.add_argument("--gallery", type=int, default=64, help="generated JPEGs when there is no --data (default 64)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--threads", type=int, help="the server's --threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


async def _soak(url: str, pid: int, uploads: list, gallery: list[str], headers: dict, args) -> tuple[list, Tally]:
    """Run the mix until --minutes have passed; returns the RSS samples [(seconds, MiB)] and the tally."""
    tally, samples, deadline = Tally(), [], time.monotonic() + args.minutes * 60
    rng = random.Random(args.seed)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
            start = time.perf_counter()
            try:
                status = (await _request(http, url, kind, uploads, gallery, headers, rng)).status_code
            except httpx.HTTPError as err:
                status = -1 if not isinstance(err, httpx.TimeoutException) else -2
            tally.add(kind, status, (time.perf_counter() - start) * 1e3)

    async def sampler() -> None:
        while time.monotonic() < deadline:
            samples.append((round(time.monotonic() - tally.started, 1), status_mib("VmRSS", pid)))
            await asyncio.sleep(args.sample_s)
        samples.append((round(time.monotonic() - tally.started, 1), status_mib("VmRSS", pid)))

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        await asyncio.gather(sampler(), *(client(http) for _ in range(args.concurrency)))
    return samples, tally


def _request(http: httpx.AsyncClient, url: str, kind: str, uploads: list, gallery: list[str], headers: dict, rng):
    base = f"{url}/v1/indexes/{NAME}"
    if kind == "query":
        return http.post(f"{base}/query", params={"k": 10}, files={"file": rng.choice(uploads)}, headers=headers)
    if kind == "embed":
        return http.post(f"{base}/embed", json=rng.sample(gallery, min(2, len(gallery))), headers=headers)
    if kind == "not_an_image":
        junk = ("junk.jpg", rng.randbytes(rng.randint(1, 4096)))
        return http.post(f"{base}/query", files={"file": junk}, headers=headers)
    return http.post(f"{base}/embed", json=[gallery[0]] * 100, headers=headers)  # over --max-files


def _report(samples: list[tuple[float, float]], tally: Tally, args) -> None:
    warm = next((mib for seconds, mib in samples if seconds >= args.warmup_s), samples[-1][1])
    growth = samples[-1][1] / warm - 1
    rows = [
        {"minute": m, "accepted": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}
        for m, ms in sorted(tally.latencies.items())
    ]
    summary = {
        "benchmark": "serve_soak",
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": sum(tally.answers.values()),
        "answers": {f"{kind} {status}": n for (kind, status), n in sorted(tally.answers.items())},
        "unexpected_errors": dict(tally.unexpected),
        "errors": sum(tally.unexpected.values()),
        "rss_start_mib": round(samples[0][1], 1),
        "rss_warm_mib": round(warm, 1),
        "rss_end_mib": round(samples[-1][1], 1),
        "rss_growth_after_warmup": round(growth, 4),
        "p99_ms_per_minute": [round(r["p99_ms"], 1) for r in rows],
        "met": growth <= MAX_RSS_GROWTH and not tally.unexpected,
        "hardware": hardware(torch.device(args.device)),
    }
    finish("simimg serve under a mixed load", rows, summary, args.json)


if __name__ == "__main__":
    main()
