"""The rules' Gram primitive: Linear's factored form equals the default built from ``jac_t``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.backprop.rules.base import Call, Rule
from curvlab.backprop.rules.linear import LinearRule


@pytest.mark.parametrize("other_columns", [None, 1, 4])
@pytest.mark.parametrize("positions", [(), (3,)])
def test_linear_gram_equals_default(positions, other_columns):
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    x = torch.randn(6, *positions, 5, dtype=torch.float64)
    factors = (torch.randn(3, 6, *positions, 4, dtype=torch.float64),)
    other = None
    if other_columns is not None:
        other = (torch.randn(other_columns, 6, *positions, 4, dtype=torch.float64),)
    call, names = Call((x,)), ["weight", "bias"]
    ours = LinearRule().gram(layer, call, factors, names, other)
    default = Rule.gram(LinearRule(), layer, call, factors, names, other)
    assert ours.keys() == default.keys()
    for name in names:
        torch.testing.assert_close(ours[name], default[name])


def test_default_gram_is_the_inner_product_of_vjps():
    torch.manual_seed(1)
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    factors = (torch.randn(2, 4, 2, dtype=torch.float64),)
    call = Call((x,))
    vjps = LinearRule().jac_t(layer, call, factors, ["weight"])["weight"]  # [M, N, out, in]
    gram = Rule.gram(LinearRule(), layer, call, factors, ["weight"])["weight"]
    torch.testing.assert_close(gram, torch.einsum("mnoi,kqoi->mnkq", vjps, vjps))
