"""The Hessian graph check's table of autograd node names against the installed torch.

:func:`curvlab.backprop.hessian.graph_obstacle` classifies autograd nodes by name (see the module
docstring of :mod:`curvlab.backprop.hessian` for why no name-free check exists). These tests build
each listed operation, so a renamed node in a new torch release shows up here as a failure
rather than as a silent fallback or, worse, as a nonlinear operation taken for a linear one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from curvlab.backprop.hessian import _kind

X = (2, 3, 4, 4)

LINEAR: dict[str, Callable[[Tensor], Tensor]] = {
    "add": lambda x: x + x,
    "view": lambda x: x.view(2, -1),
    "reshape": lambda x: x.reshape(2, 48),
    "cat": lambda x: torch.cat([x, x]),
    "stack": lambda x: torch.stack([x, x]),
    "transpose": lambda x: x.transpose(1, 2),
    "permute": lambda x: x.permute(0, 2, 1, 3),
    "t": lambda x: x[0].flatten(1).t(),
    "expand": lambda x: x[:, :1].expand(2, 3, 4, 4),
    "squeeze": lambda x: x[:, :1].squeeze(1),
    "unsqueeze": lambda x: x.unsqueeze(0),
    "select": lambda x: x.select(1, 0),
    "slice": lambda x: x[:, 1:],
    "index": lambda x: x[torch.tensor([0])],
    "clone": lambda x: x.clone(),
    "sum": lambda x: x.sum(1),
    "split": lambda x: x.split(1, 1)[0],
    "unbind": lambda x: x.unbind(1)[0],
    "to": lambda x: x.to(torch.float64),
    "flip": lambda x: x.flip(1),
    "roll": lambda x: x.roll(1, 1),
    "repeat": lambda x: x.repeat(1, 2, 1, 1),
    "constant_pad": lambda x: F.pad(x, (1, 1)),
    "sub": lambda x: x - x,
    "neg": lambda x: -x,
    "mean": lambda x: x.mean(1),
    "avg_pool": lambda x: F.avg_pool2d(x, 2),
    "adaptive_avg_pool": lambda x: F.adaptive_avg_pool2d(x, 2),
    "max_pool": lambda x: F.max_pool2d(x, 2),
    "adaptive_max_pool": lambda x: F.adaptive_max_pool2d(x, 1),
    "relu": F.relu,
    "threshold": lambda x: F.threshold(x, 0.1, 0.0),
    "leaky_relu": F.leaky_relu,
    "hardtanh": F.hardtanh,
    "reflection_pad": lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"),
    "replication_pad": lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate"),
}
"""Operations whose second derivative is zero (almost everywhere)."""

PRODUCT: dict[str, Callable[[Tensor], Tensor]] = {
    "mul": lambda x: x * x,
    "matmul": lambda x: x @ x,
    "addmm": lambda x: torch.addmm(x[0, 0], x[0, 0], x[0, 0]),
    "bmm": lambda x: torch.bmm(x[0], x[0]),
    "baddbmm": lambda x: torch.baddbmm(x[0], x[0], x[0]),
    "mv": lambda x: x[0, 0] @ x[0, 0, 0],
    "addmv": lambda x: torch.addmv(x[0, 0, 0], x[0, 0], x[0, 0, 0]),
    "conv": lambda x: F.conv2d(x, x[:1, :, :2, :2]),
    "linear": lambda x: F.linear(x, x[0, 0]),
    "dot": lambda x: x[0, 0, 0].dot(x[0, 0, 0]),
    "div": lambda x: x / x,
    "dropout": lambda x: F.dropout(x, 0.5, training=True),  # a product with its mask on CPU
}
"""Operations linear in each operand separately."""

OTHER: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "exp": torch.exp,
    "softmax": lambda x: x.softmax(-1),
    "log_softmax": lambda x: x.log_softmax(-1),
    "layer_norm": lambda x: F.layer_norm(x, (4,)),
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "pow": lambda x: x.pow(3),
    "sdpa": lambda x: F.scaled_dot_product_attention(x, x, x),
}
"""Operations with a second derivative of their own: obstacles."""


def _kinds(op: Callable[[Tensor], Tensor]) -> list[tuple[str, str]]:
    """``(name, kind)`` of every node of ``op``'s graph (leaves' accumulators left out)."""
    x = torch.randn(*X, requires_grad=True)
    out = op(x)
    seen, stack, kinds = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen or node.name().startswith("torch::autograd::Accum"):
            continue
        seen.add(node)
        kinds.append((node.name(), _kind(node)))
        stack.extend(n for n, _ in node.next_functions)
    return kinds


@pytest.mark.parametrize("op", sorted(LINEAR))
def test_linear_operations_are_known_by_name(op):
    kinds = _kinds(LINEAR[op])
    assert kinds and all(kind == "linear" for _, kind in kinds), kinds


@pytest.mark.parametrize("op", sorted(PRODUCT))
def test_products_are_known_by_name(op):
    kinds = _kinds(PRODUCT[op])
    assert any(kind == "product" for _, kind in kinds), kinds
    assert all(kind != "other" for _, kind in kinds), kinds


@pytest.mark.parametrize("op", sorted(OTHER))
def test_nonlinear_operations_are_obstacles(op):
    kinds = _kinds(OTHER[op])
    assert any(kind == "other" for _, kind in kinds), kinds
