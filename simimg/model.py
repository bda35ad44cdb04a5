"""Backbones, where their weights come from, and the model bundle that carries a model with its preprocessing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import models

from simimg.errors import SimimgError
from simimg.fsutil import atomic_target, atomic_write_bytes
from simimg.preprocess import Preprocess

log = logging.getLogger(__name__)

BUNDLE_JSON = "model.json"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_FORMAT = 1
DEFAULT_ARCH = "densenet121"
RANDOM_INIT_SEED = 0

ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], models.WeightsEnum]] = {
    "densenet121": (models.densenet121, models.DenseNet121_Weights.IMAGENET1K_V1),
    "densenet169": (models.densenet169, models.DenseNet169_Weights.IMAGENET1K_V1),
    "densenet201": (models.densenet201, models.DenseNet201_Weights.IMAGENET1K_V1),
    "densenet161": (models.densenet161, models.DenseNet161_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "vgg16": (models.vgg16, models.VGG16_Weights.IMAGENET1K_V1),
}

# Old torchvision DenseNet checkpoints name layers 'norm.1'; current modules say 'norm1'.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class Net(nn.Module):
    """A torchvision backbone split at its last linear layer: `trunk` gives the embedding, `head` the logits."""

    def __init__(self, trunk: nn.Module, dim: int, num_classes: int = 0) -> None:
        super().__init__()
        self.trunk = trunk
        self.dim = dim
        self.head = nn.Linear(dim, num_classes) if num_classes else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features that feed the classifier (1024-d for densenet121), not normalised."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise SimimgError("this model has no trained classifier: run `simimg train` first")
        return self.head(self.trunk(x))


@dataclass(frozen=True)
class ModelBundle:
    """Everything needed to rebuild a model and its preprocessing exactly; saved as model.json."""

    arch: str
    classes: tuple[str, ...]
    preprocess: Preprocess
    source: str
    fingerprint: str
    info: dict = field(default_factory=dict, compare=False)

    @property
    def has_classifier(self) -> bool:
        return len(self.classes) > 0

    def to_dict(self) -> dict:
        return {
            "format": BUNDLE_FORMAT,
            "arch": self.arch,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "source": self.source,
            "fingerprint": self.fingerprint,
            "embedding_dim": self.info.get("embedding_dim"),
            **{k: v for k, v in self.info.items() if k != "embedding_dim"},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ModelBundle":
        known = {"format", "arch", "classes", "preprocess", "source", "fingerprint"}
        return cls(
            arch=d["arch"],
            classes=tuple(d["classes"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            source=d["source"],
            fingerprint=d["fingerprint"],
            info={k: v for k, v in d.items() if k not in known},
        )


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
    return LoadedModel(net, describe(net, arch, (), Preprocess.for_image_size(image_size), source, weights=weights))


def describe(net: Net, arch: str, classes: tuple[str, ...], preprocess: Preprocess, source: str, **info) -> ModelBundle:
    """A bundle for `net` as it is now, with a fresh fingerprint."""
    return ModelBundle(arch, tuple(classes), preprocess, source, fingerprint(net, arch, preprocess),
                       {"embedding_dim": net.dim, **info})


def fingerprint(net: Net, arch: str, preprocess: Preprocess) -> str:
    """Identity of the embedding function: architecture, preprocessing and every trunk tensor."""
    h = hashlib.sha256(json.dumps([arch, preprocess.to_dict()], sort_keys=True).encode())
    for key, tensor in sorted(net.trunk.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_bundle(directory: str | Path, net: Net, bundle: ModelBundle) -> None:
    """Write weights then metadata, each atomically.

    The weights file also carries the whole bundle description, so a crash between the two renames leaves a
    bundle that still loads (as the new model) instead of a stale model.json beside new weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    with atomic_target(directory / BUNDLE_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"fingerprint": bundle.fingerprint, "bundle": json.dumps(bundle.to_dict())})
    atomic_write_bytes(directory / BUNDLE_JSON, json.dumps(bundle.to_dict(), indent=2).encode())


