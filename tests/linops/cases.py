"""Problems for the operator tests: models from tests/backprop/problems.py over unequal batches.

Each case is a float64 model, a loss, data of 7 samples split into batches of 3, 1 and 3, and
the dense references over the concatenated data (the loss over the union of the batches).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests import reference
from tests.backprop.problems import PROBLEMS, Problem, build, make_targets

SPLIT = (3, 1, 3)


class ResidualLayerNorm(nn.Module):
    """Linear, then a pre-norm residual block (LayerNorm, Linear, GELU), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + torch.nn.functional.gelu(self.block(self.norm(h)))
        return self.head(h)


_BY_NAME = {p.name: p for p in PROBLEMS}
CASES = {
    "mlp": _BY_NAME["mlp"],
    "cnn": _BY_NAME["cnn2d"],
    "residual-layernorm": Problem(
        "residual-layernorm", lambda: (ResidualLayerNorm(), torch.randn(4, 5))
    ),
    "attention": _BY_NAME["attention-layernorm"],
}


def make_case(name: str, loss_name: str = "ce-mean", seed: int = 0):
    """``(model, loss_func, data, inputs, targets)``: 7 samples in batches of 3, 1 and 3."""
    model, loss_func, x, _ = build(CASES[name], loss_name, seed)
    torch.manual_seed(seed + 1)
    inputs = torch.randn(sum(SPLIT), *x.shape[1:], dtype=x.dtype)
    with torch.no_grad():
        targets = make_targets(loss_func, model(inputs))
    data = list(zip(inputs.split(SPLIT), targets.split(SPLIT), strict=True))
    return model, loss_func, data, inputs, targets


def _hessian_reverse_over_reverse(model, loss_func, inputs, targets) -> Tensor:
    """``reference.full_hessian`` by ``jacrev(grad)``.

    ``reference.full_hessian`` (``torch.func.hessian``: forward over reverse) is not symmetric
    on networks with LayerNorm in torch 2.13 (off by 0.11 on ``residual-layernorm``; finite
    differences of the gradient agree with reverse over reverse), so the operator tests use
    reverse over reverse on the same flattened function.
    """
    theta = reference.flatten(reference.trainable_params(model))
    f = reference._output_fn(model, inputs)
    return jacrev(grad(lambda t: loss_func(f(t), targets)))(theta)


def dense_reference(kind: str, model, loss_func, inputs, targets) -> Tensor:
    """The dense float64 matrix of ``kind`` over all the data (math attention kernel)."""
    with sdpa_kernel([SDPBackend.MATH]):
        if kind == "ggn":
            return reference.ggn(model, loss_func, inputs, targets)
        if kind == "hessian":
            return _hessian_reverse_over_reverse(model, loss_func, inputs, targets)
        if kind == "jacobian":
            return reference.jacobian(model, inputs)
        if kind == "ef":
            g = reference.per_sample_gradients(model, loss_func, inputs, targets)
            r = 1.0 / len(inputs) if loss_func.reduction == "mean" else 1.0
            return r * g.T @ g
    raise ValueError(kind)
