"""A bf16 inference copy of a trunk for oneDNN on CPUs with native bf16: the fast path of CPU queries and indexing.

Eager bf16 autocast re-casts and re-lays out every convolution weight on every call: at batch 1 that cost
densenet121 an eighth of its bf16 forward (49.3 vs 43.2 ms of CPU per image, benchmarks/README.md). Here, once per loaded model, every convolution's weights are cast to
bf16 and packed in oneDNN's layout for the input shape it sees. The original trunk is never changed: its state
dict and fingerprints stay what they were.

No graph tracing: torch.fx patches `nn.Module.__call__` for the whole process while it traces, which broke a
training step running in another thread (NameError "module is not installed as a submodule"). Modules are swapped
in a copy instead, and shapes come from a forward under fake tensors (a thread-local dispatch mode). Folding batch
norms into convolutions and fusing ReLUs needed the graph, so they are not done.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

log = logging.getLogger(__name__)


def packed_ops_available() -> bool:
    """Whether this torch build and CPU run oneDNN's bf16 convolutions on pre-packed weights (AVX512 at least;
    elsewhere a forced bf16 runs as eager autocast)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_inference_trunk(trunk: nn.Module, image_size: int) -> nn.Module:
    """An eval-only copy of `trunk` (float input, bf16 features) whose convolutions run on packed bf16 weights.

    oneDNN picks a weight layout for the input shape it is told; each convolution is packed for the shape it
    sees on one `image_size` image. Larger batches run as fast on that layout (batch 8, 1 thread: 348 ms packed
    for batch 1, 353 ms packed for batch 8, 347 ms eager autocast), so a query's batch 1 decides.
    """
    packed_trunk = copy.deepcopy(trunk).eval()
    shapes = _conv_input_shapes(packed_trunk, (1, 3, image_size, image_size))
    for name, module in list(packed_trunk.named_modules()):
        if type(module) is nn.Conv2d:
            parent, _, child = name.rpartition(".")
            setattr(packed_trunk.get_submodule(parent), child, PackedConv2d(module, shapes[name]))
        elif isinstance(module, nn.Linear):  # a Linear needs weights of its input's dtype
            module.to(torch.bfloat16)
    # batch norms keep float32 statistics: oneDNN normalises bf16 input with them, closer to float32 at the same speed
    log.debug("bf16 inference trunk: %d convolutions packed", len(shapes))
    return _Bf16Input(packed_trunk)


def _conv_input_shapes(net: nn.Module, input_shape: tuple[int, ...]) -> dict[str, torch.Size]:
    """Each Conv2d's input shape, by qualified name, from one forward on fake tensors (no real compute)."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's value would replace the input
            shapes.setdefault(name, args[0].shape)
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in net.named_modules() if type(module) is nn.Conv2d]
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake:
            net(fake.from_tensor(torch.zeros(input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


class PackedConv2d(nn.Module):
    """A frozen Conv2d as one oneDNN call on pre-packed bf16 weights."""

    def __init__(self, conv: nn.Conv2d, input_shape: Sequence[int]) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero, explicit padding is packed")
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = conv.weight.detach().to(torch.bfloat16)
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.args, list(input_shape))
        self.bias = None if conv.bias is None else conv.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, "none", [], "")


class _Bf16Input(nn.Module):
    """Feeds the trunk bf16 whatever float it is given."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.to(torch.bfloat16))
