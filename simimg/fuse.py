"""A bf16 inference copy of a trunk for oneDNN on CPUs with native bf16: the fast path of CPU queries and indexing.

Eager bf16 autocast re-casts and re-lays out every convolution weight on every call, and runs each batch norm and
ReLU as passes of their own: at batch 1 that cost densenet121 a third of its bf16 forward. Here, once per loaded
model, batch norms that follow a convolution are folded into it (in float32, before rounding to bf16), a ReLU that
follows a convolution becomes its oneDNN post-op, and the weights are cast and packed in oneDNN's layout.
The original trunk is never changed: its state dict and fingerprints stay what they were.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.optimization import fuse as fold_batch_norms
from torch.fx.passes.shape_prop import ShapeProp

log = logging.getLogger(__name__)

_RELUS = (nn.functional.relu, torch.relu, torch.relu_)


def packed_ops_available() -> bool:
    """Whether this torch build and CPU run oneDNN's bf16 convolutions on pre-packed weights (AVX512 at least;
    elsewhere a forced bf16 runs as eager autocast)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_inference_trunk(trunk: nn.Module, image_size: int, batch: int = 1) -> nn.Module:
    """An eval-only copy of `trunk` (float input, bf16 features) with folded batch norms and packed convolutions.

    oneDNN picks a weight layout for the input shape it is told; each convolution is packed for the shape it
    sees on a `batch` x 3 x `image_size` x `image_size` input.
    """
    graph = fold_batch_norms(trunk.eval())  # a traced deep copy
    # shapes from fake tensors: packing densenet121 took 2.7-3.7 s with a real float32 forward here, 0.6-1.4 s so
    ShapeProp(graph, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(
        torch.zeros(batch, 3, image_size, image_size))
    modules = dict(graph.named_modules())
    packed = 0
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) is nn.Conv2d:
            relu = _sole_relu_user(node, modules)
            conv = PackedConv2d(modules[node.target], node.args[0].meta["tensor_meta"].shape, relu is not None)
            _replace_module(graph, node.target, conv)
            if relu is not None:
                relu.replace_all_uses_with(node)
                graph.graph.erase_node(relu)
            packed += 1
    graph.recompile()
    log.debug("bf16 inference trunk: %d convolutions packed", packed)
    # batch norms left unfolded keep float32 statistics (oneDNN normalises bf16 input with them: closer to float32
    # at the same speed); a Linear needs weights of its input's dtype
    for module in graph.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.bfloat16)
    return _Bf16Input(graph)


class PackedConv2d(nn.Module):
    """A frozen Conv2d (optionally followed by ReLU) as one oneDNN call on pre-packed bf16 weights."""

    def __init__(self, conv: nn.Conv2d, input_shape: Sequence[int], relu: bool = False) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero, explicit padding is packed")
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = conv.weight.detach().to(torch.bfloat16)
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.args, list(input_shape))
        self.bias = None if conv.bias is None else conv.bias.detach().float()
        self.post_op = "relu" if relu else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, self.post_op, [], "")


class _Bf16Input(nn.Module):
    """Feeds the graph bf16 whatever float it is given."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x.to(torch.bfloat16))


def _sole_relu_user(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The ReLU node that is `node`'s only user, if that is what follows it."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    is_relu = (user.op == "call_module" and type(modules.get(user.target)) is nn.ReLU) or \
        (user.op == "call_function" and user.target in _RELUS) or \
        (user.op == "call_method" and user.target in ("relu", "relu_"))
    return user if is_relu and user.args[0] is node else None


def _replace_module(graph: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(graph.get_submodule(parent) if parent else graph, name, module)
