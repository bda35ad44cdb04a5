"""preprocess.py: torchvision's resize/center-crop/normalise recipe, split between the CPU (uint8) and the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode, functional as F

from simimg.dataset.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def test_default_is_torchvision_imagenet_recipe():
    assert Preprocess() == Preprocess.for_image_size(224)
    assert (Preprocess().resize_size, Preprocess().crop_size) == (256, 224)
    assert Preprocess.for_image_size(64) == Preprocess(crop_size=64, resize_size=73)


def test_to_uint8_resizes_the_short_side_then_crops_the_centre():
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (100, 0, 200, 100))
    tensor = Preprocess.for_image_size(32).to_uint8(image)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 32, 32)
    assert tensor[0].float().mean() > 250 and tensor[2].float().mean() < 5


def test_normalize_matches_torchvision_on_float_images():
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(batch.float() / 255)
    got = Preprocess().normalize(batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_uint8_then_normalize_equals_the_whole_torchvision_transform():
    image = Image.frombytes("RGB", (90, 70), bytes(range(256)) * (90 * 70 * 3 // 256) + bytes(90 * 70 * 3 % 256))
    pre = Preprocess.for_image_size(48)
    reference = transforms.Compose(
        [
            transforms.Resize(pre.resize_size),
            transforms.CenterCrop(pre.crop_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )(image)
    torch.testing.assert_close(pre.normalize(pre.to_uint8(image).unsqueeze(0))[0], reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "pre"),
    [
        ((90, 70), Preprocess.for_image_size(48)),  # landscape, an odd margin to centre
        ((71, 203), Preprocess.for_image_size(32)),  # portrait, the long side truncated
        ((37, 37), Preprocess.for_image_size(32)),  # already the resize size: no resize
        ((500, 333), Preprocess()),
        ((30, 20), Preprocess(crop_size=40, resize_size=24)),  # a crop beyond the image: zeros around it
        ((31, 64), Preprocess(crop_size=33, resize_size=24)),  # beyond it on one side only
    ],
)
def test_to_array_is_torchvisions_resize_crop_and_pil_to_tensor_pixel_for_pixel(size, pre):
    """The ray engine's decode tasks (no torch) and the local engine (to_uint8) make torchvision's pixels."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    resized = F.resize(image, pre.resize_size, interpolation=InterpolationMode.BILINEAR)
    reference = F.pil_to_tensor(F.center_crop(resized, pre.crop_size))
    assert pre.to_array(image).shape == (3, pre.crop_size, pre.crop_size)
    assert torch.equal(torch.from_numpy(pre.to_array(image)), reference)
    assert torch.equal(pre.to_uint8(image), reference)


def test_dict_round_trip_through_json():
    pre = Preprocess.for_image_size(96)
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
