"""BL89 and HesScale on residual and branching graphs against their definitions, densely.

The definition on a graph: per sample, a diagonal ``d`` at every activation, pushed through each
module as ``(J ⊙ J)ᵀ d`` (activations ``φ'² d + φ'' ∂ℓ/∂a``), a tensor consumed several times
summing its consumers' contributions, glue ops with 0/1 Jacobians passing ``d`` on (a sum sends
``d`` to both summands, a concatenation splits it). Built below from dense per-sample Jacobians
(``tests/reference.py``), written out for each model.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, hessian

from curvlab.backprop import BL89, KFLR, KFRA, HesScale, UnsupportedModuleError, compute
from tests import reference


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.tanh, self.lin1 = nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5)
        self.sig, self.lin2 = nn.Sigmoid(), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h0 = self.lin0(x)
        r = h0 + self.lin1(self.tanh(h0))
        return self.lin2(self.sig(r))


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Linear(4, 5), nn.Softplus()
        self.left, self.left_act = nn.Linear(5, 3), nn.Tanh()
        self.right, self.right_act = nn.Linear(5, 2), nn.Sigmoid()
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        s = self.act(self.stem(x))
        h = torch.cat([self.left_act(self.left(s)), self.right_act(self.right(s))], dim=1)
        return self.head(0.5 * h - h.mean(1, keepdim=True))


def _phi(module: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    f = lambda t: module(t)  # noqa: E731
    return torch.func.vmap(grad(f))(h), torch.func.vmap(grad(grad(f)))(h)


def _act(module, h, d, g):
    first, second = _phi(module, h.reshape(-1))
    return first.square() * d + second * g


def _lin(layer, x, d, total, key, h=None):
    """Parameter diagonals into ``total[key]``; ``(J ⊙ J)ᵀ d`` (or exact with ``h``) returned."""
    j_x, j_p = reference._dense_layer(layer, x.reshape(-1))
    total[key] = total.get(key, 0) + j_p.square().T @ d
    return torch.diagonal(j_x.T @ h @ j_x) if h is not None else j_x.square().T @ d


def _per_sample(model, loss_func, x, y):
    for n in range(x.shape[0]):
        yield x[n : n + 1], y[n : n + 1]


def _loss_hessian(loss_func, out, y):
    h = hessian(lambda o: loss_func(o.reshape(out.shape), y))(out.reshape(-1).detach())
    return h, torch.diagonal(h).clone()


def _dense_residual(model: Residual, loss_func, x, y, exact: bool) -> Tensor:
    total: dict[str, Tensor] = {}
    for xn, yn in _per_sample(model, loss_func, x, y):
        h0 = model.lin0(xn)
        a = model.tanh(h0)
        r = h0 + model.lin1(a)
        b = model.sig(r)
        out = model.lin2(b)
        g_a, g_b = torch.autograd.grad(loss_func(out, yn), [a, b])
        h, d_out = _loss_hessian(loss_func, out, yn)
        d_b = _lin(model.lin2, b, d_out, total, "lin2", h if exact else None)
        d_r = _act(model.sig, r, d_b, g_b.reshape(-1))
        d_a = _lin(model.lin1, a, d_r, total, "lin1")
        d_h0 = d_r + _act(model.tanh, h0, d_a, g_a.reshape(-1))  # the residual sums both uses
        _lin(model.lin0, xn, d_h0, total, "lin0")
    return torch.cat([total[k] for k in ("lin0", "lin1", "lin2")])


def _dense_branches(model: Branches, loss_func, x, y, exact: bool) -> Tensor:
    total: dict[str, Tensor] = {}
    for xn, yn in _per_sample(model, loss_func, x, y):
        z = model.stem(xn)
        s = model.act(z)
        zl, zr = model.left(s), model.right(s)
        al, ar = model.left_act(zl), model.right_act(zr)
        hcat = torch.cat([al, ar], dim=1)
        u = 0.5 * hcat - hcat.mean(1, keepdim=True)
        out = model.head(u)
        g_s, g_al, g_ar = torch.autograd.grad(loss_func(out, yn), [s, al, ar])
        h, d_out = _loss_hessian(loss_func, out, yn)
        d_u = _lin(model.head, u, d_out, total, "head", h if exact else None)
        # u = 0.5 h - mean(h): (J ⊙ J)ᵀ with entries 0.5 and -1/5 applied op by op
        d_h = 0.25 * d_u + (d_u.sum() / 25.0)
        d_al, d_ar = d_h[:3], d_h[3:]
        d_zl = _act(model.left_act, zl, d_al, g_al.reshape(-1))
        d_zr = _act(model.right_act, zr, d_ar, g_ar.reshape(-1))
        d_s = _lin(model.left, s, d_zl, total, "left") + _lin(model.right, s, d_zr, total, "right")
        d_z = _act(model.act, z, d_s, g_s.reshape(-1))
        _lin(model.stem, xn, d_z, total, "stem")
    return torch.cat([total[k] for k in ("stem", "left", "right", "head")])


MODELS = {"residual": (Residual, _dense_residual), "branches": (Branches, _dense_branches)}


def _graph_case(cls: type[nn.Module], loss: str):
    """``(model, loss_func, x, y)``: five samples, cross-entropy (mean) or MSE (sum)."""
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    if loss.startswith("ce"):
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (5,))
    return model, nn.MSELoss(reduction="sum"), x, torch.randn(5, 3, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_graph_diagonals_match_their_definition(model_name, exact, loss):
    cls, dense = MODELS[model_name]
    model, loss_func, x, y = _graph_case(cls, loss)
    q = HesScale() if exact else BL89()
    ours = compute(model, loss_func, x, y, [q])[q.name]
    r = 1.0 / 5 if loss_func.reduction == "mean" else 1.0
    actual = torch.cat([v.flatten() for v in ours.values()])
    torch.testing.assert_close(
        actual, r * dense(model, loss_func, x, y, exact), rtol=1e-9, atol=1e-12
    )


def test_graph_diagonals_with_subsampling():
    torch.manual_seed(0)
    model = Residual().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss_func = nn.CrossEntropyLoss()
    ours = compute(model, loss_func, x, y, [BL89()], subsampling=[1, 3])["BL89"]
    expected = _dense_residual(model, loss_func, x[[1, 3]], y[[1, 3]], False) / 5
    torch.testing.assert_close(torch.cat([v.flatten() for v in ours.values()]), expected)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))  # a nonlinearity outside any module


def test_functional_nonlinearity_between_modules_is_named():
    model = Functional().double()
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randint(0, 2, (3,))
    with pytest.raises(
        UnsupportedModuleError, match=r"the operation TanhBackward0 between modules"
    ):
        compute(model, nn.CrossEntropyLoss(), x, y, [BL89()])


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


def test_hesscale_with_parallel_last_layers():
    """Two last layers in parallel: each is exact at its output, where BL89 is exact too."""
    model = TwoHeads().double()
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randint(0, 2, (3,))
    ours = compute(model, nn.CrossEntropyLoss(), x, y, [HesScale(), BL89()])
    for name, value in ours["BL89"].items():
        torch.testing.assert_close(ours["HesScale"][name], value)


# ------------------------------------------------------------------------------- KFRA
def _first(module, h):
    return torch.func.vmap(torch.func.vmap(grad(lambda t: module(t))))(h)  # [N, D]


def _avg_outer(v: Tensor) -> Tensor:
    return v.T @ v / v.shape[0]


def _kfra_residual(model: Residual, loss_func, x, y) -> dict[str, Tensor]:
    """Output factors B by the definition, written out for the residual model."""
    h0 = model.lin0(x)
    a = model.tanh(h0)
    r = h0 + model.lin1(a)
    out = model.lin2(model.sig(r))
    scale = 1.0 / x.shape[0] if loss_func.reduction == "mean" else 1.0
    g_out = scale * sum(
        _loss_hessian(loss_func, out[n : n + 1], y[n : n + 1])[0] for n in range(x.shape[0])
    )
    w1, w2 = model.lin1.weight, model.lin2.weight
    g_b = w2.T @ g_out @ w2
    g_r = g_b * _avg_outer(_first(model.sig, r))
    g_h1 = g_r  # the sum: each summand gets the whole of its output's block
    g_a = w1.T @ g_h1 @ w1
    g_h0 = g_r + g_a * _avg_outer(_first(model.tanh, h0))  # both uses of h0
    return {"lin0": g_h0, "lin1": g_h1, "lin2": g_out}


def _kfra_branches(model: Branches, loss_func, x, y) -> dict[str, Tensor]:
    z = model.stem(x)
    s = model.act(z)
    zl, zr = model.left(s), model.right(s)
    hcat = torch.cat([model.left_act(zl), model.right_act(zr)], dim=1)
    out = model.head(0.5 * hcat - hcat.mean(1, keepdim=True))
    scale = 1.0 / x.shape[0] if loss_func.reduction == "mean" else 1.0
    g_out = scale * sum(
        _loss_hessian(loss_func, out[n : n + 1], y[n : n + 1])[0] for n in range(x.shape[0])
    )
    g_u = model.head.weight.T @ g_out @ model.head.weight
    glue = 0.5 * torch.eye(5, dtype=x.dtype) - torch.full((5, 5), 0.2, dtype=x.dtype)  # du/dh
    j_left, j_right = glue[:, :3], glue[:, 3:]
    g_zl = (j_left.T @ g_u @ j_left) * _avg_outer(_first(model.left_act, zl))
    g_zr = (j_right.T @ g_u @ j_right) * _avg_outer(_first(model.right_act, zr))
    wl, wr = model.left.weight, model.right.weight
    g_s = wl.T @ g_zl @ wl + wr.T @ g_zr @ wr
    g_z = g_s * _avg_outer(_first(model.act, z))
    return {"stem": g_z, "left": g_zl, "right": g_zr, "head": g_out}


KFRA_MODELS = {"residual": (Residual, _kfra_residual), "branches": (Branches, _kfra_branches)}


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("model_name", list(KFRA_MODELS))
def test_graph_kfra_matches_its_definition(model_name, loss):
    cls, dense = KFRA_MODELS[model_name]
    model, loss_func, x, y = _graph_case(cls, loss)
    ours = compute(model, loss_func, x, y, [KFRA(), KFLR()])
    with torch.no_grad():
        expected = dense(model, loss_func, x, y)
    for layer, b in expected.items():
        for param in ("weight", "bias"):
            block = ours["KFRA"][f"{layer}.{param}"]
            torch.testing.assert_close(block.output_factor[0], b, rtol=1e-9, atol=1e-12, msg=layer)
        kflr = ours["KFLR"][f"{layer}.weight"]  # the input factors are KFLR's (one position)
        torch.testing.assert_close(ours["KFRA"][f"{layer}.weight"].input_factor, kflr.input_factor)


def test_graph_kfra_equals_kflr_for_one_sample():
    torch.manual_seed(0)
    model = Residual().double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.randint(0, 3, (1,))
    results = compute(model, nn.CrossEntropyLoss(), x, y, [KFRA(), KFLR()])
    for name, block in results["KFLR"].items():
        if name.startswith("lin0"):
            continue  # h0 has two uses: KFRA drops the cross term between them, KFLR keeps it
        torch.testing.assert_close(results["KFRA"][name].dense(), block.dense(), msg=name)
