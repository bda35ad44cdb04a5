"""A trunk quantized to int8 by NNCF on a sample of the user's own collection, kept beside its converted model.

int8 runs densenet121 about 1.7-2x the speed of bf16 (or float32 on a CPU without bf16 units) here, but how close
its vectors stay to float32's depends on the features, so it is never used blindly: jobs/int8.py measures each
quantization against float32 on held-back images of the same collection (analysis/agreement.py) and serves int8
only when that gate passes. This module does the parts that need NNCF and OpenVINO: the sample, the quantization,
and the cache entry `trunk_folder/int8-<key>/` (the quantized `trunk.xml` and the gate's figures, `gate.json`),
keyed by the trunk and by the sample's files (their paths, sizes and modification times), so a different model
or calibration set gives a different entry.

NNCF is imported here only, on first use, with its telemetry off (NNCF_CI, read once at its import): left on, each
`nncf.quantize` reports usage events to Google Analytics, each sent by a forked process (`multiprocessing`, from a
thread pool) while the torch and OpenVINO thread pools of the caller run. docs/NOTES.md says more.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from simimg.dataset.images import decode_image, read_bytes
from simimg.dataset.preprocess import Preprocess
from simimg.errors import BadImageError, SimimgError
from simimg.models.openvino import COMPILED, MODEL_XML, OpenVinoTrunk, compile_model, core, publish, trunk_folder

if TYPE_CHECKING:
    import openvino as ov

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 300  # NNCF's default subset size: 300 images of the collection, or all, whichever fewer
HELD_BACK = 100  # images the gate judges on, never calibrated on (a quarter of a small collection)
MIN_SAMPLE = 8  # fewer readable images than this: too few to judge int8 by
GATE_FILE = "gate.json"
SEED = 0
# set while NNCF is imported (it reads it then, once): NNCF's telemetry becomes a stub that sends nothing
TELEMETRY_OFF = {"NNCF_CI": "1"}


def split_sample(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(calibration, held back): disjoint, seeded picks from the collection's relative paths, the same for the
    same collection; a quarter of a small collection (at most `HELD_BACK` images) is held back."""
    shuffled = sorted(paths)
    random.Random(SEED).shuffle(shuffled)
    held = min(HELD_BACK, len(shuffled) // 4)
    return shuffled[held : held + CALIBRATION_IMAGES], shuffled[:held]


def sample_key(root: Path, paths: Sequence[str]) -> str:
    """Names a sample by its files' paths, sizes and modification times: a changed file or set makes a new key."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(root / path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:16]


def decode_sample(root: Path, paths: Sequence[str], preprocess: Preprocess) -> tuple[np.ndarray, list[str]]:
    """The readable images of `paths` as uint8 NCHW, as `simimg index` decodes them, and which paths they are."""
    kept, tensors = [], []
    for path in paths:
        try:
            image = decode_image(read_bytes(root / path), draft_size=preprocess.resize_size)
        except (BadImageError, OSError):
            continue
        tensors.append(preprocess.to_uint8(image))
        kept.append(path)
    if not tensors:
        return np.empty((0, 3, preprocess.crop_size, preprocess.crop_size), np.uint8), kept
    return torch.stack(tensors).numpy(), kept


def quantize(model: ov.Model, images: np.ndarray) -> ov.Model:
    """NNCF post-training quantization of a converted trunk, calibrated on `images` (uint8 NCHW), one at a time."""
    nncf = import_nncf()
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    with contextlib.redirect_stdout(sys.stderr):  # its progress bars print to stdout, which --json keeps for itself
        quantized: ov.Model = nncf.quantize(model, dataset, subset_size=len(images))
    return quantized


def entry(trunk: nn.Module, preprocess: Preprocess, key: str) -> Path:
    """The cache folder of `trunk` quantized on the sample `key`."""
    return trunk_folder(trunk, preprocess) / f"int8-{key}"


def keep(folder: Path, quantized: ov.Model, gate: dict[str, Any]) -> None:
    """Publish the quantized model with its gate's figures, whole or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    publish(quantized, folder, {GATE_FILE: json.dumps(gate, indent=2).encode()})


def read_gate(folder: Path) -> dict[str, Any] | None:
    """The gate's figures kept with a quantized trunk, or None when there is no whole entry."""
    try:
        gate: dict[str, Any] = json.loads((folder / GATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return gate if (folder / MODEL_XML).is_file() else None


def read_quantized(folder: Path) -> ov.Model:
    """The kept quantized trunk in `folder`."""
    try:
        model: ov.Model = core().read_model(folder / MODEL_XML)
    except RuntimeError as err:
        raise SimimgError(f"the int8 trunk in {folder} does not read ({err}): index with --precision int8") from err
    return model


def compile_int8(folder: Path, threads: int | None = None) -> OpenVinoTrunk:
    """The kept quantized trunk in `folder`, compiled for this CPU."""
    return compile_model(read_quantized(folder), "int8", threads, folder / COMPILED)


@functools.cache
def import_nncf() -> ModuleType:
    """NNCF, imported with its telemetry off (see the module's text); restores the environment afterwards."""
    with _environment(TELEMETRY_OFF):
        try:
            import nncf
        except ImportError as err:
            raise SimimgError("--precision int8 needs NNCF: pip install 'simimg[int8]' (or nncf)") from err

    logger = logging.getLogger("nncf")  # NNCF logs to stdout by itself: through the application's logging instead
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.WARNING)
    module: ModuleType = nncf
    return module


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
