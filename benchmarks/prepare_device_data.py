"""Make `.device-data/`, what benchmarks/gpu_suite.sh needs on a lent GPU machine that only the working tree reaches:
downscaled copies of the shared datasets and the wheels that machine lacks, within the 64 MiB a call may carry.

    python benchmarks/prepare_device_data.py            # then: run(..., carry=[".device-data"]); see README.md

Images keep their names and folders; JPEGs larger than --short-side are resized so their shorter side is that
(256 by default: what the 224 px recipe resizes to anyway) and saved at --quality. The wheels are pip-downloaded
for the machine's Python (3.12, x86-64 manylinux) at the versions installed here, so both sides run the same ones.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("cats_dogs",)  # what the suite trains, evaluates and indexes
# what simimg imports that the GPU machine's image does not have (its torch, numpy, pillow, scikit-learn,
# safetensors, matplotlib, pandas and pytest are used as they are)
WHEELS = ("faiss-cpu",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT_MIB = 60  # a call carries 64 MiB, the working tree (~2 MiB) included


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(ROOT.parent / "shared" / "datasets"), help="the shared datasets")
    p.add_argument("--out", default=str(ROOT / ".device-data"))
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma list of shared datasets to copy")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    for name in args.datasets.split(","):
        copied = downscale_tree(Path(args.source) / name, out / name, args.short_side, args.quality)
        print(f"{name}: {copied} images, {mib(out / name):.1f} MiB")
    download_wheels(out / "wheels", args.python_version)
    print(f"wheels: {', '.join(p.name for p in sorted((out / 'wheels').glob('*.whl')))}, {mib(out / 'wheels'):.1f} MiB")
    total = mib(out)
    print(f"{out}: {total:.1f} MiB in all (at most {CARRY_LIMIT_MIB} MiB can be carried beside the working tree)")
    if total > CARRY_LIMIT_MIB:
        sys.exit("too large to carry: lower --short-side or --quality")


def downscale_tree(source: Path, target: Path, short_side: int, quality: int) -> int:
    """Copy every file of `source` under `target`, shrinking JPEGs whose shorter side exceeds `short_side`."""
    if not source.is_dir():
        sys.exit(f"{source} is absent: give --source (the shared datasets folder)")
    count = 0
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.name.startswith(("_", ".")) or path.name == "MANIFEST.sha256":
            continue
        copy = target / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        count += 1
        with Image.open(path) as image:
            if image.format != "JPEG" or min(image.size) <= short_side:
                shutil.copyfile(path, copy)
                continue
            upright = ImageOps.exif_transpose(image).convert("RGB")
        scale = short_side / min(upright.size)
        upright.resize((round(upright.width * scale), round(upright.height * scale)), Image.Resampling.LANCZOS).save(
            copy, "JPEG", quality=quality
        )
    return count


def download_wheels(target: Path, python_version: str) -> None:
    """The wheels of WHEELS at the versions installed here, for the GPU machine's Python and platform."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(target),
            *pins,
        ],
        check=True,
    )


def mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


if __name__ == "__main__":
    main()
