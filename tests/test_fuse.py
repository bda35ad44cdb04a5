"""fuse.py: the packed bf16 inference copy of a trunk agrees with float32 and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simimg.fuse import PackedConv2d, bf16_inference_trunk, packed_ops_available
from simimg.model import build_model

pytestmark = pytest.mark.skipif(not packed_ops_available(), reason="needs oneDNN's bf16 convolutions (AVX512)")

SIZE = 32


def with_batch_norm_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine terms far from their defaults, so folding them is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for tensor, low, high in ((m.running_mean, -0.3, 0.3), (m.running_var, 0.5, 2.0),
                                          (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2)):
                    tensor.copy_(torch.rand(tensor.shape, generator=g) * (high - low) + low)
    return net.eval()


@pytest.fixture(scope="module")
def densenet() -> tuple[nn.Module, nn.Module]:
    """(net, its packed trunk)."""
    net = with_batch_norm_statistics(build_model("densenet121", "none", SIZE).net)
    return net, bf16_inference_trunk(net.trunk, SIZE)


@pytest.mark.parametrize("arch", ["densenet121", "resnet50", "vgg16"])  # densenet169/201/161 are built alike
def test_the_packed_trunk_agrees_with_float32(arch):
    net = with_batch_norm_statistics(build_model(arch, "none", SIZE).net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = bf16_inference_trunk(net.trunk, SIZE)
    x = torch.randn(4, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = net.embed(x), fused(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert nn.functional.cosine_similarity(want, got.float()).min() >= 0.999
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the model itself is untouched
    convs = sum(isinstance(m, nn.Conv2d) for m in net.trunk.modules())
    assert sum(isinstance(m, PackedConv2d) for m in fused.modules()) == convs
    assert not any(isinstance(m, nn.Conv2d) for m in fused.modules())


def test_packing_leaves_forwards_in_other_threads_alone():
    """A model loads (and packs) while another thread trains: torch.fx tracing used to break that thread's step."""
    import threading

    net = build_model("densenet121", "none", SIZE).net.train()
    errors: list[BaseException] = []
    stop = threading.Event()

    def train_steps() -> None:
        try:
            while not stop.is_set():
                net.embed(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
        except BaseException as err:  # what a training thread would have died of
            errors.append(err)

    worker = threading.Thread(target=train_steps)
    worker.start()
    try:
        for _ in range(3):
            bf16_inference_trunk(build_model("densenet121", "none", SIZE).net.trunk, SIZE)
    finally:
        stop.set()
        worker.join()
    assert errors == []


def test_a_vector_does_not_depend_on_its_batch(densenet):
    _, fused = densenet
    x = torch.randn(8, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        together, alone = fused(x)[:1], fused(x[:1])
    torch.testing.assert_close(together, alone)
