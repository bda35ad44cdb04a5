"""Training throughput: `simimg train` (augmenting loader + train step) against the bare train step on
pre-made tensors already on the device, in one run.

    python benchmarks/train_throughput.py --device cpu --images 64 --json
    python benchmarks/train_throughput.py --device cuda --images 4096 --batch-size 256 --json

real: `run_training` on generated 500x375 JPEGs (`--weights none`, every layer trained), images/s of the
training pass of its last epoch as the trainer itself reports it (EpochStats.images_per_s).
raw: the same model, optimizer, precision and memory format stepping on one uint8 batch kept on the device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from _common import finish, hardware, make_jpegs, median, parser, seconds
from simimg.choices import PRECISIONS
from simimg.jobs.train import run_training
from simimg.jobs.train_config import TrainConfig
from simimg.memory import reuse_freed_memory
from simimg.models.device import Compute, memory_format_for, resolve_compute
from simimg.models.net import build_model, with_classes
from simimg.progress import Hooks

CLASSES = 2


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128, help="generated JPEGs (80%% train, 20%% val)")
    p.add_argument("--epochs", type=int, default=2, help="the last epoch is measured (the first warms up)")
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="decode workers (default: simimg's: none on the CPU, all cores on CUDA)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="as `simimg train --precision`")
    args = p.parse_args()
    reuse_freed_memory()
    compute = resolve_compute(args.device, args.precision, training=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp) / "photos", args.images, classes=CLASSES)
        for r in range(args.repeats):
            config = TrainConfig(
                str(folder),
                "bench",
                str(Path(tmp) / f"home{r}"),
                arch=args.arch,
                weights="none",
                epochs=args.epochs,
                batch_size=args.batch_size,
                image_size=args.image_size,
                freeze_epochs=0,
                patience=args.epochs,
                device=args.device,
                precision=args.precision,
                workers=args.workers,
                index=False,
            )
            epochs = []
            run_training(config, Hooks(on_epoch=epochs.append))
            row = {
                "repeat": r,
                "train_img_s": epochs[-1].images_per_s,
                "raw_step_img_s": _raw_step_rate(args, compute, steps=max(2, args.images // args.batch_size // 2)),
            }
            row["ratio_raw"] = row["train_img_s"] / row["raw_step_img_s"]
            rows.append(row)
    summary = {
        "benchmark": "train_throughput",
        "device": str(compute.device),
        "precision": compute.precision,
        "images": args.images,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "epochs": args.epochs,
        "repeats": args.repeats,
        **{key: median([row[key] for row in rows]) for key in rows[0] if key != "repeat"},
        "hardware": hardware(compute.device),
    }
    finish("training throughput (img/s; ratio = median of per-repeat ratios)", rows, summary, args.json)


def _raw_step_rate(args, compute: Compute, steps: int) -> float:
    """Images/s of forward + loss + backward + AdamW step on one pre-made batch, after one warm-up step."""
    device = compute.device
    model = with_classes(build_model(args.arch, "none", args.image_size), tuple(f"c{i}" for i in range(CLASSES)))
    net, preprocess = model.net.train().to(device, memory_format=memory_format_for(device)), model.bundle.preprocess
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    criterion, autocast = nn.CrossEntropyLoss(), compute.autocast
    size = args.image_size
    batch = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, CLASSES, (args.batch_size,), device=device)

    def step() -> None:
        x = preprocess.normalize(batch).contiguous(memory_format=memory_format_for(device))
        with autocast():
            loss = criterion(net(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    return steps * args.batch_size / seconds(lambda: [step() for _ in range(steps)], device)


if __name__ == "__main__":
    main()
