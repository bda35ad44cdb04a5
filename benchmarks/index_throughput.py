"""`simimg index` end to end, against the model alone and against a seed-style loop, at the default precision and
runtime and in torch float32, measured in one run.

    python benchmarks/index_throughput.py --device cpu --images 1024 --json
    python benchmarks/index_throughput.py --device cuda --images 4096 --batch-size 256 --json

end_to_end: the real `run_index` (scan, read + hash + decode, forward, catalog and vector shards, FAISS, publish)
into a fresh home, building and keeping its model (random init, `--weights none`) as a first `simimg index` does;
on OpenVINO it reads the converted trunk from the machine's cache, as every run after a model's first use on a
machine does (`convert_s`: that first conversion, a one-off per model and machine, timed apart).
first_index_s: a first-time user's `simimg index` of 64 JPEGs in a fresh process, with an empty model cache (cold)
and again with the cache the first run filled (warm); --no-first-index skips it.
model_only: `infer` alone on pre-made uint8 batches already on the device: same model, batch size and precision.
baseline: the seed's loop: torchvision ImageFolder (PIL decode, no draft), fp32 NCHW, batch 32, no workers.
stage_ms: where an image's CPU time goes before the forward, one thread, median over up to 32 files: reading and
hashing its bytes, decoding (at JPEG draft scale, as simimg does), resizing and cropping (`Preprocess.to_uint8`).
--large generates 4000x3000 phone-sized JPEGs (~12 MP) instead of 500x375:

    python benchmarks/index_throughput.py --device cpu --images 128 --large --no-int8 --no-first-index --json
Each is measured at the precision and runtime `--precision` and $SIMIMG_RUNTIME resolve to (auto: bf16 where it
is native, OpenVINO on the CPU) and, when that differs, again in float32 on torch (the `fp32_` figures: simimg's
path before OpenVINO); `ratio_fp32_model_only` is end to end at the default over torch float32 model-only.
Every repeat runs every variant, interleaved.

int8 (on the CPU, with OpenVINO; `--no-int8` skips it): the trunk quantized by NNCF on the benchmark's own images
(as `simimg index --precision int8` does: jobs/int8.py), its model-only rate against OpenVINO bf16 and float32 in
the same repeats (`int8_model_only_img_s`, `bf16_`, `openvino_fp32_`; on a CPU without bf16 units OpenVINO runs
the bf16 hint in float32: `cpu_bf16_units` says which), and the gate's figures on those images (`gate`).
`--gate-data DIR` (repeatable) adds the gate's figures on other collections (`gates`), with `--gate-weights`
(default: random init) at `--image-size`; a simimg model folder there is judged whole, its classifier included,
at its own image size:

    python benchmarks/index_throughput.py --images 256 --repeats 3 --gate-data ../shared/datasets/hymenoptera \
        --gate-data ../shared/datasets/cats_dogs --json
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from _common import PHOTO_SIZE, finish, gate_figures, hardware, make_jpegs, median, parser, runtime, seconds
from simimg.choices import PRECISIONS
from simimg.dataset.images import decode_image, read_bytes
from simimg.dataset.preprocess import Preprocess
from simimg.dataset.scan import scan_folder
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.jobs.int8 import measure
from simimg.memory import reuse_freed_memory
from simimg.models.bundle import BUNDLE_JSON
from simimg.models.device import Compute, cpu_has_int8_units, int8_compute, loader_workers, native_bf16, resolve_compute
from simimg.models.encoder import infer, prepare_net
from simimg.models.net import LoadedModel, build_model, load_bundle
from simimg.models.openvino import CACHE_ENV, convert

NAME = "bench"
FIRST_INDEX_IMAGES = 64
LARGE_SIZE = (4000, 3000)  # a 12 MP phone photo
STAGE_FILES = 32


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="JPEGs to generate (500x375) when no --folder is given")
    p.add_argument("--folder", help="index this folder instead (all of it)")
    p.add_argument("--large", action="store_true", help="generate 4000x3000 phone-sized JPEGs instead of 500x375")
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64, help="as `simimg index --batch-size` (default 64)")
    p.add_argument("--workers", type=int, help="decode workers (default: simimg's: none on the CPU, all cores on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile in both model-only and end-to-end")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the default precision to measure")
    p.add_argument(
        "--no-first-index", dest="first_index", action="store_false", help="skip the fresh-process first_index_s runs"
    )
    p.add_argument("--no-int8", action="store_true", help="skip the int8 quantization, its rates and its gate")
    p.add_argument("--gate-data", action="append", default=[], help="also gate int8 on this collection")
    p.add_argument("--gate-weights", default="none", help="the model whose int8 --gate-data judges (default none)")
    args = p.parse_args()
    reuse_freed_memory()
    default = resolve_compute(args.device, args.precision, compile=args.compile)
    reference = resolve_compute(args.device, "fp32", runtime="torch")
    int8_here = not args.no_int8 and default.runtime == "openvino"
    with tempfile.TemporaryDirectory() as tmp:
        generated = LARGE_SIZE if args.large else PHOTO_SIZE
        folder = Path(args.folder) if args.folder else make_jpegs(Path(tmp) / "photos", args.images, generated)
        records = scan_folder(folder).records
        images = len(records)
        model = build_model(args.arch, "none", args.image_size)
        stages = _stage_ms([folder / r.path for r in records[:STAGE_FILES]], model.bundle.preprocess)
        gate = measure(model, folder, [r.path for r in records]) if int8_here else None
        if gate is not None and gate["passed"] and (default.int8 == "asked" or default.int8 == "auto"):
            default = int8_compute(default, gate["sample"])  # what `simimg index` serves with: ratio_model_only's
        computes = {"": default} if default == reference else {"": default, "fp32_": reference}
        extra = _precisions(default, gate) if gate is not None else {}
        model_only = {
            prefix: _model_only_timer(model, compute, images, args.batch_size, args.compile)
            for prefix, compute in {**computes, **extra}.items()
        }
        rows = [_repeat(args, r, folder, images, Path(tmp), computes, model_only) for r in range(args.repeats)]
        first_index = _first_index_seconds(args, Path(tmp)) if args.first_index else None
        gates = {Path(d).name: _gate(args, Path(d)) for d in args.gate_data}
    summary = {
        "benchmark": "index_throughput",
        "device": str(default.device),
        "precision": default.precision,
        "runtime": default.runtime,
        "convert_s": _convert_seconds(args, default),
        "first_index_s": first_index,
        "images": images,
        "image_px": None if args.folder else list(generated),
        "stage_ms": stages,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": loader_workers(args.workers, default.device),
        "compile": args.compile,
        "repeats": args.repeats,
        **{key: median([row[key] for row in rows]) for key in rows[0] if key != "repeat"},
        **({} if gate is not None else dict.fromkeys(INT8_FIGURES)),
        "gate": gate_figures(gate),
        "gates": gates,
        "cpu_bf16_units": native_bf16(torch.device("cpu")),
        "cpu_int8_units": cpu_has_int8_units(),
        "hardware": hardware(default.device),
    }
    finish("simimg index throughput (img/s; ratios are medians of per-repeat ratios)", rows, summary, args.json)


def _repeat(args, r: int, folder: Path, images: int, tmp: Path, computes: dict[str, Compute], model_only: dict) -> dict:
    """One repeat: every precision's model-only and end-to-end rate, then the seed-style loop; and their ratios."""
    row: dict = {"repeat": r}
    for prefix, compute in computes.items():
        job = IndexJob(
            str(folder),
            NAME,
            str(tmp / f"home{r}{prefix}"),
            arch=args.arch,
            weights="none",
            image_size=args.image_size,
            device=args.device,
            precision=compute.precision,
            batch_size=args.batch_size,
            workers=args.workers,
            compile=args.compile,
        )
        row[f"{prefix}model_only_img_s"] = images / model_only[prefix]()
        with runtime(compute.runtime):
            row[f"{prefix}end_to_end_img_s"] = images / seconds(lambda: _index(job, images), compute.device)
    device = computes[""].device
    row["baseline_img_s"] = images / _baseline_seconds(
        folder, build_model(args.arch, "none", args.image_size), device, args.image_size
    )
    row["ratio_model_only"] = row["end_to_end_img_s"] / row["model_only_img_s"]
    row["ratio_fp32_model_only"] = row["end_to_end_img_s"] / row.get("fp32_model_only_img_s", row["model_only_img_s"])
    row["ratio_baseline"] = row["end_to_end_img_s"] / row["baseline_img_s"]
    if "int8_" in model_only:
        for prefix in ("int8_", "bf16_", "openvino_fp32_"):
            row[f"{prefix}model_only_img_s"] = images / model_only[prefix]()
        row["ratio_int8_over_bf16_model_only"] = row["int8_model_only_img_s"] / row["bf16_model_only_img_s"]
        row["ratio_int8_over_fp32_model_only"] = row["int8_model_only_img_s"] / row["openvino_fp32_model_only_img_s"]
    return row


