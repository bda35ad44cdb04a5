"""device.py: the device, its precision and the runtime are resolved once; bf16 exactly where the CPU or GPU has
units for it, OpenVINO for inference on the CPU."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from simimg.choices import PRECISIONS, RUNTIMES
from simimg.errors import SimimgError
from simimg.models import openvino
from simimg.models.device import RUNTIME_ENV, cpu_has_int8_units, int8_compute, native_bf16, resolve_compute

needs_openvino = pytest.mark.skipif(not openvino.available(), reason="openvino is not installed")


def cpuinfo_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (an independent reading of what torch detects)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from Linux's /proc/cpuinfo")
def test_auto_is_bf16_exactly_on_cpus_with_native_bf16_units():
    native = bool({"avx512_bf16", "amx_bf16"} & cpuinfo_flags())
    compute = resolve_compute("cpu", runtime="torch")
    assert native_bf16(torch.device("cpu")) == native
    assert compute.precision == ("bf16" if native else "fp32")
    assert str(compute) == f"cpu ({compute.precision})"


def test_cpu_training_stays_float32_unless_bf16_is_asked_for():
    """bf16 CPU training is faster per step but its accuracy over a real run is unmeasured: opt-in only."""
    assert resolve_compute("cpu", training=True).precision == "fp32"
    assert resolve_compute("cpu", "bf16", training=True).precision == "bf16"


def test_fp32_and_bf16_can_be_forced_and_bring_their_autocast():
    fp32, bf16 = resolve_compute("cpu", "fp32", runtime="torch"), resolve_compute("cpu", "bf16", runtime="torch")
    assert (str(fp32), str(bf16)) == ("cpu (fp32)", "cpu (bf16)")
    assert isinstance(fp32.autocast(), contextlib.nullcontext)
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_unknown_precisions_and_devices_are_user_errors():
    assert PRECISIONS == ("auto", "bf16", "fp32", "int8")
    with pytest.raises(SimimgError, match="unknown precision 'fp16': use auto, bf16, fp32, int8"):
        resolve_compute("cpu", "fp16")
    with pytest.raises(SimimgError, match="unknown device"):
        resolve_compute("tpu")


@needs_openvino
def test_int8_is_asked_on_openvino_only_and_auto_considers_it_only_with_int8_units(monkeypatch):
    """int8 starts as the float precision with int8 "asked": the index job's gate decides (jobs/int8.py)."""
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    asked = resolve_compute("cpu", "int8")
    assert (asked.int8, asked.runtime, asked.int8_sample) == ("asked", "openvino", None)
    assert asked.precision == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert resolve_compute("cpu", "auto").int8 == ("auto" if cpu_has_int8_units() else "no")
    assert resolve_compute("cpu", "fp32").int8 == "no"
    for kwargs in ({"training": True}, {"runtime": "torch"}, {"compile": True}):
        with pytest.raises(SimimgError, match="int8 runs on the CPU through OpenVINO only"):
            resolve_compute("cpu", "int8", **kwargs)
    chosen = int8_compute(asked, "abc")
    assert (str(chosen), chosen.int8_sample) == ("cpu (int8, openvino)", "abc")


@needs_openvino
def test_cpu_inference_runs_on_openvino_and_training_on_torch(monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    assert resolve_compute("cpu", "fp32").runtime == "openvino"
    assert str(resolve_compute("cpu", "fp32")) == "cpu (fp32, openvino)"
    assert resolve_compute("cpu", training=True).runtime == "torch"
    assert resolve_compute("cpu", "fp32", runtime="torch").runtime == "torch"
    assert resolve_compute("cpu", "fp32", compile=True).runtime == "torch"  # torch.compile needs torch
    native = native_bf16(torch.device("cpu"))
    assert resolve_compute("cpu", "bf16").runtime == ("openvino" if native else "torch")  # forced bf16 is emulated


@needs_openvino
def test_the_runtime_can_be_chosen_from_the_environment(monkeypatch):
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    assert resolve_compute("cpu", "fp32").runtime == "torch"
    assert resolve_compute("cpu", "fp32", runtime="openvino").runtime == "openvino"  # the caller's choice wins
    monkeypatch.setenv(RUNTIME_ENV, "tensorrt")
    with pytest.raises(SimimgError, match=r"unknown runtime 'tensorrt' \(from \$SIMIMG_RUNTIME"):
        resolve_compute("cpu")


def test_openvino_where_it_cannot_run_is_a_user_error(monkeypatch):
    assert RUNTIMES == ("auto", "torch", "openvino")
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    monkeypatch.setattr(openvino, "available", lambda: False)
    assert resolve_compute("cpu", "fp32").runtime == "torch"  # auto falls back
    with pytest.raises(SimimgError, match="needs the openvino package"):
        resolve_compute("cpu", "fp32", runtime="openvino")


@pytest.mark.gpu
def test_cuda_defaults_to_bf16(cuda):
    compute = resolve_compute("cuda")
    assert compute.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert str(resolve_compute("cuda", "fp32")).endswith("(fp32)")
    assert compute.runtime == "torch"
    with pytest.raises(SimimgError, match="runs on the CPU only"):
        resolve_compute("cuda", runtime="openvino")
