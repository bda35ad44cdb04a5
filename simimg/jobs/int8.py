"""`--precision int8`: quantize the model's trunk on the collection, judge it against float32, serve it if it passes.

Once per model and machine (models/int8.py keeps the result), NNCF quantizes the trunk on up to 300 images of the
collection; the gate then embeds those and a disjoint held-back sample with both trunks and compares them
(analysis/agreement.py). int8 serves only when the gate passes; otherwise the index is embedded in bf16 (where
the CPU has bf16 units) or float32, and the figures are logged and recorded with the index (store/precision.py).
Because int8 vectors are only ever stored after a passed gate, they keep the model's embedding fingerprint.

`--precision auto` never quantizes (the first `simimg index` of a collection must not pay for it): on a CPU with
VNNI or AMX it uses int8 only where an earlier `--precision int8` run left a passed gate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from simimg.analysis.agreement import GateFigures, gate_figures
from simimg.errors import SimimgError
from simimg.models.device import Compute, int8_compute
from simimg.models.int8 import (
    MIN_SAMPLE,
    decode_sample,
    entry,
    import_nncf,
    keep,
    quantize,
    read_gate,
    read_quantized,
    sample_key,
    split_sample,
)
from simimg.models.net import LoadedModel, Net
from simimg.models.openvino import compile_model, converted
from simimg.store.catalog import Catalog
from simimg.store.precision import kept_int8, record_int8

if TYPE_CHECKING:
    import openvino as ov

log = logging.getLogger(__name__)


def gated_compute(
    compute: Compute, model: LoadedModel, catalog: Catalog, root: Path, paths: Sequence[str]
) -> tuple[Compute, dict[str, Any] | None]:
    """The compute this run embeds with, and the gate's record when int8 was tried: int8 when its gate passed
    (measured now if `--precision int8` asked and none is kept), else `compute` as it was resolved."""
    chosen, record = kept_int8(compute, catalog, model)
    if record is None and compute.int8 == "asked":
        record = measure(model, root, paths)
        with catalog.transaction():
            record_int8(catalog, model.bundle.fingerprint, record)
        chosen = int8_compute(compute, record["sample"]) if record["passed"] else compute
    if record is not None and not record["passed"] and compute.int8 == "asked":
        log.warning(
            "int8 refused by its gate (%s): embedding in %s instead",
            GateFigures(**_figures(record)).describe(),
            compute.precision,
        )
    return chosen, record


def measure(model: LoadedModel, root: Path, paths: Sequence[str]) -> dict[str, Any]:
    """Quantize `model`'s trunk on a sample of `paths` (relative to `root`), gate it, keep both; the record.

    A kept quantization is reused for any model with the same trunk, but its figures only for the model they were
    measured for: classifier agreement depends on the head, which a head-only fit changes and the trunk does not.
    """
    trunk, preprocess = model.net.trunk, model.bundle.preprocess
    calibration, held = split_sample(paths)
    key = sample_key(root, [*calibration, *held])
    folder = entry(trunk, preprocess, key)
    kept = read_gate(folder)
    if kept is not None and kept.get("model") == model.bundle.fingerprint:
        return kept
    calibration_images, _ = decode_sample(root, calibration, preprocess)
    held_images, _ = decode_sample(root, held, preprocess)
    if len(held_images) < 2 or len(calibration_images) + len(held_images) < MIN_SAMPLE:
        raise SimimgError(
            f"--precision int8 needs at least {MIN_SAMPLE} readable images to check the quantization on; "
            "use bf16 or fp32 for a collection this small"
        )
    reference = converted(trunk, preprocess)
    if kept is None:
        log.info(
            "quantizing the trunk to int8 on %d images of the collection and checking it on %d others "
            "(once per model and machine)",
            len(calibration_images),
            len(held_images),
        )
        quantized = quantize(reference, calibration_images)
    else:  # this trunk, quantized on this sample, judged for another model (a new head): only the figures are new
        log.info("checking the kept int8 trunk for this model's classifier on %d images", len(held_images))
        quantized = read_quantized(folder)
    figures = gate_quantization(model.net, reference, quantized, calibration_images, held_images)
    record = {"sample": key, "model": model.bundle.fingerprint, **figures.to_dict()}
    record |= {"calibration": len(calibration_images), "nncf": _nncf_version()}
    if kept is None:
        keep(folder, quantized, record)
    log.info("int8 gate: %s: %s", "passed" if figures.passed else "refused", figures.describe())
    return record


def gate_quantization(
    net: Net, reference: ov.Model, quantized: ov.Model, calibration: np.ndarray, held: np.ndarray
) -> GateFigures:
    """The gate's figures for `quantized` against the float32 `reference`: the `held` images are the queries,
    those and the `calibration` images the gallery (uint8 NCHW both)."""
    images = np.concatenate([held, calibration])
    vectors, logits = [], []
    for model, precision in ((reference, "fp32"), (quantized, "int8")):
        features = compile_model(model, precision)(torch.from_numpy(images)).float()
        vectors.append(torch.nn.functional.normalize(features, dim=1).numpy())
        with torch.inference_mode():
            logits.append(net.logits(features).float().numpy() if net.head is not None else None)
    return gate_figures(vectors[0], vectors[1], np.arange(len(held)), logits[0], logits[1])


def _figures(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record[name] for name in GateFigures.__dataclass_fields__}


def _nncf_version() -> str:
    version: str = import_nncf().__version__
    return version
