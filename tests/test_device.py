"""device.py: the device and its precision are resolved once; bf16 exactly where the CPU or GPU has units for it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from simimg.device import PRECISIONS, native_bf16, resolve_compute
from simimg.errors import SimimgError


def cpuinfo_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (an independent reading of what torch detects)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from Linux's /proc/cpuinfo")
def test_auto_is_bf16_exactly_on_cpus_with_native_bf16_units():
    native = bool({"avx512_bf16", "amx_bf16"} & cpuinfo_flags())
    compute = resolve_compute("cpu")
    assert native_bf16(torch.device("cpu")) == native
    assert compute.precision == ("bf16" if native else "fp32")
    assert str(compute) == f"cpu ({compute.precision})"


def test_cpu_training_stays_float32_unless_bf16_is_asked_for():
    """bf16 CPU training is faster per step but its accuracy over a real run is unmeasured: opt-in only."""
    assert resolve_compute("cpu", training=True).precision == "fp32"
    assert resolve_compute("cpu", "bf16", training=True).precision == "bf16"


def test_fp32_and_bf16_can_be_forced_and_bring_their_autocast():
    fp32, bf16 = resolve_compute("cpu", "fp32"), resolve_compute("cpu", "bf16")
    assert (str(fp32), str(bf16)) == ("cpu (fp32)", "cpu (bf16)")
    assert isinstance(fp32.autocast(), contextlib.nullcontext)
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_unknown_precisions_and_devices_are_user_errors():
    assert PRECISIONS == ("auto", "bf16", "fp32")
    with pytest.raises(SimimgError, match="unknown precision 'fp16': use auto, bf16, fp32"):
        resolve_compute("cpu", "fp16")
    with pytest.raises(SimimgError, match="unknown device"):
        resolve_compute("tpu")


@pytest.mark.gpu
def test_cuda_defaults_to_bf16(cuda):
    compute = resolve_compute("cuda")
    assert compute.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert str(resolve_compute("cuda", "fp32")).endswith("(fp32)")