def read_bundle(directory: str | Path) -> ModelBundle:
    """Just the metadata, cheap: for listings and checks."""
    path = Path(directory) / BUNDLE_JSON
    try:
        return ModelBundle.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise SimimgError(f"no model bundle at {path.parent} (model.json is missing)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise SimimgError(f"model bundle {path} is corrupt ({err}); rebuild it with `simimg train` or `simimg index`") from None


def load_bundle(directory: str | Path) -> LoadedModel:
    """Rebuild the exact model a bundle describes and check its weights against the recorded fingerprint."""
    directory = Path(directory)
    bundle = read_bundle(directory)
    try:
        state = load_file(str(directory / BUNDLE_WEIGHTS))
        with safe_open(str(directory / BUNDLE_WEIGHTS), "pt") as f:
            carried = (f.metadata() or {}).get("bundle")
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise SimimgError(f"model bundle {directory} has unreadable weights ({err}); rebuild it") from None
    if carried:
        written_with_weights = ModelBundle.from_dict(json.loads(carried))
        if written_with_weights.fingerprint != bundle.fingerprint:
            log.warning("model.json in %s is older than its weights (an interrupted save): using the weights' own "
                        "description", directory)
            bundle = written_with_weights
    builder, _ = _architecture(bundle.arch)
    trunk, dim = _split_last_linear(bundle.arch, builder(weights=None))
    net = Net(trunk, dim, len(bundle.classes))
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise SimimgError(f"model bundle {directory} does not match its model.json: {str(err)[:200]}") from None
    actual = fingerprint(net, bundle.arch, bundle.preprocess)
    if actual != bundle.fingerprint:
        raise SimimgError(f"model bundle {directory} is corrupted: its weights' fingerprint is {actual}, "
                          f"model.json says {bundle.fingerprint}; rebuild it")
    net.eval()
    return LoadedModel(net, bundle)


def with_classes(loaded: LoadedModel, classes: tuple[str, ...]) -> LoadedModel:
    """A fresh linear head for `classes` on the same trunk."""
    net = loaded.net
    net.head = nn.Linear(net.dim, len(classes)) if classes else None
    return LoadedModel(net, replace(loaded.bundle, classes=tuple(classes)))


def weights_file(arch: str) -> Path:
    """Where torchvision looks for an architecture's ImageNet weights: $TORCH_HOME/hub/checkpoints/<file>."""
    _, enum = _architecture(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)


def _architecture(arch: str) -> tuple[Callable[..., nn.Module], models.WeightsEnum]:
    try:
        return ARCHITECTURES[arch]
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


def _imagenet_model(builder: Callable[..., nn.Module], arch: str, enum: models.WeightsEnum, **kwargs) -> nn.Module:
    """torchvision's own loader on the cached file; a damaged or wrong file there is the user's to replace."""
    enum = _cached_or_downloadable(arch, enum)
    try:
        return builder(weights=enum, **kwargs)
    except Exception as err:  # noqa: BLE001 - unpickling and shape errors alike mean a bad file
        why = " ".join(str(err).split())[:200]
        raise SimimgError(f"the cached ImageNet weights {weights_file(arch)} cannot be loaded into {arch} "
                          f"({why}); delete it so it is fetched again, or put "
                          f"{enum.url} there, or use --weights none") from None


def _missing_weights_message(arch: str, enum: models.WeightsEnum, target: Path, why: str) -> str:
    return (f"ImageNet weights for {arch} are not cached and cannot be fetched ({why}). "
            f"Download {enum.url} on a connected machine and put it at {target} "
            f"(or set TORCH_HOME to a folder whose hub/checkpoints/ holds {target.name}); "
            f"or use --weights none to start from random init, or --weights PATH for an earlier simimg model.")


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
    net.head = None
    preprocess = Preprocess.for_image_size(image_size)
    return LoadedModel(net, describe(net, bundle.arch, (), preprocess, f"bundle:{bundle.fingerprint}",
                                     weights=str(directory)))


def _load_torchvision_state_dict(tv_model: nn.Module, path: Path) -> None:
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
        dim = tv_model.classifier.in_features
        tv_model.classifier = nn.Identity()
    elif arch.startswith("resnet"):
        dim = tv_model.fc.in_features
        tv_model.fc = nn.Identity()
    else:
        dim = tv_model.classifier[-1].in_features
        tv_model.classifier[-1] = nn.Identity()
    return tv_model, dim
