"""A model's trunk converted to OpenVINO: how the CPU runs queries, indexing, evaluation and the audit's forwards.

Why not torch on the CPU: densenet121 at 224 px, batch 1, 2 cores took 38 ms in packed bf16 (58 ms in float32),
of which ~11 ms went to Python and op dispatch around ~420 small ops, and its second thread added only 13%.
OpenVINO runs the same graph with batch norms, ReLUs and concatenations fused into its oneDNN kernels: 19 ms in bf16
(32 ms in float32) with both threads used (benchmarks/README.md). Vectors agree with torch's float32 to a cosine
of 0.99999 (tests/test_openvino_trunk.py), so the embedding fingerprint ignores the runtime as it does the precision.

The converted model takes the uint8 NCHW batches `Preprocess.to_uint8` makes and normalises them itself. It is
converted from a copy of the trunk traced with `torch.jit.trace`, whose tracing state is per thread: unlike
torch.fx it changes nothing that a training step in another thread uses. Converting densenet121 takes 1.4 s, so
the result is kept in a per-user cache (`cache_root()`) under a hash of the trunk's tensors and preprocessing, like
torchvision's downloaded weights, with OpenVINO's blobs of it compiled for this CPU (`COMPILED`): a later process
reads both back instead of converting (1.4 s) and compiling (0.6 s per hint; 0.2-0.3 s read back), and every index
of the same model shares them; nothing is written into an index folder, which a reader may have read-only.
Training stays on torch: OpenVINO here only runs inference.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from simimg.dataset.preprocess import Preprocess
from simimg.models.net import hash_tensors

if TYPE_CHECKING:
    import openvino as ov

log = logging.getLogger(__name__)

MODEL_XML = "trunk.xml"
COMPILED = "compiled"  # OpenVINO's blobs of the trunk compiled for this CPU, one per hint and precision
# int8: the quantized ops run in int8 and the rest in float32 (a bf16 hint over an int8 model is not measured here)
PRECISION_HINTS = {"bf16": "bf16", "fp32": "f32", "int8": "f32"}
CACHE_ENV = "SIMIMG_CACHE"
KEEP_CONVERTED = 8  # the most recently used converted trunks kept per OpenVINO version (28 MB for densenet121)
SUB_BATCH = (
    4  # images a request when a batch runs on streams (2 cores, batch 64: 130/140/143/138/131 img/s at 1/2/4/8/16)
)
MIN_STREAMED_BATCH = 2 * SUB_BATCH  # below this, a batch runs as one stream on every thread


def available() -> bool:
    """Whether OpenVINO is installed (a dependency, but a platform without its wheels falls back to torch)."""
    return importlib.util.find_spec("openvino") is not None


class OpenVinoTrunk:
    """uint8 NCHW images in, float32 features out: the trunk compiled for this CPU, safe to call from any thread.

    Two compilations of one model, because one shape of work does not fit both: a single image (a query) runs as
    one stream across every thread (LATENCY), while a batch (indexing, evaluation, the server's micro-batches) is cut
    into near-equal sub-batches of about `SUB_BATCH` run side by side, one stream per thread (THROUGHPUT):
    densenet121 at 224 px on 2 cores gave 143 img/s that way against 118 as one stream (benchmarks/README.md).
    Each is compiled on its first use. An OpenVINO infer request (or queue of them) serves one call at a time, so
    each calling thread gets its own.
    """

    def __init__(self, model: ov.Model, config: dict[str, Any]) -> None:
        self._model, self._config = model, config
        self._compiled: dict[str, ov.CompiledModel] = {}
        self.dim = _feature_dim(model)
        self._local = threading.local()
        self._compiling = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not len(batch):
            return torch.empty((0, self.dim), dtype=torch.float32)
        pixels = np.ascontiguousarray(batch.cpu().numpy())
        if len(pixels) < MIN_STREAMED_BATCH or self._config["INFERENCE_NUM_THREADS"] < 2:
            return torch.from_numpy(self._one_stream(pixels))
        return torch.from_numpy(self._streamed(pixels))

    def _one_stream(self, pixels: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled_for("LATENCY").create_infer_request()
        request.infer({0: pixels})
        features: np.ndarray = request.get_output_tensor(0).data.copy()
        return features

    def _streamed(self, pixels: np.ndarray) -> np.ndarray:
        """Sub-batches through this thread's queue of infer requests, one per stream; rows come back in order.

        The batch is cut into a multiple of the stream count of near-equal parts, so no stream idles at the end
        (on 2 streams, 12 images as 4, 4, 4 ran at 104 img/s; as 3, 3, 3, 3 at 127).
        """
        queue = getattr(self._local, "queue", None)
        if queue is None:
            queue = self._local.queue = self._streams_queue()
        out = np.empty((len(pixels), self.dim), dtype=np.float32)

        def done(request: ov.InferRequest, start: int) -> None:
            rows = request.get_output_tensor(0).data
            out[start : start + len(rows)] = rows

        queue.set_callback(done)
        streams = len(queue)
        parts = streams * max(1, round(len(pixels) / (streams * SUB_BATCH)))
        bounds = np.linspace(0, len(pixels), parts + 1).round().astype(int)
        for start, stop in itertools.pairwise(bounds):
            queue.start_async({0: pixels[start:stop]}, int(start))
        queue.wait_all()
        return out

    def _streams_queue(self) -> ov.AsyncInferQueue:
        import openvino as ov

        compiled = self._compiled_for("THROUGHPUT")
        return ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def _compiled_for(self, hint: str) -> ov.CompiledModel:
        """The model compiled for `hint`, on first use: a batch job never compiles for single queries, nor a
        query service for batches it does not get (each compilation of densenet121 took 0.6 s, 0.2-0.3 s when
        read back from the blob cache)."""
        with self._compiling:
            if hint not in self._compiled:
                self._compiled[hint] = _compile(self._model, {**self._config, "PERFORMANCE_HINT": hint})
                log.debug("trunk compiled for %s: %d streams", hint, self._compiled[hint].get_property("NUM_STREAMS"))
            return self._compiled[hint]


def cache_root() -> Path:
    """$SIMIMG_CACHE, else $XDG_CACHE_HOME/simimg, else ~/.cache/simimg."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simimg"


def compile_trunk(
    trunk: nn.Module, preprocess: Preprocess, precision: str, threads: int | None = None
) -> OpenVinoTrunk:
    """`trunk` (left as it is) compiled for this CPU at `precision` ("bf16" or "fp32") with `threads` threads
    (default: torch's setting, which the entry points choose); converted once per machine (see the module's text)."""
    folder = trunk_folder(trunk, preprocess)
    return compile_model(_cached_or_converted(trunk, preprocess, folder), precision, threads, folder / COMPILED)


def compile_model(
    model: ov.Model, precision: str, threads: int | None = None, blobs: Path | None = None
) -> OpenVinoTrunk:
    """A converted (or quantized: int8.py) trunk compiled for this CPU; `precision` picks the inference hint, and
    `blobs` is where OpenVINO keeps (and reads back) its compiled forms, when they are worth keeping."""
    import openvino as ov

    config = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        **({"CACHE_DIR": str(blobs)} if blobs else {}),
    }
    compiled = OpenVinoTrunk(model, config)
    log.debug("trunk compiled by OpenVINO %s for the CPU in %s", ov.get_version(), precision)
    return compiled


