"""The linearized model against the first-order Taylor expansion from tests/reference.py."""

import pytest
import torch
from torch import nn

from curvlab.diagnostics import empirical_ntk, linearize
from curvlab.nn import RevMLP
from tests.reference import flatten, jacobian


def problems():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    rev = RevMLP(8, 3, hidden=10, depth=2, norm=True).double()
    return {"mlp": (mlp, torch.randn(4, 5).double()), "revmlp": (rev, torch.randn(4, 8).double())}


def moved(lin, scale=0.1, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lin.network.parameters():
            p.add_(scale * torch.randn_like(p))
    return lin


def displacement(lin, model):
    return flatten(
        {n: lin.network.get_parameter(n) - model.get_parameter(n) for n in lin.parameter_names}
    )


@pytest.mark.parametrize("name", ["mlp", "revmlp"])
def test_linearized_model_is_the_first_order_taylor_expansion(name):
    model, x = problems()[name]
    lin = moved(linearize(model))
    taylor = model(x).reshape(-1) + jacobian(model, x) @ displacement(lin, model)
    assert torch.allclose(lin(x).reshape(-1), taylor, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "revmlp"])
def test_gradient_of_the_linearized_model_is_the_jacobian_at_the_expansion_point(name):
    model, x = problems()[name]
    lin = moved(linearize(model))
    assert torch.allclose(jacobian(lin, x), jacobian(model, x), rtol=1e-12, atol=1e-13)


def test_linearized_ntk_stays_the_initial_ntk():
    model, x = problems()["mlp"]
    lin = moved(linearize(model), scale=1.0)
    assert torch.allclose(empirical_ntk(lin, x), empirical_ntk(model, x), rtol=1e-12)


def test_expansion_point_may_differ_from_the_model_parameters():
    model, x = problems()["mlp"]
    params0 = {n: p.detach() + 0.5 for n, p in model.named_parameters()}
    lin = linearize(model, params0)
    shifted = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    shifted.load_state_dict(params0)
    assert torch.allclose(lin(x), shifted(x))


def test_linearized_model_trains_with_a_torch_optimizer():
    model, x = problems()["mlp"]
    lin = linearize(model)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = lin(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_params0_with_a_missing_name_is_refused():
    model, _ = problems()["mlp"]
    with pytest.raises(ValueError, match="missing: \\['0.bias'\\]"):
        linearize(model, {n: p for n, p in model.named_parameters() if n != "0.bias"})
