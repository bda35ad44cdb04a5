"""Pick the device once, and the matching autocast context once."""

from __future__ import annotations

import contextlib
import logging
import os
from functools import partial
from typing import Callable, ContextManager

import torch

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


def autocast_for(device: torch.device) -> Callable[[], ContextManager]:
    """bf16 autocast on CUDA; float32 on the CPU, where bf16 is slower on most cores."""
    if device.type == "cuda":
        return partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


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