def _feature_dim(model: ov.Model) -> int:
    """The width of the model's output, which its dynamic batch leaves unknown until a batch size is set (on a
    copy: 0.03 s, where compiling would take 0.6)."""
    one = model.clone()
    shape = one.input(0).get_partial_shape()
    shape[0] = 1
    one.reshape({0: shape})
    dim: int = one.output(0).get_partial_shape()[1].get_length()
    return dim


def _compile(model: ov.Model, config: dict[str, Any]) -> ov.CompiledModel:
    """`model` compiled for the CPU, its blob kept in (and read back from) config's CACHE_DIR; a cache that cannot
    be used (read-only, full) costs a compilation, nothing else. OpenVINO compiles afresh over a blob that does not
    import (damaged, or from another CPU)."""
    try:
        return core().compile_model(model, "CPU", config)
    except RuntimeError as err:
        if "CACHE_DIR" not in config:
            raise
        log.warning("compiling without the blob cache in %s: %s", config["CACHE_DIR"], err)
        return core().compile_model(model, "CPU", {k: v for k, v in config.items() if k != "CACHE_DIR"})


def converted(trunk: nn.Module, preprocess: Preprocess) -> ov.Model:
    """The trunk as an OpenVINO model, from the per-user cache when it holds it, else converted now and kept."""
    return _cached_or_converted(trunk, preprocess, trunk_folder(trunk, preprocess))


