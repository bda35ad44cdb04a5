"""Images to L2-normalised float32 embeddings, in batches, with every unreadable file reported, never fatal."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from simimg.dataset.images import ImageInput, read_and_decode, read_inputs
from simimg.dataset.preprocess import Preprocess
from simimg.dataset.scan import Skipped
from simimg.models.device import Compute, memory_format_for, resolve_compute
from simimg.models.net import LoadedModel, Net, build_model

T = TypeVar("T")


class _End(Enum):
    """read_ahead's sentinel: the batches ran out."""

    END = 0


# FileDataset's item: (position, CHW uint8 tensor or None, sha256 hex or the failure reason)
FileItem = tuple[int, torch.Tensor | None, str]

# A model's embedding function as prepared for one Compute (`prepare_net`): uint8 NCHW images (on any device) in,
# the pooled features (not normalised) out, on the compute device.
Trunk = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EmbedSettings:
    """How to run the model over many files; the model and preprocessing come from the bundle."""

    compute: Compute
    batch_size: int = 64
    workers: int = 2
    compile: bool = False


@dataclass(frozen=True)
class EmbeddedBatch:
    """One batch's results: positions into the input list, their vectors and content hashes, and failures.

    `stats` holds each embedded file's (size, mtime_ns) when the reader recorded them before reading its bytes
    (the ray engine); None leaves the indexer to look. `logits` holds the head's logits, a row per vector, when
    they were asked for (bulk prediction: a head that reads the raw features needs them before normalisation).
    """

    positions: list[int]
    vectors: np.ndarray
    hashes: list[str]
    failures: list[tuple[int, str]]
    stats: list[tuple[int, int]] | None = None
    logits: np.ndarray | None = None


class ImageTransform(Protocol):
    """What FileDataset needs of a transform: Preprocess for evaluation, data.TrainAugment for training."""

    @property
    def resize_size(self) -> int: ...

    def to_uint8(self, image: Image.Image) -> torch.Tensor: ...


class FileDataset(Dataset[FileItem]):
    """Reads each file once: its bytes give both the content hash and the decoded image."""

    def __init__(self, paths: Sequence[Path], preprocess: ImageTransform) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> FileItem:
        """(position, CHW uint8 tensor or None, sha256 hex or the failure reason)."""
        return i, *read_and_decode(self.paths[i], self.preprocess.to_uint8, self.preprocess.resize_size)


def collate(
    items: list[FileItem],
) -> tuple[list[int], torch.Tensor, list[str], list[tuple[int, str]]]:
    """Stack the good images; pass the failures through beside them."""
    good = [(i, t, h) for i, t, h in items if t is not None]
    failures = [(i, reason) for i, t, reason in items if t is None]
    batch = torch.stack([t for _, t, _ in good]) if good else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return [i for i, _, _ in good], batch, [h for _, _, h in good], failures


