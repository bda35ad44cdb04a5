"""Where a model looks: a class activation map of a class, or of the cosine similarity between two images (the
"similarity maps" of the retrieval literature), over the image itself and at its own size.

The maps come from the `grad-cam` library (Grad-CAM by default) on the serving model's last convolutional block.
They are computed on exactly what the model sees, the centre crop of the resized image, and put back where that
crop came from: outside it the map is zero, since the model never saw those pixels.

A map can say nothing: a one-cell feature map, a score whose gradient vanishes (an image against itself, where
the cosine is at its maximum), or one every region lowers. The library still scales such a map to [0, 1], which
draws noise or a uniform colour; `informative` tells them apart, and `Explanation.informative` carries its answer.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from simimg.choices import EXPLAIN_METHODS
from simimg.dataset.images import to_rgb
from simimg.dataset.preprocess import Preprocess
from simimg.errors import SimimgError
from simimg.models.net import LoadedModel, Net

log = logging.getLogger(__name__)

METHODS = EXPLAIN_METHODS
# A map the library scaled to [0, 1] spans ~1 when it singles out a region and ~0 when it does not (it divides by
# its own range plus 1e-7), so any threshold well inside (0, 1) tells the two apart.
FLAT_SPAN = 0.5
# A score (a cosine, a logit) is of order 1, where float32 steps are ~1e-7: regions whose first-order shares of it
# differ by less than ten such steps differ by rounding alone. Random-init densenet features against a real
# neighbour (cosine 0.97-0.998) differ by ~1e-3, against the image itself by under 1e-8.
NOISE_SPAN = 1e-6


@dataclass(frozen=True)
class Explanation:
    """A map of where the model looked; `score` is the class's probability, or the two images' cosine."""

    kind: str  # "class" or "similarity"
    target: str  # the explained class, or the other image
    score: float
    heatmap: np.ndarray  # H x W float32 in [0, 1], the explained image's size
    method: str
    layer: str
    informative: bool  # False: the map singles out no region (see `informative`), and is all zero

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL says it."""
        return self.heatmap.shape[1], self.heatmap.shape[0]

    def resized(self, size: tuple[int, int]) -> Explanation:
        """The same map over the same image decoded at another size (a JPEG decoded in full, say)."""
        if size == self.size:
            return self
        resized = Image.fromarray(self.heatmap).resize(size, Image.Resampling.BILINEAR)
        return replace(self, heatmap=np.clip(np.asarray(resized, np.float32), 0.0, 1.0))

    def overlay(self, image: Image.Image, image_weight: float = 0.5) -> Image.Image:
        """This map in colour over `image` (the image it explains, at the map's size: see `resized`)."""
        return overlay(image, self.heatmap, image_weight)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "score": round(self.score, 6),
            "method": self.method,
            "layer": self.layer,
            "size": list(self.size),
            "informative": self.informative,
        }


def explain_class(
    model: LoadedModel,
    image: Image.Image,
    label: str | None = None,
    method: str = "gradcam",
    device: torch.device = torch.device("cpu"),
) -> Explanation:
    """The map of `label` (default: the predicted class) over `image`."""
    classes = model.bundle.classes
    if not classes:
        raise SimimgError(
            "this model has no classifier, so there is no class to explain: explain a similarity to "
            "another image instead, or train a classifier (`simimg train DATA_DIR --name N --head-only`)"
        )
    if label is not None and label not in classes:
        raise SimimgError(f"unknown class {label!r}: the model knows {', '.join(classes)}")
    net, x = _copy(model.net, device), _input(image, model.bundle.preprocess, device)
    scores = _Scores(net)
    with torch.no_grad():
        probs = torch.softmax(scores(x).float(), dim=1)[0]
    index = classes.index(label) if label is not None else int(probs.argmax())
    return _explain(scores, model, x, index, image.size, method, "class", classes[index], float(probs[index]))


