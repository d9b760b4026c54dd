"""curvlab.optim.RootFreeAdam and IFShampoo against their equations, training, state, bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlab.data import load_dataset, to_float
from curvlab.optim import IFShampoo, RootFreeAdam, singd
from tests.optim.moment_reference import LOSS, batches, mlp, moment_loop, run


def grads_of(model, x, y):
    return torch.autograd.grad(LOSS(model(x), y), list(model.parameters()))


def test_rootfree_adam_equals_its_equations():
    model, data = mlp(), batches(3)
    reference = copy.deepcopy(model)
    lr, (beta1, beta2), damping, decay, size = 0.05, (0.8, 0.9), 1e-2, 1e-3, 16
    opt = RootFreeAdam(
        model.parameters(),
        lr=lr,
        betas=(beta1, beta2),
        damping=damping,
        weight_decay=decay,
        batch_size=size,
    )
    run(model, opt, data)

    def rule(t, state, g, p, h):
        state["s"] = beta2 * state.get("s", torch.ones_like(p)) + (1 - beta2) * size * g * g
        state["m"] = beta1 * state.get("m", torch.zeros_like(p)) + g / (state["s"] + damping)
        state["m"] = state["m"] + decay * p
        return lr * state["m"]

    moment_loop(reference, data, rule)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


def test_ifshampoo_first_step_equals_its_equations():
    model, data = mlp(), batches(1)
    reference = copy.deepcopy(model)
    lr, lr_cov, damping, size = 0.05, 0.01, 1e-2, 16
    opt = IFShampoo(
        model.parameters(), lr=lr, lr_cov=lr_cov, damping=damping, batch_size=size, momentum=0.0
    )
    run(model, opt, data)
    for p, q, g in zip(model.parameters(), reference.parameters(), grads_of(reference, *data[0])):
        gm = g.reshape(g.shape[0], -1)  # a bias is one column
        b, a = gm.shape
        eye_a, eye_b = torch.eye(a, dtype=g.dtype), torch.eye(b, dtype=g.dtype)
        m_k = (size * gm.T @ gm + damping * b * eye_a - b * eye_a) / (2 * b)
        m_c = (size * gm @ gm.T + damping * a * eye_b - a * eye_b) / (2 * a)
        # the factor rate is divided by max(1, ||m||_F), as in the authors' SIRFShampoo
        k = eye_a - lr_cov * m_k / max(1.0, float(torch.linalg.matrix_norm(m_k)))
        c = eye_b - lr_cov * m_c / max(1.0, float(torch.linalg.matrix_norm(m_c)))
        step = -lr * (c @ c.T @ gm @ k @ k.T)
        assert torch.allclose(p - q, step.reshape(p.shape), atol=1e-13)


@pytest.mark.parametrize("structure", ["diagonal", "triu_toeplitz"])
def test_ifshampoo_keeps_the_structure(structure):
    model = mlp()
    opt = IFShampoo(model.parameters(), lr=0.01, update_interval=1, structure=structure)
    run(model, opt, batches(3))
    pi = singd.make_structure(structure)
    for p in model.parameters():
        for key in "KC":
            stored = opt.state[p][key]
            assert all(t.ndim == 2 for t in stored)  # [1, d]: the free entries only
            factor = pi.wrap(tuple(stored)).to_dense()
            assert torch.allclose(pi.project(factor), factor, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: RootFreeAdam(ps, lr=0.01, betas=(0.9, 0.9), weight_decay=1e-3),
        lambda ps: IFShampoo(ps, lr=0.01, update_interval=2, weight_decay=1e-3),
    ],
    ids=["RootFreeAdam", "IFShampoo"],
)
def test_state_dict_round_trip_is_bit_identical(make):
    model = mlp()
    opt = make(model.parameters())
    run(model, opt, batches(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    later = batches(3, seed=1)
    run(model, opt, later)
    resumed = mlp()
    resumed.load_state_dict(saved_model)
    resumed_opt = make(resumed.parameters())
    resumed_opt.load_state_dict(saved_opt)
    run(resumed, resumed_opt, later)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


IMAGES, LABELS = load_dataset("bundled", "train")
X = to_float(IMAGES).flatten(1)
SETTINGS = {
    "RootFreeAdam": (RootFreeAdam, {"lr": 0.01, "betas": (0.9, 0.9)}),
    "IFShampoo": (IFShampoo, {"lr": 0.01, "update_interval": 1}),
}


def _fashion(name, dtype=torch.float32, steps=30):
    cls, options = SETTINGS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    opt = cls(model.parameters(), **options)
    g, losses = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        index = torch.randint(0, len(X), (128,), generator=g)
        xb, yb = X[index].to(dtype), LABELS[index]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = LOSS(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    with torch.no_grad():
        final = float(LOSS(model(X.to(dtype)).float(), LABELS))
    return losses, final


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_trains_on_bundled_fashion_mnist(name):
    losses, final = _fashion(name, steps=40)
    assert final < 0.6 * losses[0]  # measured: RootFreeAdam 2.32 -> 0.74, IFShampoo -> 1.03


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_bfloat16_tracks_float32(name):
    losses32, final32 = _fashion(name)
    losses16, final16 = _fashion(name, dtype=torch.bfloat16)
    curve32, curve16 = torch.tensor(losses32), torch.tensor(losses16)
    assert torch.isfinite(curve16).all()
    assert ((curve16 - curve32).abs() / curve32).max() < 0.05
    assert abs(final16 - final32) < 0.05 * final32


@pytest.mark.parametrize(
    "cls, kwargs, culprit",
    [
        (RootFreeAdam, {"lr": -1.0}, "lr"),
        (RootFreeAdam, {"betas": (0.9, 1.0)}, "betas"),
        (RootFreeAdam, {"damping": 0.0}, "damping"),
        (RootFreeAdam, {"weight_decay": -1.0}, "weight_decay"),
        (RootFreeAdam, {"batch_size": 0}, "batch_size"),
        (IFShampoo, {"damping": -1.0}, "damping"),
        (IFShampoo, {"lr_cov": 0.0}, "lr_cov"),
        (IFShampoo, {"momentum": 1.0}, "momentum"),
        (IFShampoo, {"update_interval": 0}, "update_interval"),
        (IFShampoo, {"structure": "banded"}, "banded"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(cls, kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        cls(mlp().parameters(), **kwargs)
