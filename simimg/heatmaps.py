"""Where a model looks: a class activation map of a class, or of the cosine similarity between two images (the
"similarity maps" of the retrieval literature), over the image itself and at its own size.

The maps come from the `grad-cam` library (Grad-CAM by default) on the serving model's last convolutional block.
They are computed on exactly what the model sees, the centre crop of the resized image, and put back where that
crop came from: outside it the map is zero, since the model never saw those pixels.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import nn

from simimg.errors import SimimgError
from simimg.images import to_rgb
from simimg.model import LoadedModel, Net
from simimg.preprocess import Preprocess

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++", "layercam")


@dataclass(frozen=True)
class Explanation:
    """A map of where the model looked; `score` is the class's probability, or the two images' cosine."""

    kind: str  # "class" or "similarity"
    target: str  # the explained class, or the other image
    score: float
    heatmap: np.ndarray  # H x W float32 in [0, 1], the explained image's size
    method: str
    layer: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL says it."""
        return self.heatmap.shape[1], self.heatmap.shape[0]

    def resized(self, size: tuple[int, int]) -> "Explanation":
        """The same map over the same image decoded at another size (a JPEG decoded in full, say)."""
        if size == self.size:
            return self
        resized = Image.fromarray(self.heatmap).resize(size, Image.Resampling.BILINEAR)
        return replace(self, heatmap=np.clip(np.asarray(resized, np.float32), 0.0, 1.0))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "score": round(self.score, 6), "method": self.method,
                "layer": self.layer, "size": list(self.size)}


def explain_class(model: LoadedModel, image: Image.Image, label: str | None = None, method: str = "gradcam",
                  device: torch.device = torch.device("cpu")) -> Explanation:
    """The map of `label` (default: the predicted class) over `image`."""
    classes = model.bundle.classes
    if not classes:
        raise SimimgError("this model has no classifier, so there is no class to explain: explain a similarity to "
                          "another image instead, or train a classifier (`simimg train DATA_DIR --name N --head-only`)")
    if label is not None and label not in classes:
        raise SimimgError(f"unknown class {label!r}: the model knows {', '.join(classes)}")
    net, x = _copy(model.net, device), _input(image, model.bundle.preprocess, device)
    scores = _Scores(net)
    with torch.no_grad():
        probs = torch.softmax(scores(x).float(), dim=1)[0]
    index = classes.index(label) if label is not None else int(probs.argmax())
    return _explain(scores, model, x, index, image.size, method, "class", classes[index], float(probs[index]))


def explain_similarity(model: LoadedModel, image: Image.Image, other: Image.Image, other_name: str,
                       method: str = "gradcam", device: torch.device = torch.device("cpu")) -> Explanation:
    """The map over `image` of its cosine similarity to `other` (whose embedding stays fixed)."""
    net, preprocess = _copy(model.net, device), model.bundle.preprocess
    with torch.no_grad():
        reference = nn.functional.normalize(net.embed(_input(other, preprocess, device)).float(), dim=1)
    x = _input(image, preprocess, device)
    scores = _Scores(net, reference)
    with torch.no_grad():
        score = float(scores(x)[0, 0])
    return _explain(scores, model, x, 0, image.size, method, "similarity", other_name, score)


def target_layer(net: Net, arch: str) -> tuple[str, nn.Module]:
    """The last convolutional block: `layer4` for ResNets, `features` for DenseNets and VGG."""
    name = "layer4" if arch.startswith("resnet") else "features"
    return f"trunk.{name}", getattr(net.trunk, name)


def to_image_frame(cam: np.ndarray, size: tuple[int, int], preprocess: Preprocess) -> np.ndarray:
    """A crop_size map put back where `preprocess` cut its centre crop from an image of `size` (w, h): an H x W
    map, zero outside the crop."""
    w, h = size
    short, long = sorted((w, h))
    resized_long = int(preprocess.resize_size * long / short)  # torchvision's resize of the shorter side
    rw, rh = (preprocess.resize_size, resized_long) if w <= h else (resized_long, preprocess.resize_size)
    crop = preprocess.crop_size
    top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))  # torchvision's center_crop
    frame = np.zeros((rh, rw), np.float32)
    frame[top:top + crop, left:left + crop] = cam
    full = Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(full, np.float32), 0.0, 1.0)


def overlay(image: Image.Image, heatmap: np.ndarray, image_weight: float = 0.5) -> Image.Image:
    """The heatmap in colour over the image (the grad-cam library's blend), at the image's size."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    pixels = np.asarray(to_rgb(image), np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(pixels, heatmap, use_rgb=True, image_weight=image_weight))


class _Scores(nn.Module):
    """What the map explains, as a model for grad-cam: the class logits, or the cosine to a fixed embedding."""

    def __init__(self, net: Net, reference: torch.Tensor | None = None) -> None:
        super().__init__()
        self.net, self.reference = net, reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net.embed(x)
        if self.reference is None:
            return self.net.logits(features)
        return nn.functional.normalize(features.float(), dim=1) @ self.reference.T


def _explain(scores: _Scores, model: LoadedModel, x: torch.Tensor, index: int, size: tuple[int, int], method: str,
             kind: str, target: str, score: float) -> Explanation:
    if method not in METHODS:
        raise SimimgError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    name, layer = target_layer(scores.net, model.bundle.arch)
    cam = _cam(scores, layer, x, index, method)
    heatmap = to_image_frame(cam, size, model.bundle.preprocess)
    log.info("%s map of %s (%.3f) by %s on %s", kind, target, score, method, name)
    return Explanation(kind, target, score, heatmap, method, name)


def _cam(scores: _Scores, layer: nn.Module, x: torch.Tensor, index: int, method: str) -> np.ndarray:
    """The crop-sized map in [0, 1] of output `index` at `layer`, by the grad-cam library."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}[method]
    with torch.enable_grad(), cam_class(model=scores, target_layers=[layer]) as cam:
        return cam(input_tensor=x.requires_grad_(True), targets=[ClassifierOutputTarget(index)])[0]


def _copy(net: Net, device: torch.device) -> Net:
    """A private copy: grad-cam hooks its layer, and the served network answers other threads meanwhile."""
    return copy.deepcopy(net).to(device).eval()


def _input(image: Image.Image, preprocess: Preprocess, device: torch.device) -> torch.Tensor:
    return preprocess.normalize(preprocess.to_uint8(to_rgb(image))[None].to(device))
