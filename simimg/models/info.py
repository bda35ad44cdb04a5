"""`simimg model-info`: what a backbone costs (parameters, GFLOPs per image, embedding size, CUDA training memory)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from simimg.models.device import Compute, memory_format_for, resolve_compute
from simimg.models.net import Net, build_model, set_memory_efficient, with_classes


def model_info(
    arch: str, image_size: int = 224, device: str = "auto", batch_size: int = 32, memory_efficient: bool = False
) -> dict[str, Any]:
    """Parameters, GFLOPs per image, embedding size and, on CUDA, peak memory of one training step at `batch_size`.

    FLOPs count a multiply-add as two (torch's FlopCounterMode); `gmacs` is the figure torchvision's docs quote.
    """
    compute = resolve_compute(device)
    loaded = with_classes(build_model(arch, "none", image_size), tuple(str(i) for i in range(1000)))
    net = loaded.net
    set_memory_efficient(net, memory_efficient)
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    info = {
        "arch": arch,
        "image_size": image_size,
        "parameters": sum(p.numel() for p in net.parameters()),
        "trunk_parameters": sum(p.numel() for p in net.trunk.parameters()),
        "embedding_dim": net.dim,
        "gflops": round(counter.get_total_flops() / 1e9, 3),
        "gmacs": round(counter.get_total_flops() / 2e9, 3),
        "device": str(compute),
        "batch_size": batch_size,
        "memory_efficient": memory_efficient,
        "peak_training_memory_mib": None,
    }
    if compute.device.type == "cuda":
        info["peak_training_memory_mib"] = _peak_training_memory(net, image_size, compute, batch_size)
    return info


def _peak_training_memory(net: Net, image_size: int, compute: Compute, batch_size: int) -> float:
    """One forward and backward pass under the training settings (bf16 autocast, channels_last)."""
    device = compute.device
    # torch's Module.to overloads lack (device, memory_format=...), which it takes
    net.train().to(device, memory_format=memory_format_for(device))  # type: ignore[call-overload]
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    x = x.contiguous(memory_format=memory_format_for(device))
    with compute.autocast():
        loss = net(x).float().logsumexp(dim=1).mean()
    loss.backward()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