def trunk_folder(trunk: nn.Module, preprocess: Preprocess) -> Path:
    """Where this trunk's converted model (and its int8 forms, int8.py) is kept for this OpenVINO version."""
    return cache_root() / _version_folder() / trunk_key(trunk, preprocess)


def convert(trunk: nn.Module, preprocess: Preprocess) -> ov.Model:
    """The trunk as an OpenVINO model of uint8 NCHW input (any batch, `crop_size` square) with its normalisation.

    Through OpenVINO's PyTorch frontend, not `ov.convert_model`: that tool sends usage telemetry to Intel unless the
    user opted out, and takes 3x as long (1.5 s vs 0.45 s for densenet121).
    """
    import openvino as ov
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    from openvino.preprocess import PrePostProcessor

    size = preprocess.crop_size
    with torch.no_grad():
        traced = torch.jit.trace(
            copy.deepcopy(trunk).float().cpu().eval(), torch.zeros(1, 3, size, size), check_trace=False
        )
    decoder = TorchScriptPythonDecoder(traced)  # referenced until converted: the frontend calls back into it
    frontend = FrontEndManager().load_by_framework("pytorch")
    model = frontend.convert(frontend.load(decoder))
    model.reshape({0: ov.PartialShape([-1, 3, size, size])})
    steps = PrePostProcessor(model)
    steps.input().tensor().set_element_type(ov.Type.u8)
    steps.input().model().set_layout(ov.Layout("NCHW"))
    steps.input().preprocess().convert_element_type(ov.Type.f32).mean([m * 255 for m in preprocess.mean]).scale(
        [s * 255 for s in preprocess.std]
    )
    return steps.build()


def trunk_key(trunk: nn.Module, preprocess: Preprocess) -> str:
    """Names exactly this trunk and preprocessing (its class, every tensor): the cache's key."""
    h = hashlib.sha256(json.dumps([type(trunk).__name__, preprocess.to_dict()], sort_keys=True).encode())
    hash_tensors(h, trunk.state_dict())
    return h.hexdigest()[:24]


def _cached_or_converted(trunk: nn.Module, preprocess: Preprocess, target: Path) -> ov.Model:
    """The converted model from `target` when it holds a readable one, else converted now (and kept there)."""
    if (target / MODEL_XML).is_file():
        try:
            model = core().read_model(target / MODEL_XML)
        except RuntimeError as err:
            log.warning("the converted model in %s does not read (%s): converting it again", target, err)
            _remove(target)
        else:
            with contextlib.suppress(OSError):  # most recently used: the last to be pruned
                os.utime(target)
            return model
    log.info(
        "converting the %s trunk for OpenVINO (once per model and machine; kept in %s)",
        type(trunk).__name__,
        target.parent,
    )
    model = convert(trunk, preprocess)
    if publish(model, target):
        _prune(target.parent, KEEP_CONVERTED)
        # as every later process reads it: OpenVINO keys compiled blobs by the model's serialised form, and the
        # converted model in memory differs from the one read back (no later process would find this one's blobs)
        return core().read_model(target / MODEL_XML)
    return model


def publish(model: ov.Model, target: Path, extra: dict[str, bytes] | None = None) -> bool:
    """Write the model (and `extra` files) beside `target` and rename it into place: readers see a whole model or
    none. True if this call wrote it; a cache that cannot be written (read-only, full) costs a conversion (or a
    quantization) per process, nothing else."""
    import openvino as ov

    staging = target.with_name(f".staging-{target.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, staging / MODEL_XML, compress_to_fp16=False)  # fp16 weights would change the vectors
        for name, data in (extra or {}).items():
            (staging / name).write_bytes(data)
        os.rename(staging, target)
        return True
    except (OSError, RuntimeError) as err:  # another process published it first, or the cache is not writable
        if not (target / MODEL_XML).is_file():
            log.warning("could not keep the converted model in %s: %s", target, err)
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prune(folder: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used converted models in `folder`."""
    used: dict[Path, float] = {}
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):  # another process may be pruning too
            if entry.is_dir() and not entry.name.startswith("."):
                used[entry] = entry.stat().st_mtime
    for old in sorted(used, key=used.__getitem__, reverse=True)[keep:]:
        _remove(old)


def _remove(target: Path) -> None:
    trash = target.with_name(f".trash-{target.name}-{os.getpid()}")
    try:
        os.rename(target, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _version_folder() -> str:
    import openvino as ov

    version: str = ov.get_version()
    return "openvino-" + version.split("-")[0]


@functools.cache
def core() -> ov.Core:
    import openvino as ov

    return ov.Core()
