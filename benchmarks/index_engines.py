"""`simimg index` wall time with the ray engine against the local engine, on the same folder, in the same run.

    python benchmarks/index_engines.py --images 300 --image-size 64 --json

Generates photo-like JPEGs, starts one local Ray instance (max(4, cores) logical CPUs; its start is reported
apart, as a cluster would already be up), then builds a fresh index of the folder with each engine in turn,
interleaved, `--repeats` times (`--weights none`: no download). Reports both wall times (medians), their ratio,
and how well the two indexes agree (lowest per-image cosine; same totals and skipped files). On one machine the
ray engine pays for actor start-up and the object store; it is meant for clusters, where its actors multiply.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from _common import finish, hardware, make_jpegs, median, parser
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.models.device import resolve_device
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ray-actors", type=int, help="default: the engine's own choice")
    args = p.parse_args()
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - started
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_jpegs(Path(tmp) / "photos", args.images, classes=2)
            for r in range(args.repeats):
                job = IndexJob(
                    str(data),
                    "bench",
                    "",
                    weights="none",
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    device=args.device,
                )
                local = run_index(_fresh(job, Path(tmp) / f"local{r}"))
                remote = run_index(_fresh(job, Path(tmp) / f"ray{r}", engine="ray", ray_actors=args.ray_actors))
                rows.append(
                    {
                        "repeat": r,
                        "local_s": local.seconds,
                        "ray_s": remote.seconds,
                        "ratio_ray_over_local": remote.seconds / local.seconds,
                        "total": remote.total,
                        "same_result": (local.total, local.skipped) == (remote.total, remote.skipped),
                        "min_cosine": _min_cosine(Path(tmp) / f"local{r}", Path(tmp) / f"ray{r}"),
                        "ray_device": remote.device,
                    }
                )
    finally:
        ray.shutdown()
    local_s, ray_s = median([r["local_s"] for r in rows]), median([r["ray_s"] for r in rows])
    summary = {
        "benchmark": "index_engines",
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "local_s": local_s,
        "ray_s": ray_s,
        "ray_init_s": ray_init_s,
        "ratio_ray_over_local": ray_s / local_s,
        "ray_device": rows[-1]["ray_device"],
        "same_result": all(r["same_result"] for r in rows),
        "min_cosine": min(r["min_cosine"] for r in rows),
        "hardware": hardware(resolve_device(args.device)),
    }
    finish("simimg index: ray engine vs local engine (wall seconds, same process)", rows, summary, args.json)


def _fresh(job: IndexJob, home: Path, **options) -> IndexJob:
    return replace(job, home=str(home), **options)


def _min_cosine(home_a: Path, home_b: Path) -> float:
    """The lowest cosine between the two indexes' vectors of the same path (both are unit length)."""
    vectors = []
    for home in (home_a, home_b):
        with reading(IndexFolder.of(home, "bench").catalog) as catalog:
            snapshot, rows = catalog.snapshot_with_vectors()
        vectors.append(dict(zip(snapshot.paths, rows)))
    return float(min(np.dot(v, vectors[1][path]) for path, v in vectors[0].items()))


if __name__ == "__main__":
    main()
