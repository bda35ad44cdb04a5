"""`simimg export`: a kept model for use elsewhere, as ONNX or as its safetensors bundle.

The ONNX graph takes a float32 NCHW batch already resized, cropped and normalised (the preprocessing is written in
the bundle and in the ONNX metadata), and returns the unit-length embedding and, when the model has a classifier,
its logits. Every export is checked: onnxruntime must give the same embeddings (and logits) as torch on a batch.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from simimg.choices import EXPORT_FORMATS
from simimg.errors import SimimgError
from simimg.fsutil import atomic_target
from simimg.models.net import LoadedModel

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
OPSET = 18
TOLERANCE = 1e-4


class _Exported(nn.Module):
    """What the ONNX graph computes: the unit embedding, and logits when there is a head."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        # torch's Module.to overloads lack (device, memory_format=...), which it takes
        self.net = loaded.net.eval().to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.net.embed(images)
        embedding = nn.functional.normalize(features, dim=1)
        return (embedding, self.net.logits(features)) if self.net.head is not None else (embedding,)


def export_onnx(loaded: LoadedModel, out: Path) -> dict[str, Any]:
    """Write `out` (atomically) and check it with onnxruntime; returns what was checked."""
    import onnx
    import onnxruntime

    module, size = _Exported(loaded).eval(), loaded.bundle.preprocess.crop_size  # eval: export restores the mode
    outputs = ["embedding", "logits"] if loaded.net.head is not None else ["embedding"]
    sample = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with atomic_target(out) as tmp:
        batch_axes = {name: {0: "batch"} for name in ["images", *outputs]}
        torch.onnx.export(
            module,
            (sample,),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes=batch_axes,
        )
        graph = onnx.load(str(tmp))
        onnx.helper.set_model_props(graph, {"simimg_bundle": json.dumps(loaded.bundle.to_dict())})
        onnx.save(graph, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        check = sample[:1].repeat(3, 1, 1, 1) + torch.linspace(0, 1, 3).view(3, 1, 1, 1)  # a batch size not traced
        difference = _max_difference(module, session, check)
    log.info("exported %s to %s (onnxruntime agrees to %.2g)", loaded.bundle.fingerprint, out, difference)
    return {
        "format": "onnx",
        "path": str(out),
        "outputs": outputs,
        "max_abs_difference": difference,
        "input": {
            "name": "images",
            "shape": ["batch", 3, size, size],
            "preprocess": loaded.bundle.preprocess.to_dict(),
        },
    }


def _max_difference(module: nn.Module, session: onnxruntime.InferenceSession, batch: torch.Tensor) -> float:
    """Largest absolute difference between torch's and onnxruntime's outputs; above TOLERANCE is an error."""
    with torch.inference_mode():
        expected = [t.numpy() for t in module(batch)]
    got = session.run(None, {"images": batch.numpy()})
    difference = max(float(np.abs(a - b).max()) for a, b in zip(expected, got))
    if difference > TOLERANCE:
        raise SimimgError(
            f"the ONNX export disagrees with the model (max difference {difference:.3g}); it was not kept"
        )
    return difference


def export_bundle(model_dir: Path, out: Path) -> dict[str, Any]:
    """The model folder as one zip (model.json, model.safetensors, and its pictures and job record)."""
    with atomic_target(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(model_dir.iterdir()):
            archive.write(file, f"{model_dir.name}/{file.name}")
    return {"format": "bundle", "path": str(out), "files": sorted(f.name for f in model_dir.iterdir())}
