"""model.py: every backbone's embedding size, the three weight sources (the real offline path included), bundles.

No ImageNet weights can be downloaded here, so the offline tests write a torchvision-format checkpoint under a
temporary TORCH_HOME with the exact file name torchvision's weights API looks for.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from simimg.choices import ARCHITECTURES
from simimg.dataset.preprocess import Preprocess
from simimg.errors import SimimgError
from simimg.models.bundle import read_bundle
from simimg.models.net import (
    build_model,
    describe,
    embedding_fingerprint,
    load_bundle,
    save_bundle,
    weights_file,
    with_classes,
)

EMBEDDING_DIMS = {
    "densenet121": 1024,
    "densenet169": 1664,
    "densenet201": 1920,
    "densenet161": 2208,
    "resnet50": 2048,
    "vgg16": 4096,
}
DENSENET121_FILE = "densenet121-a639ec97.pth"
_NEW_DENSENET_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")


def densenet121_state(seed: int) -> dict[str, torch.Tensor]:
    """A seeded random densenet121 state dict: stands in for the ImageNet file, whose values we never need."""
    torch.manual_seed(seed)
    return models.densenet121(weights=None).state_dict()


def old_style(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Like torchvision's published DenseNet checkpoints: 'norm.1' where modules now say 'norm1', and no
    BatchNorm 'num_batches_tracked' counters (they predate them)."""
    return {_NEW_DENSENET_KEY.sub(r"\1.\2.", k): v for k, v in state.items() if "num_batches_tracked" not in k}


def write_densenet121_checkpoint(torch_home: Path, seed: int = 7, old_keys: bool = True) -> dict[str, torch.Tensor]:
    """Put a checkpoint where torchvision looks for DenseNet121_Weights.IMAGENET1K_V1; returns its (new-style) state."""
    state = densenet121_state(seed)
    target = torch_home / "hub" / "checkpoints" / DENSENET121_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(old_style(state) if old_keys else state, target)
    return state


def assert_trunk_equals(net_trunk: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the trunk is the checkpoint's; only the dropped classifier is missing."""
    trunk = net_trunk.state_dict()
    assert set(trunk) == {k for k in state if not k.startswith("classifier.")}
    for key, tensor in trunk.items():
        assert torch.equal(tensor, state[key]), key


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("SIMIMG_OFFLINE", "1")
    return home


# --- backbones ------------------------------------------------------------------------------------------
def test_every_architecture_is_documented():
    assert set(ARCHITECTURES) == set(EMBEDDING_DIMS)


@pytest.mark.parametrize(
    "arch", [a if a != "vgg16" else pytest.param(a, marks=pytest.mark.slow) for a in sorted(EMBEDDING_DIMS)]
)
def test_each_backbone_embeds_at_its_documented_size(arch):
    net, bundle = build_model(arch, "none", image_size=32)
    with torch.inference_mode():
        out = net.eval().embed(torch.rand(1, 3, 32, 32))
    assert tuple(out.shape) == (1, EMBEDDING_DIMS[arch]) == (1, net.dim)
    assert bundle.info["embedding_dim"] == net.dim and bundle.arch == arch and bundle.classes == ()


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b = build_model(None, "none", 32), build_model(None, "none", 32)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.bundle.arch == "densenet121" and a.bundle.source.startswith("random-init")
    assert a.bundle.fingerprint == b.bundle.fingerprint


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(SimimgError, match="unknown architecture 'alexnet'; choose one of densenet121"):
        build_model("alexnet", "none")


# --- ImageNet weights through torchvision's API, offline ---------------------------------------------------
def test_weights_file_is_where_torchvision_looks(torch_home):
    assert weights_file("densenet121") == torch_home / "hub" / "checkpoints" / DENSENET121_FILE
    assert weights_file("resnet50").name == models.ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1]


@pytest.mark.parametrize("old_keys", [True, False])
def test_imagenet_weights_load_from_the_cached_file(torch_home, old_keys):
    state = write_densenet121_checkpoint(torch_home, seed=3, old_keys=old_keys)
    net, bundle = build_model("densenet121", "imagenet", 32)
    assert_trunk_equals(net.trunk, state)
    assert bundle.source == "torchvision:DenseNet121_Weights.IMAGENET1K_V1"


def test_missing_imagenet_file_offline_names_the_file_folder_and_alternative(torch_home):
    with pytest.raises(SimimgError) as err:
        build_model("densenet121", "imagenet", 32)
    message = str(err.value)
    target = torch_home / "hub" / "checkpoints" / DENSENET121_FILE
    assert str(target) in message and str(target.parent) in message and "--weights none" in message
    assert models.DenseNet121_Weights.IMAGENET1K_V1.url in message and "\n" not in message


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_a_bad_cached_file_is_a_user_error(torch_home, content):
    target = torch_home / "hub" / "checkpoints" / DENSENET121_FILE
    target.parent.mkdir(parents=True)
    if content is None:
        torch.save(models.resnet18().state_dict(), target)
    else:
        target.write_bytes(content)
    with pytest.raises(SimimgError, match=f"{re.escape(str(target))} cannot be loaded into densenet121"):
        build_model("densenet121", "imagenet", 32)


