"""Backbones, where their weights come from, and the model bundle that carries a model with its preprocessing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import models

from simimg.choices import ARCHITECTURES, DEFAULT_ARCH
from simimg.dataset.preprocess import Preprocess
from simimg.errors import SimimgError
from simimg.fsutil import atomic_target, atomic_write_bytes
from simimg.models.bundle import BUNDLE_JSON, BUNDLE_WEIGHTS, ModelBundle, read_bundle

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0

BUILDERS: dict[str, tuple[Callable[..., nn.Module], models.WeightsEnum]] = {
    "densenet121": (models.densenet121, models.DenseNet121_Weights.IMAGENET1K_V1),
    "densenet169": (models.densenet169, models.DenseNet169_Weights.IMAGENET1K_V1),
    "densenet201": (models.densenet201, models.DenseNet201_Weights.IMAGENET1K_V1),
    "densenet161": (models.densenet161, models.DenseNet161_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "vgg16": (models.vgg16, models.VGG16_Weights.IMAGENET1K_V1),
}
assert tuple(BUILDERS) == ARCHITECTURES, "choices.ARCHITECTURES names what BUILDERS builds"

# Old torchvision DenseNet checkpoints name layers 'norm.1'; current modules say 'norm1'.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class Net(nn.Module):
    """A torchvision backbone split at its last linear layer: `trunk` gives the embedding, `head` the logits.

    `unit_head` heads read the L2-normalised embedding (a head fitted on the catalog's stored vectors); the others
    read the raw pooled features, as torchvision's classifier does.
    """

    def __init__(self, trunk: nn.Module, dim: int, num_classes: int = 0, unit_head: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.dim = dim
        self.head = nn.Linear(dim, num_classes) if num_classes else None
        self.unit_head = unit_head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features that feed the classifier (1024-d for densenet121), not normalised."""
        features: torch.Tensor = self.trunk(x)
        return features

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise SimimgError("this model has no trained classifier: run `simimg train` first")
        if self.unit_head:
            features = nn.functional.normalize(features.float(), dim=1)
        logits: torch.Tensor = self.head(features)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.trunk(x))


class LoadedModel(NamedTuple):
    """A network and the bundle that describes it: a model never travels without its preprocessing."""

    net: Net
    bundle: ModelBundle


def build_model(arch: str | None, weights: str, image_size: int = 224, memory_efficient: bool = False) -> LoadedModel:
    """Build a backbone from `weights`: 'imagenet' (torchvision's API), 'none' (seeded random init) or a PATH.

    A PATH is a simimg bundle folder (or its model.json) or a torchvision-format state dict.
    """
    bundle_dir = _bundle_dir(weights)
    if bundle_dir is not None:
        return _transfer_from_bundle(bundle_dir, arch, image_size)
    arch = arch or DEFAULT_ARCH
    builder, enum = _architecture(arch)
    kwargs = {"memory_efficient": memory_efficient} if arch.startswith("densenet") else {}
    if weights == "imagenet":
        tv_model, source = _imagenet_model(builder, arch, enum, **kwargs), f"torchvision:{enum}"
    elif weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            tv_model = builder(weights=None, **kwargs)
        source = f"random-init:seed={RANDOM_INIT_SEED}"
    else:
        tv_model = builder(weights=None, **kwargs)
        _load_torchvision_state_dict(tv_model, Path(weights))
        source = f"file:{Path(weights).name}"
    trunk, dim = _split_last_linear(arch, tv_model)
    net = Net(trunk, dim)
    preprocess = Preprocess.for_image_size(image_size)
    return LoadedModel(net, describe(net, arch, (), preprocess, source, "pretrained", weights=weights))


def describe(
    net: Net,
    arch: str,
    classes: tuple[str, ...],
    preprocess: Preprocess,
    source: str,
    kind: str,
    embedding: str | None = None,
    **info: Any,
) -> ModelBundle:
    """A bundle for `net` as it is now, with fresh fingerprints; pass `embedding` when the trunk is known unchanged."""
    embedding = embedding or embedding_fingerprint(net, arch, preprocess)
    created = datetime.now().astimezone().isoformat(timespec="milliseconds")
    return ModelBundle(
        arch,
        tuple(classes),
        preprocess,
        source,
        model_fingerprint(embedding, net, classes),
        embedding,
        kind,
        created,
        net.unit_head,
        {"embedding_dim": net.dim, **info},
    )


