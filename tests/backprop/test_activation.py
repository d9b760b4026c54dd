r"""Activation derivatives (``rules/activation.py``) against ``torch.func`` in float64.

Every registered activation, with non-default hyperparameters where it has them, at random
points and at its kinks: the closed forms of :math:`\phi'` and :math:`\phi''` equal
``vmap(grad(phi))`` and ``vmap(grad(grad(phi)))``, and so does the double-backward fallback.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from curvlab.backprop.rules.activation import (
    ACTIVATION_RULES,
    AUTOGRAD,
    ELEMENTWISE,
    PIECEWISE_LINEAR,
    activation_derivatives,
    find_activation_rule,
)
from curvlab.nn.memsave import MemSaveReLU

MODULES = [
    nn.Identity(),
    nn.ReLU(),
    nn.LeakyReLU(0.1),
    nn.ReLU6(),
    nn.Hardtanh(-2.0, 1.5),
    nn.Hardsigmoid(),
    nn.Sigmoid(),
    nn.LogSigmoid(),
    nn.Tanh(),
    nn.Tanhshrink(),
    nn.Softsign(),
    nn.ELU(0.5),
    nn.CELU(2.0),
    nn.SELU(),
    nn.Softplus(),
    nn.Softplus(beta=2.0, threshold=1.0),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.SiLU(),
    nn.Mish(),
    nn.Hardswish(),
]
KINKS = [0.0, -3.0, 3.0, 6.0, -2.0, 1.5, -1.0, 1.0, 0.5]


def _points() -> Tensor:
    torch.manual_seed(0)
    random = 4.0 * torch.randn(2, 40, dtype=torch.float64)
    return torch.cat([random, torch.tensor([KINKS, KINKS], dtype=torch.float64)], dim=1)


def _reference(module: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    def phi(s: Tensor) -> Tensor:
        return module(s)

    flat = h.reshape(-1)
    first = vmap(grad(phi))(flat).reshape(h.shape)
    if isinstance(module, nn.Hardsigmoid):  # torch has no double backward for it
        return first, torch.zeros_like(h)
    return first, vmap(grad(grad(phi)))(flat).reshape(h.shape)


def _name(module: nn.Module) -> str:
    return repr(module)


@pytest.mark.parametrize("module", MODULES, ids=_name)
def test_closed_forms_equal_torch_func(module):
    h = _points()
    first, second = find_activation_rule(module).derivatives(module, h)
    ref_first, ref_second = _reference(module, h)
    assert torch.allclose(torch.stack([first, second]), torch.stack([ref_first, ref_second]))


@pytest.mark.parametrize(
    "module", [m for m in MODULES if not isinstance(m, nn.Hardsigmoid)], ids=_name
)
def test_autograd_fallback_equals_torch_func(module):
    h = _points()
    first, second = AUTOGRAD.derivatives(module, h)
    assert torch.allclose(torch.stack([first, second]), torch.stack(_reference(module, h)))


def test_every_registered_class_has_a_closed_form_and_a_test():
    tested = {type(m) for m in MODULES}
    assert all(ACTIVATION_RULES[c].closed_form and c in tested for c in ACTIVATION_RULES)


def test_piecewise_linear_activations_are_those_with_a_zero_second_derivative():
    h = _points()
    zero = {c for c in ELEMENTWISE if not _reference(c(), h)[1].any()}
    assert zero == set(PIECEWISE_LINEAR)


class _Shifted(nn.Tanh):
    def forward(self, input: Tensor) -> Tensor:
        return torch.tanh(input - 1.0)


def test_subclass_with_its_own_forward_gets_autograd():
    module, h = _Shifted(), _points()
    assert torch.allclose(activation_derivatives(module, h)[1], _reference(module, h)[1])


def test_memsave_relu_keeps_the_relu_closed_form():
    assert find_activation_rule(MemSaveReLU()) is ACTIVATION_RULES[nn.ReLU]