INT8_FIGURES = (
    "int8_model_only_img_s",
    "bf16_model_only_img_s",
    "openvino_fp32_model_only_img_s",
    "ratio_int8_over_bf16_model_only",
    "ratio_int8_over_fp32_model_only",
)


def _precisions(default: Compute, gate: dict) -> dict[str, Compute]:
    """OpenVINO on the CPU in int8 (the quantization the gate judged, passed or not), bf16 (run in float32 by a CPU
    without bf16 units) and float32: the model-only rates compared in each repeat."""
    fp32 = dataclasses.replace(resolve_compute("cpu", "fp32"), runtime="openvino")
    bf16 = dataclasses.replace(fp32, precision="bf16")
    return {"int8_": int8_compute(fp32, gate["sample"]), "bf16_": bf16, "openvino_fp32_": fp32}


def _gate(args, data: Path) -> dict | None:
    """The int8 gate's figures on another collection, for the model `--gate-weights` names (a model folder with its
    head, which building from it as weights would drop)."""
    bundle = Path(args.gate_weights)
    model = (
        load_bundle(bundle)
        if (bundle / BUNDLE_JSON).is_file()
        else build_model(args.arch, args.gate_weights, args.image_size)
    )
    return gate_figures(measure(model, data, [r.path for r in scan_folder(data).records]))


