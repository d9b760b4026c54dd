"""curvlab.optim.AdaHesScale against a dense float64 reimplementation of its equations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlab.backprop import BL89, HesScale, compute
from curvlab.data import load_dataset, to_float
from curvlab.optim import AdaHesScale
from tests.optim.moment_reference import LOSS, batches, mlp, moment_loop, run


class Residual(nn.Module):
    """Not a Sequential: a skip connection around a Linear-Tanh branch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.act = nn.Tanh()
        self.branch = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        return self.out(h + self.branch(h))


def reference_run(model, data, lr, betas, eps, decay, quantity):
    """The paper's equations, written out densely (the diagonal from the engine)."""
    beta1, beta2 = betas

    def rule(t, state, g, p, h):
        g = g + decay * p
        state["m"] = beta1 * state.get("m", torch.zeros_like(p)) + (1 - beta1) * g
        state["v"] = beta2 * state.get("v", torch.zeros_like(p)) + (1 - beta2) * h * h
        m_hat, v_hat = state["m"] / (1 - beta1**t), state["v"] / (1 - beta2**t)
        return lr * m_hat / (v_hat.sqrt() + eps)

    moment_loop(model, data, rule, diagonal=quantity)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("build", [mlp, Residual], ids=["sequential", "residual"])
@pytest.mark.parametrize("method", ["hesscale", "bl89"])
def test_update_equals_its_equations(steps, build, method):
    torch.manual_seed(0)
    model = build().to(torch.float64)
    reference = copy.deepcopy(model)
    data = batches(steps)
    lr, betas, eps, decay = 0.05, (0.8, 0.9), 1e-6, 1e-3
    opt = AdaHesScale(
        model, lr=lr, betas=betas, eps=eps, weight_decay=decay, loss_func=LOSS, method=method
    )
    run(model, opt, data)
    quantity = HesScale() if method == "hesscale" else BL89()
    reference_run(reference, data, lr, betas, eps, decay, quantity)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_second_moment_is_the_engines_hesscale_squared():
    model = Residual().to(torch.float64)
    (x, y), beta2 = batches(1)[0], 0.9
    expected = compute(model, LOSS, x, y, [HesScale()])["HesScale"]
    opt = AdaHesScale(model, betas=(0.5, beta2), loss_func=LOSS)
    run(model, opt, [(x, y)])
    for name, p in model.named_parameters():
        v = opt.state[p]["exp_avg_sq"]
        torch.testing.assert_close(v, (1 - beta2) * expected[name].square())


def test_state_dict_resumes_bit_identically():
    model, data = Residual().to(torch.float64), batches(6)
    opt = AdaHesScale(model, lr=0.05, loss_func=LOSS)
    run(model, opt, data[:3])
    resumed = copy.deepcopy(model)
    resumed_opt = AdaHesScale(resumed, lr=0.05, loss_func=LOSS)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, data[3:])
    run(resumed, resumed_opt, data[3:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("option", "value"),
    [("lr", -1.0), ("betas", (0.9, 1.0)), ("betas", (0.9,)), ("eps", 0.0), ("weight_decay", -1)],
)
def test_bad_hyperparameters_name_the_argument(option, value):
    with pytest.raises(ValueError, match=option):
        AdaHesScale(mlp(), **{option: value})


def test_bad_method_and_missing_closure():
    with pytest.raises(ValueError, match="method"):
        AdaHesScale(mlp(), method="hesscale-exact")
    with pytest.raises(TypeError, match="closure"):
        AdaHesScale(mlp()).step(None)


def test_trains_on_bundled_fashion_mnist():
    images, labels = load_dataset("bundled", "train")
    x = to_float(images).flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = AdaHesScale(model, lr=0.01, loss_func=LOSS)
    g, losses = torch.Generator().manual_seed(1), []
    for _ in range(40):
        index = torch.randint(0, len(x), (128,), generator=g)
        xb, yb = x[index], labels[index]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = LOSS(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    with torch.no_grad():
        final = float(LOSS(model(x), labels))
    assert final < 0.6 * losses[0], (losses[0], final)
