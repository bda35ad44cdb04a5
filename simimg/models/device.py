"""Pick the device, its precision and the runtime once (a `Compute`), with the autocast context that goes with them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simimg.choices import PRECISIONS, RUNTIMES
from simimg.errors import SimimgError

log = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' means CUDA when present; asking for CUDA without one is a user error, not a silent fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SimimgError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if spec not in ("cpu",) and not spec.startswith("cuda"):
        raise SimimgError(f"unknown device {spec!r}: use auto, cpu or cuda")
    return torch.device(spec)


RUNTIME_ENV = "SIMIMG_RUNTIME"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags of int8 dot-product units


@dataclass(frozen=True)
class Compute:
    """Where a job's forward passes run and in what precision: resolved once per job, then handed along.

    `autocast` is the context every torch forward (and training step) runs in, chosen here once (timm's way) rather
    than by an `if` at each step. `runtime` is what runs inference: "openvino" (the CPU's fast path,
    openvino.py) or "torch". Shown to users as "cpu (bf16, openvino)", "cuda (bf16)", "cpu (fp32)".
    """

    device: torch.device
    precision: str  # "bf16" or "fp32"; "int8" once a gate passed (int8_sample names the quantization)
    autocast: Callable[[], contextlib.AbstractContextManager[object]] = field(
        compare=False, repr=False, default=contextlib.nullcontext
    )
    runtime: str = "torch"
    int8: str = "no"  # "asked" (--precision int8), "auto" (may use a passed gate already kept), or "no"
    int8_sample: str | None = None  # the int8 cache entry's key (models/int8.py) when precision is "int8"

    def __str__(self) -> str:
        return f"{self.device} ({self.precision}{', openvino' if self.runtime == 'openvino' else ''})"


def resolve_compute(
    device: str = "auto", precision: str = "auto", training: bool = False, runtime: str = "auto", compile: bool = False
) -> Compute:
    """The device, and bf16 where it is native (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else float32.

    "fp32" forces float32 anywhere; "bf16" forces bf16 even where it is emulated (slower, same results).
    For `training`, "auto" keeps the CPU in float32: a bf16 CPU train step took 0.69x the CPU time, but equal
    accuracy over a real run is not measured yet (benchmarks/README.md); `--precision bf16` opts in.
    The runtime: see `resolve_runtime`; a job that `compile`s its forward (torch.compile) runs it on torch.
    """
    if precision not in PRECISIONS:
        raise SimimgError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    native = native_bf16(dev) and not (training and dev.type == "cpu")
    chosen = precision if precision not in ("auto", "int8") else "bf16" if native else "fp32"
    runtime = "torch" if compile else resolve_runtime(dev, chosen, training, runtime)
    int8 = _int8_mode(precision, dev, runtime, training)
    if chosen == "fp32":
        return Compute(dev, "fp32", runtime=runtime, int8=int8)
    autocast = functools.partial(torch.autocast, device_type=dev.type, dtype=torch.bfloat16)
    return Compute(dev, "bf16", autocast, runtime, int8)


def _int8_mode(precision: str, device: torch.device, runtime: str, training: bool) -> str:
    """int8 runs quantized trunks on OpenVINO, for inference on the CPU; `auto` considers it only on a CPU with
    int8 units (VNNI, AMX), and only where a passed gate is already kept (models/int8.py, jobs/int8.py)."""
    if precision == "int8" and (training or runtime != "openvino"):
        raise SimimgError(
            "--precision int8 runs on the CPU through OpenVINO only (not on CUDA, not for training, not with "
            "SIMIMG_RUNTIME=torch or --compile): use --device cpu, or bf16/fp32"
        )
    if precision == "int8":
        return "asked"
    if precision != "auto" or runtime != "openvino":
        return "no"
    return "auto" if cpu_has_int8_units() else "no"


def int8_compute(compute: Compute, sample: str) -> Compute:
    """`compute` running the int8 trunk quantized on `sample` (after its gate passed)."""
    return dataclasses.replace(compute, precision="int8", autocast=contextlib.nullcontext, int8_sample=sample)


def resolve_runtime(device: torch.device, precision: str, training: bool, runtime: str = "auto") -> str:
    """OpenVINO for inference on the CPU (about 2x torch there: openvino.py), torch for everything else.

    "auto" reads $SIMIMG_RUNTIME, else picks OpenVINO when it is installed and the precision runs natively (a bf16
    forced on a CPU without bf16 units stays torch's emulation). Training always runs on torch.
    """
    runtime = os.environ.get(RUNTIME_ENV, "auto") if runtime == "auto" else runtime
    if runtime not in RUNTIMES:
        raise SimimgError(f"unknown runtime {runtime!r} (from ${RUNTIME_ENV} or the caller): use {', '.join(RUNTIMES)}")
    if training or runtime == "torch":
        return "torch"
    from simimg.models import openvino

    usable = device.type == "cpu" and openvino.available() and (precision == "fp32" or native_bf16(device))
    if runtime == "openvino" and not usable:
        raise SimimgError(
            "the openvino runtime runs on the CPU only, in float32 or in bf16 on a CPU with bf16 units, "
            "and needs the openvino package (pip install openvino); use the torch runtime"
        )
    return "openvino" if usable else "torch"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs on units made for it, so it is faster than float32 (float32 stays the default elsewhere).

    A capability check, not a timing: it is instant, gives the same answer on a busy machine as on an idle one
    (a micro-benchmark on shared cores swung 10x between runs), and needs no cache to go stale.
    """
    if device.type == "cuda":
        supported: bool = torch.cuda.is_bf16_supported()
        return supported
    return device.type == "cpu" and _cpu_has_bf16_units()


def cpu_has_int8_units() -> bool:
    """Whether this CPU has int8 dot-product units (VNNI or AMX), where `auto` may pick int8.

    OpenVINO's OPTIMIZATION_CAPABILITIES lists "INT8" on an AVX2-only CPU too (it runs int8 there: ~2x float32 on
    an AVX2 EPYC, benchmarks/README.md), so the kernel's CPU flags decide.
    """
    return bool(_cpu_flags() & set(VNNI_FLAGS))


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def _cpu_has_bf16_units() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def memory_format_for(device: torch.device) -> torch.memory_format:
    """channels_last everywhere: the fast layout for cuDNN, and for oneDNN on the CPU (densenet121 forward
    took 28% less CPU time per image than NCHW; see benchmarks/README.md)."""
    return torch.channels_last


def loader_workers(requested: int | None, device: torch.device) -> int:
    """Decode processes feeding the model: every core (at most 16) for a GPU; none on the CPU, where they would
    steal cores from the forward (2 workers on 2 cores gave 0.37x of model-only; decoding inline 0.92x;
    benchmarks/README.md). An explicit request wins."""
    if requested is not None:
        return requested
    return min(os.cpu_count() or 1, 16) if device.type == "cuda" else 0