def _stage_ms(files: list[Path], preprocess: Preprocess) -> dict[str, float]:
    """Median CPU milliseconds per file of each step before the forward, as the indexer's reader runs them."""
    costs: dict[str, list[float]] = {"read_hash": [], "decode": [], "resize": []}
    for file in files:
        started = time.process_time()
        data = read_bytes(file)
        hashlib.sha256(data).hexdigest()
        read = time.process_time()
        image = decode_image(data, draft_size=preprocess.resize_size)
        decoded = time.process_time()
        preprocess.to_uint8(image)
        done = time.process_time()
        for key, value in zip(costs, (read - started, decoded - read, done - decoded)):
            costs[key].append(1000 * value)
    return {key: round(median(values), 2) for key, values in costs.items()} if files else {}


def _index(job: IndexJob, images: int) -> None:
    report = run_index(job)
    if report.indexed != images:
        raise SystemExit(f"indexed {report.indexed} of {images} images; skipped: {report.skipped[:3]}")


def _model_only_timer(model: LoadedModel, compute: Compute, images: int, batch_size: int, compile: bool):
    """A function that times the forward alone over `images` images, in full batches plus the remainder."""
    net, preprocess = model.net, model.bundle.preprocess
    trunk = prepare_net(net, compute, preprocess, compile)
    size, device = preprocess.crop_size, compute.device
    full = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    batches = [full] * (images // batch_size) + ([full[: images % batch_size]] if images % batch_size else [])
    for batch in {b.shape[0]: b for b in batches}.values():  # warm up every shape (and compile, if asked)
        infer(net, batch, preprocess, compute, trunk=trunk)

    def run() -> float:
        return seconds(lambda: [infer(net, b, preprocess, compute, trunk=trunk)[0].cpu() for b in batches], device)

    return run


def _convert_seconds(args, compute: Compute) -> float | None:
    """What the first use of a model on a machine spends converting its trunk for OpenVINO (once: later processes
    read it back from the cache, as the end-to-end runs here do)."""
    if compute.runtime != "openvino":
        return None
    model = build_model(args.arch, "none", args.image_size)
    return seconds(lambda: convert(model.net.trunk, model.bundle.preprocess))


def _first_index_seconds(args, tmp: Path) -> dict[str, float]:
    """A first-time user's first index: `simimg index` of 64 JPEGs in a fresh process (imports included), cold (an
    empty model cache: the trunk is converted and compiled) and warm (the same model again, a new index: the
    converted trunk and its compiled blobs are read back)."""
    folder = make_jpegs(tmp / "first", FIRST_INDEX_IMAGES, seed=1)
    model = ["--arch", args.arch, "--weights", "none", "--image-size", str(args.image_size), "--device", args.device]
    env = {**os.environ, CACHE_ENV: str(tmp / "first-cache")}
    timings = {}
    for run in ("cold", "warm"):
        home = ["--name", "first", "--home", str(tmp / f"first-{run}")]
        command = [sys.executable, "-m", "simimg.cli", "index", str(folder), *home, *model, "--json"]
        started = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"simimg index failed: {proc.stderr[-2000:]}")
        timings[run] = round(time.perf_counter() - started, 2)
    return timings


def _baseline_seconds(folder: Path, model: LoadedModel, device: torch.device, image_size: int) -> float:
    """The seed's way: ImageFolder + torchvision transforms, PIL decode, fp32 NCHW, batch 32, no workers."""
    transform = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(model.bundle.preprocess.mean, model.bundle.preprocess.std),
        ]
    )
    loader = DataLoader(datasets.ImageFolder(str(folder), transform=transform), batch_size=32, num_workers=0)
    net = model.net.eval().to(device)

    def run() -> None:
        with torch.no_grad():
            for x, _ in loader:
                net.embed(x.to(device)).cpu()

    return seconds(run, device)


if __name__ == "__main__":
    main()
