"""The exact preprocessing a model was trained with; it travels inside every model bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch loads on first use: a bundle's metadata is read by commands that never run a model
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, center-crop, then normalise on the device (torchvision's ImageNet recipe)."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_image_size(cls, image_size: int) -> Preprocess:
        """torchvision's 256/224 resize-to-crop ratio at any crop size."""
        return cls(crop_size=image_size, resize_size=round(image_size * 256 / 224))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(int(d["crop_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image to a CHW uint8 tensor of crop_size; normalisation happens later, on the device."""
        import torch

        return torch.from_numpy(self.to_array(image))

    def to_array(self, image: Image.Image) -> np.ndarray:
        """`to_uint8` without torch (the ray engine's decode tasks never load it): the calls torchvision's
        resize, center_crop and pil_to_tensor make on a PIL image, pixel for pixel (tests/test_preprocess.py)."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        size = self.resize_size, int(self.resize_size * long / short)  # (short side, long side), as torchvision
        width, height = size if width <= height else size[::-1]
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        crop = self.crop_size  # beyond the image, torchvision pads with zeros first; PIL's crop fills them in
        left = -((crop - width) // 2) if crop > width else round((width - crop) / 2.0)
        top = -((crop - height) // 2) if crop > height else round((height - crop) / 2.0)
        pixels = np.array(image.crop((left, top, left + crop, top + crop)))
        chw: np.ndarray = (pixels[:, :, None] if pixels.ndim == 2 else pixels).transpose(2, 0, 1)
        return chw

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """A uint8 NCHW batch to normalised float32, on whatever device the batch is on."""
        import torch

        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1) * 255
        return (batch.float() - mean) / std
