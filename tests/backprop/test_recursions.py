"""BL89 and HesScale (C3): the recursions reproduced exactly, and their error vs the Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.backprop import BL89, DiagHessian, HesScale, compute
from tests import reference
from tests.backprop.problems import LOSSES, make_targets


def _mlp(act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)
    )


def _cnn(act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 3, 2, stride=1),
        act(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


MODELS = {"mlp": (_mlp, (2, 3)), "cnn": (_cnn, (1, 6, 6))}


def _case(model_name: str, act: type[nn.Module], loss: str, seed: int = 0, n: int = 3):
    torch.manual_seed(seed)
    build, shape = MODELS[model_name]
    model = build(act).double()
    loss_func = LOSSES[loss]()
    x = torch.randn(n, *shape, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = make_targets(loss_func, out)
    return model, loss_func, x, y


@pytest.mark.parametrize("quantity", [BL89(), HesScale()])
@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_recursion_reproduced_exactly(model_name, act, loss, quantity):
    model, loss_func, x, y = _case(model_name, act, loss)
    ours = compute(model, loss_func, x, y, [quantity])[quantity.name]
    expected = reference.diagonal_recursion(
        model, loss_func, x, y, exact_last_layer=isinstance(quantity, HesScale)
    )
    actual = torch.cat([v.flatten() for v in ours.values()])
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("quantity", [BL89(), HesScale()])
def test_last_layer_is_exact(quantity):
    model, loss_func, x, y = _case("mlp", nn.Tanh, "ce-mean")
    results = compute(model, loss_func, x, y, [quantity, DiagHessian()])
    torch.testing.assert_close(results[quantity]["5.weight"], results["DiagHessian"]["5.weight"])


def _l1_error(approx: dict, exact: dict) -> float:
    a = torch.cat([v.flatten() for v in approx.values()])
    e = torch.cat([v.flatten() for v in exact.values()])
    return ((a - e).abs().sum() / e.abs().sum()).item()


def test_hesscale_error_report(record_property):
    """Normalized L1 error vs the exact diagonal (HesScale paper, Fig. 2), over 8 seeds.

    HesScale keeps the off-diagonal loss-Hessian terms at the last layer, so on softmax
    cross-entropy it should be more accurate than BL89 on average.
    """
    errors = {"BL89": [], "HesScale": []}
    for seed in range(8):
        model, loss_func, x, y = _case("mlp", nn.Tanh, "ce-mean", seed=seed, n=8)
        results = compute(model, loss_func, x, y, [BL89(), HesScale(), DiagHessian()])
        for name in errors:
            errors[name].append(_l1_error(results[name], results["DiagHessian"]))
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    record_property("normalized_l1_error", mean)
    print(f"normalized L1 error vs exact Hessian diagonal (tanh MLP, CE): {mean}")
    assert mean["HesScale"] < mean["BL89"] < 1.0