def embedding_fingerprint(net: Net, arch: str, preprocess: Preprocess) -> str:
    """Identity of the embedding function: architecture, preprocessing and every trunk tensor."""
    h = hashlib.sha256(json.dumps([arch, preprocess.to_dict()], sort_keys=True).encode())
    hash_tensors(h, net.trunk.state_dict())
    return h.hexdigest()[:16]


def model_fingerprint(embedding: str, net: Net, classes: tuple[str, ...]) -> str:
    """Identity of the whole model: its embedding, its classes and its head's tensors."""
    h = hashlib.sha256(json.dumps([embedding, list(classes), net.unit_head]).encode())
    if net.head is not None:
        hash_tensors(h, net.head.state_dict())
    return h.hexdigest()[:16]


def hash_tensors(h: hashlib._Hash, state: dict[str, torch.Tensor]) -> None:
    for key, tensor in sorted(state.items()):
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def save_bundle(directory: str | Path, net: Net, bundle: ModelBundle) -> None:
    """Write the weights (which also carry the bundle's description) and model.json into `directory`.

    Callers publish a model by writing its folder beside the final place and renaming it there (model_store).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    description = json.dumps(bundle.to_dict(), indent=2)
    with atomic_target(directory / BUNDLE_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"fingerprint": bundle.fingerprint, "bundle": description})
    atomic_write_bytes(directory / BUNDLE_JSON, description.encode())


def load_bundle(directory: str | Path) -> LoadedModel:
    """Rebuild the exact model a bundle describes and check its weights against both recorded fingerprints."""
    directory = Path(directory)
    bundle = read_bundle(directory)
    try:
        state = load_file(str(directory / BUNDLE_WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise SimimgError(f"model bundle {directory} has unreadable weights ({err}); rebuild it") from None
    net = net_from_state(bundle.arch, len(bundle.classes), bundle.unit_head, state, directory)
    embedding = embedding_fingerprint(net, bundle.arch, bundle.preprocess)
    actual = model_fingerprint(embedding, net, bundle.classes)
    if (embedding, actual) != (bundle.embedding, bundle.fingerprint):
        raise SimimgError(
            f"model bundle {directory} is corrupted: its weights' fingerprint is {actual}, "
            f"model.json says {bundle.fingerprint}; delete that folder or rebuild it"
        )
    net.eval()
    return LoadedModel(net, bundle)


def net_from_state(
    arch: str, num_classes: int, unit_head: bool, state: dict[str, torch.Tensor], where: str | Path
) -> Net:
    """The network a saved state dict describes, built on the meta device (no random init) and then filled."""
    builder, _ = _architecture(arch)
    with torch.device("meta"):
        trunk, dim = _split_last_linear(arch, builder(weights=None))
        net = Net(trunk, dim, num_classes, unit_head)
    try:
        net.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise SimimgError(f"model bundle {where} does not match its model.json: {str(err)[:200]}") from None
    return net


def with_classes(loaded: LoadedModel, classes: tuple[str, ...], unit_head: bool = False) -> LoadedModel:
    """A fresh linear head for `classes` on the same trunk (the bundle's fingerprints are renewed by `describe`)."""
    net = loaded.net
    net.head = nn.Linear(net.dim, len(classes)) if classes else None
    net.unit_head = unit_head
    return LoadedModel(net, replace(loaded.bundle, classes=tuple(classes), unit_head=unit_head))


def set_memory_efficient(net: nn.Module, enabled: bool) -> None:
    """DenseNet's checkpointed concatenation: less activation memory for some recompute; a no-op elsewhere."""
    for module in net.modules():
        if hasattr(module, "memory_efficient"):
            module.memory_efficient = enabled  # type: ignore[assignment]  # torch types attributes Tensor | Module


def imagenet_cached(arch: str) -> bool:
    """Whether torchvision will find the architecture's ImageNet weights without a download."""
    return weights_file(arch).is_file()


def weights_file(arch: str) -> Path:
    """Where torchvision looks for an architecture's ImageNet weights: $TORCH_HOME/hub/checkpoints/<file>."""
    _, enum = _architecture(arch)
    name: str = os.path.basename(enum.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _architecture(arch: str) -> tuple[Callable[..., nn.Module], models.WeightsEnum]:
    try:
        return BUILDERS[arch]
    except KeyError:
        raise SimimgError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def _cached_or_downloadable(arch: str, enum: models.WeightsEnum) -> models.WeightsEnum:
    """Fail early, and helpfully, when the weights file is neither cached nor downloadable."""
    target = weights_file(arch)
    if target.is_file():
        return enum
    if os.environ.get("SIMIMG_OFFLINE") == "1":
        raise SimimgError(_missing_weights_message(arch, enum, target, "SIMIMG_OFFLINE=1 is set"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(enum.url, str(target.with_suffix(".part")), progress=False)
        os.replace(target.with_suffix(".part"), target)
    except Exception as err:  # noqa: BLE001 - any network failure means the same thing to the user
        raise SimimgError(_missing_weights_message(arch, enum, target, f"download failed: {err}")) from None
    return enum


def _imagenet_model(builder: Callable[..., nn.Module], arch: str, enum: models.WeightsEnum, **kwargs: Any) -> nn.Module:
    """torchvision's own loader on the cached file; a damaged or wrong file there is the user's to replace."""
    enum = _cached_or_downloadable(arch, enum)
    try:
        return builder(weights=enum, **kwargs)
    except Exception as err:  # noqa: BLE001 - unpickling and shape errors alike mean a bad file
        why = " ".join(str(err).split())[:200]
        raise SimimgError(
            f"the cached ImageNet weights {weights_file(arch)} cannot be loaded into {arch} "
            f"({why}); delete it so it is fetched again, or put "
            f"{enum.url} there, or use --weights none"
        ) from None


def _missing_weights_message(arch: str, enum: models.WeightsEnum, target: Path, why: str) -> str:
    return (
        f"ImageNet weights for {arch} are not cached and cannot be fetched ({why}). "
        f"Download {enum.url} on a connected machine and put it at {target} "
        f"(or set TORCH_HOME to a folder whose hub/checkpoints/ holds {target.name}); "
        f"or use --weights none to start from random init, or --weights PATH for an earlier simimg model."
    )


def _bundle_dir(weights: str) -> Path | None:
    if weights in ("imagenet", "none"):
        return None
    path = Path(weights).expanduser()
    if path.is_dir() and (path / BUNDLE_JSON).is_file():
        return path
    if path.name == BUNDLE_JSON and path.is_file():
        return path.parent
    if not path.exists():
        raise SimimgError(f"--weights {weights}: no such file; use imagenet, none, or a path to weights or a bundle")
    return None


def _transfer_from_bundle(directory: Path, arch: str | None, image_size: int) -> LoadedModel:
    """Start from an earlier simimg model's trunk: the offline route to a pretrained start."""
    net, bundle = load_bundle(directory)
    if arch and arch != bundle.arch:
        raise SimimgError(f"--weights {directory} is a {bundle.arch} model; it cannot start a {arch}")
    net.head, net.unit_head = None, False
    preprocess = Preprocess.for_image_size(image_size)
    return LoadedModel(
        net,
        describe(
            net, bundle.arch, (), preprocess, f"bundle:{bundle.fingerprint}", "pretrained", weights=str(directory)
        ),
    )


def _load_torchvision_state_dict(tv_model: nn.Module, path: Path) -> None:
    state: Any  # whatever the file holds: a state dict, or a checkpoint dict with one under "state_dict"
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
        raise SimimgError(f"--weights {path}: cannot read a state dict ({err})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k.removeprefix("module.")): v for k, v in state.items()}
    try:
        tv_model.load_state_dict(state)
    except RuntimeError as err:
        raise SimimgError(f"--weights {path} does not fit this architecture: {str(err)[:300]}") from None


def _split_last_linear(arch: str, tv_model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the final linear layer with Identity, so the model's output is the embedding."""
    if arch.startswith("densenet"):
        dim = _in_features(tv_model.classifier)
        tv_model.classifier = nn.Identity()
    elif arch.startswith("resnet"):
        dim = _in_features(tv_model.fc)
        tv_model.fc = nn.Identity()
    else:
        classifier = tv_model.classifier
        assert isinstance(classifier, nn.Sequential), f"{arch}'s classifier is {type(classifier).__name__}"
        dim = _in_features(classifier[-1])
        classifier[-1] = nn.Identity()
    return tv_model, dim


def _in_features(layer: torch.Tensor | nn.Module) -> int:
    assert isinstance(layer, nn.Linear), f"the last layer is {type(layer).__name__}, not Linear"
    return layer.in_features