# --- --weights PATH -----------------------------------------------------------------------------------------
def test_weights_path_takes_a_torchvision_state_dict_in_any_common_wrapping(tmp_path):
    state = densenet121_state(seed=5)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in old_style(state).items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    net, bundle = build_model("densenet121", str(tmp_path / "w.pth"), 32)
    assert_trunk_equals(net.trunk, state)
    assert bundle.source == "file:w.pth"


def test_weights_path_takes_safetensors(tmp_path):
    state = densenet121_state(seed=6)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    assert_trunk_equals(build_model("densenet121", str(tmp_path / "w.safetensors"), 32).net.trunk, state)


def test_weights_path_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    torch.save(models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    cases = {
        "nope.pth": "no such file",
        "junk.pth": "cannot read a state dict",
        "resnet18.pth": "does not fit this architecture",
    }
    for name, phrase in cases.items():
        with pytest.raises(SimimgError, match=phrase):
            build_model("densenet121", str(tmp_path / name), 32)


# --- fingerprints and bundles -------------------------------------------------------------------------------
def test_embedding_fingerprint_follows_weights_and_preprocessing_only(tmp_path):
    loaded = build_model("densenet121", "none", 32)
    emb = loaded.bundle.embedding
    assert embedding_fingerprint(loaded.net, "densenet121", Preprocess.for_image_size(32)) == emb
    assert embedding_fingerprint(loaded.net, "densenet121", Preprocess.for_image_size(64)) != emb
    assert build_model("densenet121", "none", 64).bundle.embedding != emb
    torch.save(densenet121_state(seed=1), tmp_path / "w.pth")
    assert build_model("densenet121", str(tmp_path / "w.pth"), 32).bundle.embedding != emb


def test_a_new_head_is_a_new_model_with_the_same_embedding():
    base = build_model("densenet121", "none", 32)
    headed = with_classes(build_model("densenet121", "none", 32), ("a", "b"), unit_head=True)
    bundle = describe(headed.net, "densenet121", ("a", "b"), base.bundle.preprocess, "test", "head")
    assert bundle.embedding == base.bundle.embedding and bundle.fingerprint != base.bundle.fingerprint
    renamed = describe(headed.net, "densenet121", ("x", "y"), base.bundle.preprocess, "test", "head")
    assert renamed.fingerprint != bundle.fingerprint  # classes are part of the model


def test_bundle_round_trip_rebuilds_the_same_model(tmp_path):
    net, bundle = with_classes(build_model("densenet121", "none", 32), ("ants", "bees"))
    bundle = describe(net, bundle.arch, bundle.classes, bundle.preprocess, bundle.source, "fine-tuned")
    save_bundle(tmp_path, net, bundle)
    assert read_bundle(tmp_path) == bundle
    again, again_bundle = load_bundle(tmp_path)
    assert again_bundle == bundle and again_bundle.has_classifier and not again.training
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), net.eval()(x))


def test_a_unit_head_reads_the_normalised_embedding_after_a_round_trip(tmp_path):
    net, bundle = with_classes(build_model("densenet121", "none", 32), ("a", "b"), unit_head=True)
    bundle = describe(net, bundle.arch, bundle.classes, bundle.preprocess, bundle.source, "head")
    save_bundle(tmp_path, net, bundle)
    again, again_bundle = load_bundle(tmp_path)
    assert again.unit_head and again_bundle.unit_head
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        features = again.embed(x)
        expected = again.head(torch.nn.functional.normalize(features, dim=1))
        torch.testing.assert_close(again(x), expected)
        torch.testing.assert_close(again(x), net.eval()(x))


def test_altered_weights_or_an_older_bundle_format_are_refused(tmp_path):
    net, bundle = with_classes(build_model("densenet121", "none", 32), ("a", "b"))
    bundle = describe(net, bundle.arch, bundle.classes, bundle.preprocess, bundle.source, "fine-tuned")
    save_bundle(tmp_path, net, bundle)
    with torch.no_grad():
        net.head.bias += 1
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SimimgError, match="corrupted"):
        load_bundle(tmp_path)
    text = (tmp_path / "model.json").read_text().replace('"format": 2', '"format": 1')
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(SimimgError, match="bundle format 1"):
        read_bundle(tmp_path)


def test_weights_path_takes_an_earlier_bundle(tmp_path):
    net, bundle = build_model("densenet121", "none", 32)
    save_bundle(tmp_path / "old", net, bundle)
    started = build_model(None, str(tmp_path / "old"), 64)
    assert started.bundle.arch == "densenet121" and started.bundle.source == f"bundle:{bundle.fingerprint}"
    assert started.bundle.kind == "pretrained"
    assert_trunk_equals(started.net.trunk, net.trunk.state_dict())
    with pytest.raises(SimimgError, match="is a densenet121 model; it cannot start a resnet50"):
        build_model("resnet50", str(tmp_path / "old" / "model.json"), 64)
