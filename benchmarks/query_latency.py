"""Warm single-image query latency: `SearchService.query` (preprocess, forward, search, row lookup) against the
model's batch-1 forward alone, interleaved in one run.

    python benchmarks/query_latency.py --device cpu --json

The gallery is indexed once with the real `run_index` (`--weights none`); queries are decoded 500x375 photos
handed over as PIL images, as the app does with an upload. Nothing is reloaded between queries.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from _common import finish, hardware, make_jpegs, median, parser, percentile, seconds
from simimg.device import resolve_device
from simimg.embed import infer, reuse_freed_memory
from simimg.images import load_image
from simimg.indexing import IndexJob, run_index
from simimg.search import SearchService

NAME = "bench"
WARMUP = 3


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="gallery size (generated 500x375 JPEGs)")
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()
    reuse_freed_memory()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp) / "photos", args.images)
        run_index(IndexJob(str(folder), NAME, str(Path(tmp) / "home"), arch=args.arch, weights="none",
                           image_size=args.image_size, device=args.device))
        service = SearchService(Path(tmp) / "home", NAME, args.device)
        photos = [load_image(path) for path in sorted(folder.rglob("*.jpg"))[:8]]
        query_ms, forward_ms = _interleaved(service, photos, device, args.queries)
    rows = [{"what": what, "p50_ms": median(ms), "p95_ms": percentile(ms, 95), "min_ms": min(ms)}
            for what, ms in (("SearchService.query", query_ms), ("forward only, batch 1", forward_ms))]
    summary = {"benchmark": "query_latency", "device": str(device), "gallery": args.images, "queries": args.queries,
               "arch": args.arch, "image_size": args.image_size, "query_p50_ms": rows[0]["p50_ms"],
               "query_p95_ms": rows[0]["p95_ms"], "forward_p50_ms": rows[1]["p50_ms"],
               "forward_p95_ms": rows[1]["p95_ms"], "ratio_query_over_forward_p50": rows[0]["p50_ms"] / rows[1]["p50_ms"],
               "hardware": hardware(device)}
    finish("warm single-image query latency (ms)", rows, summary, args.json)


def _interleaved(service: SearchService, photos: list, device: torch.device, queries: int) -> tuple[list, list]:
    """Alternate a full query and a bare forward, so both see the same load from other processes."""
    net, preprocess = service.model.net, service.model.bundle.preprocess
    batch = preprocess.to_uint8(photos[0]).unsqueeze(0).to(device)
    query_ms, forward_ms = [], []
    for i in range(WARMUP + queries):
        q = seconds(lambda: service.query(photos[i % len(photos)], k=10), device) * 1e3
        f = seconds(lambda: infer(net, batch, preprocess, device)[0].cpu(), device) * 1e3
        if i >= WARMUP:
            query_ms.append(q)
            forward_ms.append(f)
    return query_ms, forward_ms


if __name__ == "__main__":
    main()
