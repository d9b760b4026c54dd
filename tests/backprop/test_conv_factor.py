"""The convolutions' KFAC-expand input factor by shifted products and by chunks of samples."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.backprop import KFAC, KFLR, compute
from curvlab.backprop.rules import conv as conv_rule
from curvlab.backprop.rules.conv_factor import MIN_CHANNELS, expand_input_sum
from tests.backprop.problems import LOSSES, make_targets
from tests.backprop.test_kronecker import _input_factor

CASES = [  # (input shape, kernel size, (left, right) padding per axis, dilation)
    ((2, 3, 9), (3,), ((1, 1),), (1,)),
    ((2, 4, 7, 6), (3, 2), ((1, 0), (2, 2)), (2, 1)),
    ((3, 2, 5, 6, 4), (2, 3, 2), ((0, 1), (1, 1), (0, 0)), (1, 1, 2)),
    ((2, 5, 8, 8), (3, 3), ((0, 0), (0, 0)), (1, 1)),
    ((2, 5, 8, 8), (5, 5), ((2, 2), (2, 2)), (1, 1)),
    ((2, 3, 4, 5), (1, 3), ((0, 0), (1, 1)), (1, 1)),
]


def _unfolded_gram(x, kernel_size, padding, dilation):
    """U U^T with the rows (c, k) of U sliced from the zero-padded input (no unfold kernel)."""
    padded = F.pad(x, [p for pair in reversed(padding) for p in pair])
    ndim = len(kernel_size)
    outputs = [padded.shape[2 + a] - dilation[a] * (kernel_size[a] - 1) for a in range(ndim)]
    rows = []
    for c in range(x.shape[1]):
        for k in itertools.product(*[range(size) for size in kernel_size]):
            window = [
                slice(k[a] * dilation[a], k[a] * dilation[a] + outputs[a]) for a in range(ndim)
            ]
            rows.append(padded[(slice(None), c, *window)].reshape(-1))
    u = torch.stack(rows)
    return u @ u.T


@pytest.mark.parametrize(("shape", "kernel_size", "padding", "dilation"), CASES)
def test_shifted_products_equal_unfolded_gram(shape, kernel_size, padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    expected = _unfolded_gram(x, kernel_size, padding, dilation)
    actual = expand_input_sum(x, kernel_size, padding, dilation)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def _wide_cnn() -> tuple[nn.Module, torch.Tensor]:
    """Stride-1 convolutions with at least MIN_CHANNELS inputs (the shifted-products route)."""
    torch.manual_seed(3)
    c = MIN_CHANNELS
    model = nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, (3, 2), padding=(1, 0), dilation=(2, 1)),
        nn.Tanh(),
        nn.Conv2d(c, 3, 2),
        nn.Flatten(),
        nn.Linear(3 * 16, 4),
    ).double()
    return model, torch.randn(3, 2, 7, 6, dtype=torch.float64)


@pytest.mark.parametrize("quantity", [KFLR(), KFAC()], ids=lambda q: q.name)
def test_input_factor_by_shifted_products(quantity):
    model, x = _wide_cnn()
    loss_func = LOSSES["ce-mean"]()
    y = make_targets(loss_func, model(x).detach())
    ours = compute(model, loss_func, x, y, [quantity])[quantity.name]
    for k in (2, 4):
        expected = _input_factor(model[k], model[:k](x).detach())
        torch.testing.assert_close(ours[f"{k}.weight"].input_factor[0], expected)


def test_input_factor_in_chunks_of_samples(monkeypatch):
    """The einconv route (here: a strided convolution) summed over chunks of one sample."""
    monkeypatch.setattr(conv_rule, "FACTOR_CHUNK_ELEMENTS", 1)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(12, 3))
    model = model.double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    loss_func = LOSSES["mse-mean"]()
    y = make_targets(loss_func, model(x).detach())
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    expected = _input_factor(model[0], x)
    torch.testing.assert_close(ours["0.weight"].input_factor[0], expected)
