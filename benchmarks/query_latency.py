"""Warm single-image query latency: `SearchService.query` (preprocess, forward, search, row lookup) against the
model's batch-1 forward alone, at the default precision and runtime and in torch float32, interleaved in one run.

    python benchmarks/query_latency.py --device cpu --json

The gallery is indexed once with the real `run_index` (`--weights none`); queries are decoded 500x375 photos
handed over as PIL images, as the app does with an upload. Nothing is reloaded between queries. `query_p50_ms` and
the other unprefixed figures are at the precision and runtime `--precision` and $SIMIMG_RUNTIME resolve to (auto:
bf16 where it is native, OpenVINO on the CPU); the `fp32_` ones in float32 on torch (simimg's path before
OpenVINO), from a second service on the same index.

On OpenVINO (the CPU), the `int8_` figures come from a third service on that index whose trunk is the int8
quantization of the gallery (NNCF, as `simimg index --precision int8` makes it: jobs/int8.py), served whether or not
its agreement gate passed, as index_throughput.py's int8 model-only rate is: a latency, not a claim that int8 serves
this gallery (`int8_gate` says whether it would); `--no-int8` skips it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from _common import (
    finish,
    gate_figures,
    hardware,
    make_jpegs,
    median,
    parser,
    percentile,
    runtime,
    seconds,
    status_mib,
)
from simimg.choices import PRECISIONS
from simimg.dataset.images import load_image
from simimg.dataset.scan import scan_folder
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.jobs.int8 import measure
from simimg.memory import reuse_freed_memory
from simimg.models.device import Compute, int8_compute, resolve_compute
from simimg.models.encoder import Trunk, infer, prepare_net
from simimg.models.net import LoadedModel
from simimg.query.service import SearchService, ServedVersion
from simimg.store.model_store import load_model

NAME = "bench"
WARMUP = 3


class Int8Service(SearchService):
    """A service whose trunk runs the int8 quantization kept for `sample`, gate or not (see the module docstring)."""

    def __init__(self, home: Path, name: str, sample: str) -> None:
        self.sample = sample
        super().__init__(home, name, "cpu", "fp32")

    def _model_for(self, fingerprint: str, current: ServedVersion | None) -> tuple[LoadedModel, Trunk, Compute]:
        """The model and its int8 trunk only: no float32 trunk is compiled to be thrown away."""
        model = load_model(self.folder, fingerprint)
        int8 = int8_compute(self.compute, self.sample)
        return model, prepare_net(model.net, int8, model.bundle.preprocess), int8


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="gallery size (generated 500x375 JPEGs)")
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the default precision to measure")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 service (its quantization takes ~10 s)")
    args = p.parse_args()
    reuse_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp) / "photos", args.images)
        run_index(
            IndexJob(
                str(folder),
                NAME,
                str(Path(tmp) / "home"),
                arch=args.arch,
                weights="none",
                image_size=args.image_size,
                device=args.device,
                precision=args.precision,
            )
        )
        home = Path(tmp) / "home"
        services = {"": SearchService(home, NAME, args.device, args.precision)}
        if services[""].compute != resolve_compute(args.device, "fp32", runtime="torch"):
            with runtime("torch"):
                services["fp32_"] = SearchService(home, NAME, args.device, "fp32")
        gate = None
        if not args.no_int8 and services[""].compute.runtime == "openvino" and services[""].compute.precision != "int8":
            gate = measure(services[""].model, folder, [r.path for r in scan_folder(folder).records])
            services["int8_"] = Int8Service(home, NAME, gate["sample"])
        photos = [load_image(path) for path in sorted(folder.rglob("*.jpg"))[:8]]
        times = _interleaved(services, photos, args.queries)
        second_copy_mib = _second_copy_mib(services[""], photos)
    default = services[""].compute
    rows = [
        {
            "what": f"{what} ({services[prefix].served.compute or services[prefix].compute})",
            "p50_ms": median(ms),
            "p95_ms": percentile(ms, 95),
            "min_ms": min(ms),
        }
        for (prefix, what), ms in times.items()
    ]
    summary = {
        "benchmark": "query_latency",
        "device": str(default.device),
        "precision": default.precision,
        "runtime": default.runtime,
        "gallery": args.images,
        "queries": args.queries,
        "arch": args.arch,
        "image_size": args.image_size,
        "peak_rss_mib": status_mib("VmHWM"),
        "second_copy_mib": second_copy_mib,
        "int8_gate": gate_figures(gate),
    }
    for prefix in services:
        query, forward = times[prefix, "query"], times[prefix, "forward"]
        summary.update(
            {
                f"{prefix}query_p50_ms": median(query),
                f"{prefix}query_p95_ms": percentile(query, 95),
                f"{prefix}forward_p50_ms": median(forward),
                f"{prefix}forward_p95_ms": percentile(forward, 95),
                f"{prefix}ratio_query_over_forward_p50": median(query) / median(forward),
            }
        )
    summary["ratio_fp32_query_p50"] = (
        summary.get("fp32_query_p50_ms", summary["query_p50_ms"]) / summary["query_p50_ms"]
    )
    summary.setdefault("int8_query_p50_ms", None)  # where int8 does not run (CUDA, torch): the keys are always there
    summary["ratio_int8_query_p50"] = (
        summary["query_p50_ms"] / summary["int8_query_p50_ms"] if summary["int8_query_p50_ms"] else None
    )
    summary["hardware"] = hardware(default.device)
    finish("warm single-image query latency (ms)", rows, summary, args.json)


def _second_copy_mib(service: SearchService, photos: list) -> float | None:
    """What a batch costs a service that so far answered single queries: on OpenVINO, the model's second compiled
    copy (THROUGHPUT, made on the first batch of 8 or more; openvino.OpenVinoTrunk), as resident memory gained."""
    if service.compute.runtime != "openvino":
        return None
    served = service.served
    preprocess = served.model.bundle.preprocess
    batch = torch.stack([preprocess.to_uint8(photo) for photo in photos]).to(service.compute.device)
    before = status_mib("VmRSS")
    infer(served.model.net, batch, preprocess, service.compute, trunk=served.trunk)
    return round(status_mib("VmRSS") - before, 1)


def _interleaved(services: dict[str, SearchService], photos: list, queries: int) -> dict[tuple[str, str], list]:
    """Alternate a full query and a bare forward, for each precision in turn, so all see the same load."""
    times: dict[tuple[str, str], list] = {(prefix, what): [] for prefix in services for what in ("query", "forward")}
    for i in range(WARMUP + queries):
        for prefix, service in services.items():
            served, device = service.served, service.compute.device
            preprocess = served.model.bundle.preprocess
            batch = preprocess.to_uint8(photos[0]).unsqueeze(0).to(device)
            q = seconds(lambda: service.query(photos[i % len(photos)], k=10), device) * 1e3
            f = (
                seconds(
                    lambda: infer(served.model.net, batch, preprocess, service.compute, trunk=served.trunk)[0].cpu(),
                    device,
                )
                * 1e3
            )
            if i >= WARMUP:
                times[prefix, "query"].append(q)
                times[prefix, "forward"].append(f)
    return times


if __name__ == "__main__":
    main()