def explain_similarity(
    model: LoadedModel,
    image: Image.Image,
    other: Image.Image,
    other_name: str,
    method: str = "gradcam",
    device: torch.device = torch.device("cpu"),
) -> Explanation:
    """The map over `image` of its cosine similarity to `other` (whose embedding stays fixed)."""
    net, preprocess = _copy(model.net, device), model.bundle.preprocess
    with torch.no_grad():
        reference = nn.functional.normalize(net.embed(_input(other, preprocess, device)).float(), dim=1)
    x = _input(image, preprocess, device)
    scores = _Scores(net, reference)
    with torch.no_grad():
        score = float(scores(x)[0, 0])
    return _explain(scores, model, x, 0, image.size, method, "similarity", other_name, score)


def informative(heatmap: np.ndarray, contributions: np.ndarray) -> bool:
    """Whether a map says anything: its regions' first-order shares of the score (gradient x activation) differ
    by more than float32 noise, and the method's map, scaled to [0, 1], is not uniform (as it is when every region
    lowers the score)."""
    return not is_flat(contributions, NOISE_SPAN) and not is_flat(heatmap, FLAT_SPAN)


def is_flat(values: np.ndarray, min_span: float) -> bool:
    """True for values that single out nothing: none, any not finite, or all within `min_span` of each other."""
    if values.size == 0 or not np.isfinite(values).all():
        return True
    return float(values.max() - values.min()) < min_span


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
    top, left = round((rh - crop) / 2.0), round((rw - crop) / 2.0)  # torchvision's center_crop
    frame = np.zeros((rh, rw), np.float32)
    frame[top : top + crop, left : left + crop] = cam
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


def _explain(
    scores: _Scores,
    model: LoadedModel,
    x: torch.Tensor,
    index: int,
    size: tuple[int, int],
    method: str,
    kind: str,
    target: str,
    score: float,
) -> Explanation:
    if method not in METHODS:
        raise SimimgError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    name, layer = target_layer(scores.net, model.bundle.arch)
    cam, contributions = _cam(scores, layer, x, index, method)
    meaningful = informative(cam, contributions)
    if not meaningful:  # the library scaled noise, or nothing, to [0, 1]: show nothing rather than that
        cam = np.zeros_like(cam)
    heatmap = to_image_frame(cam, size, model.bundle.preprocess)
    log.info("%s map of %s (%.3f) by %s on %s%s", kind, target, score, method, name, "" if meaningful else ": flat")
    return Explanation(kind, target, score, heatmap, method, name, meaningful)


def _cam(scores: _Scores, layer: nn.Module, x: torch.Tensor, index: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The crop-sized map in [0, 1] of output `index` at `layer`, by the grad-cam library, and the layer's
    contributions (what `informative` judges the map by)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}[method]
    with torch.enable_grad(), cam_class(model=scores, target_layers=[layer]) as cam:
        scaled = cam(input_tensor=x.requires_grad_(True), targets=[ClassifierOutputTarget(index)])[0]
        saved = cam.activations_and_grads  # what the library hooked; released when the block ends
        return scaled, _contributions(saved.activations[0], saved.gradients[0])


def _contributions(activations: torch.Tensor, gradients: torch.Tensor) -> np.ndarray:
    """Each location's first-order share of the score (gradient x activation summed over channels), in the
    score's units: unlike the library's maps, never rescaled, and the same whichever method draws the map."""
    return (activations.float() * gradients.float()).sum(dim=1)[0].numpy()


def _copy(net: Net, device: torch.device) -> Net:
    """A private copy: grad-cam hooks its layer, and the served network answers other threads meanwhile."""
    return copy.deepcopy(net).to(device).eval()


def _input(image: Image.Image, preprocess: Preprocess, device: torch.device) -> torch.Tensor:
    return preprocess.normalize(preprocess.to_uint8(to_rgb(image))[None].to(device))