@torch.inference_mode()
def infer(
    net: Net,
    batch: torch.Tensor,
    preprocess: Preprocess,
    compute: Compute,
    with_logits: bool = False,
    trunk: Trunk | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 NCHW (any device) to L2-normalised float32 embeddings on the device, and the head's logits if asked.

    `trunk` is what `prepare_net` returned for `net`; without one, `net` runs as it is on torch (training's
    validation, whose weights keep changing). The head runs in float32 on torch: it is tiny.
    """
    features = (trunk or torch_trunk(net, preprocess, compute))(batch).float()
    logits = net.logits(features).float() if with_logits and net.head is not None else None
    return torch.nn.functional.normalize(features, dim=1), logits


def ranked_classes(logits: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over each row of logits: its `top` highest probabilities, best first, and their class indices.

    The one place probabilities come from: a query's prediction and `simimg predict`'s rows."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    values, order = probabilities.topk(min(top, probabilities.shape[-1]), dim=-1)
    return values, order


def torch_trunk(
    net: Net, preprocess: Preprocess, compute: Compute, embed: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Trunk:
    """`net`'s embedding (or `embed`, a compiled form of it) on torch: normalised on the device, in the fast memory
    format, under the compute's autocast."""
    device, memory_format = compute.device, memory_format_for(compute.device)
    embed = embed or net.embed

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = preprocess.normalize(batch.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        with compute.autocast():
            return embed(x)

    return run


def prepare_net(net: Net, compute: Compute, preprocess: Preprocess, compile: bool = False) -> Trunk:
    """Put `net` in eval mode on its device; returns its embedding function for `infer`, on the compute's runtime.

    On OpenVINO that is the trunk converted and compiled for this CPU (openvino_trunk.py); with `compile`,
    `net.embed` `torch.compile`d (slow to start, faster per batch; torch runtime only). `net` itself stays as it
    was, so its fingerprints never change.
    """
    # torch's Module.to overloads lack (device, memory_format=...), which it takes
    net.eval().to(compute.device, memory_format=memory_format_for(compute.device))  # type: ignore[call-overload]
    if compute.runtime == "openvino":
        if compile:
            raise ValueError("torch.compile needs the torch runtime")
        if compute.precision == "int8" and compute.int8_sample is not None:
            from simimg.models.int8 import compile_int8, entry

            return compile_int8(entry(net.trunk, preprocess, compute.int8_sample))
        from simimg.models.openvino import compile_trunk

        return compile_trunk(net.trunk, preprocess, compute.precision)
    return torch_trunk(net, preprocess, compute, torch.compile(net.embed) if compile else None)


def make_loader(
    files: Sequence[Path],
    transform: ImageTransform,
    batch_size: int,
    workers: int,
    device: torch.device,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader[FileItem]:
    """Batches of (positions, uint8 NCHW, hashes, failures) from `collate`; unreadable files never raise.

    The one loader for indexing, training and evaluation: pinned memory when it feeds a GPU.
    """
    return DataLoader(
        FileDataset(files, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def read_ahead(batches: Iterable[T], workers: int) -> Iterator[T]:
    """`batches` with the next one read while the caller works on this one, when no loader workers do that.

    With OpenVINO's streams busy on both cores, decoding the next batch in a thread (PIL and OpenVINO release the
    GIL) still gave 1.05x and 1.08x end to end in two runs (`run_index` on 512 JPEGs, 3 repeats each, about 100
    img/s): the forward leaves the cores idle as it starts and ends each batch. On torch (bf16) it measured neutral
    (78.1 vs 78.2 img/s). A closed or failed consumer waits for at most the one batch being read.
    """
    if workers:
        yield from batches
        return
    it = iter(batches)
    with ThreadPoolExecutor(1, thread_name_prefix="simimg-read-ahead") as pool:
        pending = pool.submit(next, it, _End.END)
        while (batch := pending.result()) is not _End.END:
            pending = pool.submit(next, it, _End.END)
            yield batch


def embed_files(
    net: Net, paths: Sequence[Path], preprocess: Preprocess, settings: EmbedSettings, with_logits: bool = False
) -> Iterator[EmbeddedBatch]:
    """Yield a batch at a time, so callers can checkpoint and report progress as they go; `with_logits` adds the
    head's logits to each batch."""
    compute = settings.compute
    trunk = prepare_net(net, compute, preprocess, settings.compile)
    loader = make_loader(paths, preprocess, settings.batch_size, settings.workers, compute.device)
    if with_logits and net.head is None:
        raise ValueError("logits need a model with a classifier")
    width = net.head.out_features if net.head is not None else 0
    for positions, batch, hashes, failures in read_ahead(loader, loader.num_workers):
        vectors, logits = np.empty((0, net.dim), np.float32), np.empty((0, width), np.float32)
        if positions:
            embedded, scores = infer(net, batch, preprocess, compute, with_logits=with_logits, trunk=trunk)
            vectors = embedded.cpu().numpy()
            logits = logits if scores is None else scores.cpu().numpy()
        yield EmbeddedBatch(positions, vectors, hashes, failures, logits=logits if with_logits else None)


class Encoder:
    """Images to unit-length embeddings with a backbone, outside any index: `Encoder().encode(paths_or_images)`.

    The same decoding, preprocessing and forward pass `simimg index` uses, so its vectors match an index built
    with the same model.
    """

    def __init__(
        self,
        arch: str = "densenet121",
        weights: str = "imagenet",
        image_size: int = 224,
        device: str = "auto",
        batch_size: int = 64,
        model: LoadedModel | None = None,
        precision: str = "auto",
        runtime: str = "auto",
    ) -> None:
        self.compute = resolve_compute(device, precision, runtime=runtime)
        self.model = model or build_model(arch, weights, image_size)
        self.batch_size = batch_size
        self._trunk = prepare_net(self.model.net, self.compute, self.model.bundle.preprocess)

    @property
    def dim(self) -> int:
        return self.model.net.dim

    def encode(
        self,
        images: ImageInput | Sequence[ImageInput],
    ) -> tuple[np.ndarray, list[Skipped]]:
        """(N x D float32 unit vectors, skipped): a row per readable input, in input order; every unreadable
        input is listed with its reason instead of raising."""
        preprocess = self.model.bundle.preprocess
        vectors, skipped = [np.empty((0, self.dim), np.float32)], []
        inputs, _ = read_inputs(images, draft_size=preprocess.resize_size)
        for start in range(0, len(inputs), self.batch_size):
            tensors = []
            for item in inputs[start : start + self.batch_size]:
                if item.image is None:
                    skipped.append(Skipped(item.name, item.reason or ""))
                else:
                    tensors.append(preprocess.to_uint8(item.image))
            if tensors:
                embedded, _ = infer(self.model.net, torch.stack(tensors), preprocess, self.compute, trunk=self._trunk)
                vectors.append(embedded.cpu().numpy())
        return np.concatenate(vectors), skipped
