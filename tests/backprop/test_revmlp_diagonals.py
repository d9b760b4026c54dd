"""BL89 and HesScale on :class:`curvlab.nn.RevMLP` against their definitions, densely in float64.

Per sample, a block :math:`y_1 = x_1 + F(x_2)`, :math:`y_2 = x_2 + G(y_1)` with branches
:math:`\\phi(z) = \\sigma(z C) W^\\top + b` and the head :math:`f = [y_1, y_2] U` is walked down
by hand: BL89 pushes ``d`` through the fixed matrices as ``(C ⊙ C) d`` and ``(U ⊙ U) d``, through
``proj`` as ``(W ⊙ W)ᵀ d``, through ``σ`` as ``σ'² d + σ'' ∂ℓ/∂a``, and sums a tensor's uses (the
residual stream and the branch input). HesScale is exact along the linear head: each ``proj``
(every one is a last parametric layer, the output reaching it through the residual streams)
gets the exact Hessian of the head, ``H_z = U ∇²ℓ Uᵀ`` restricted to its half, at its output and,
through its own Jacobian, at its input; BL89 carries the rest (the paths through other
branches) with ``d = 0`` at the top.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvlab.backprop import BL89, HesScale, compute
from curvlab.data import load_dataset, to_float
from curvlab.nn import RevMLP
from curvlab.optim import AdaHesScale
from tests import reference
from tests.backprop.test_graph_recursions import _act, _loss_hessian


def _proj(layer: nn.Linear, a: Tensor, d: Tensor, h: Tensor | None, total: dict, key: str):
    """BL89 (``d``) plus exact-head (``h``) parts at ``proj``: parameters into ``total``."""
    j_x, j_p = reference._dense_layer(layer, a.reshape(-1))
    part = j_p.square().T @ d
    d_in = j_x.square().T @ d
    if h is not None:
        part = part + torch.diagonal(j_p.T @ h @ j_p)
        d_in = d_in + torch.diagonal(j_x.T @ h @ j_x)
    total[key] = total.get(key, 0) + part
    return d_in


def _dense(model: RevMLP, loss_func: nn.Module, x: Tensor, y: Tensor, exact: bool) -> dict:
    total: dict[str, Tensor] = {}
    m = model.in_features // 2
    blocks = list(model.body.blocks)
    u = model.projection
    for n in range(x.shape[0]):
        xn, yn = x[n : n + 1], y[n : n + 1]
        z, saved = xn.reshape(1, -1).requires_grad_(), []  # the first block's a_f = p_f
        for block in blocks:
            x1, x2 = z.chunk(2, dim=-1)
            p_f = x2 @ block.f.expansion
            a_f = block.f.activation(p_f)
            y1 = x1 + block.f.proj(a_f)
            p_g = y1 @ block.g.expansion
            a_g = block.g.activation(p_g)
            y2 = x2 + block.g.proj(a_g)
            saved.append((p_f, a_f, p_g, a_g))
            z = torch.cat([y1, y2], dim=-1)
        out = z @ u
        grads = torch.autograd.grad(loss_func(out, yn), [a for s in saved for a in s[1::2]])
        h, d_out = _loss_hessian(loss_func, out, yn)
        h_z = u @ h @ u.T if exact else None
        d_z = torch.zeros(2 * m, dtype=x.dtype) if exact else u.square() @ d_out
        for i in reversed(range(len(blocks))):
            block, (p_f, a_f, p_g, a_g) = blocks[i], saved[i]
            g_f, g_g = grads[2 * i], grads[2 * i + 1]
            d_y1, d_y2 = d_z[:m], d_z[m:]
            h_1, h_2 = (None, None) if h_z is None else (h_z[:m, :m], h_z[m:, m:])
            d_a = _proj(block.g.proj, a_g, d_y2, h_2, total, f"body.blocks.{i}.g.proj")
            d_p = _act(block.g.activation, p_g, d_a, g_g.reshape(-1))
            d_y1 = d_y1 + block.g.expansion.square() @ d_p  # the branch input's use
            d_a = _proj(block.f.proj, a_f, d_y1, h_1, total, f"body.blocks.{i}.f.proj")
            d_p = _act(block.f.activation, p_f, d_a, g_f.reshape(-1))
            d_z = torch.cat([d_y1, d_y2 + block.f.expansion.square() @ d_p])
    return total


def _case(loss: str):
    torch.manual_seed(0)
    model = RevMLP(8, 3, hidden=6, depth=2, nonlinearity="tanh").double()
    x = torch.randn(5, 8, dtype=torch.float64)
    if loss.startswith("ce"):
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (5,))
    return model, nn.MSELoss(reduction="sum"), x, torch.randn(5, 3, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("exact", [False, True])
def test_revmlp_diagonals_match_their_definition(exact, loss):
    model, loss_func, x, y = _case(loss)
    q = HesScale() if exact else BL89()
    ours = compute(model, loss_func, x, y, [q])[q.name]
    r = 1.0 / 5 if loss_func.reduction == "mean" else 1.0
    expected = _dense(model, loss_func, x, y, exact)
    assert {k.rsplit(".", 1)[0] for k in ours} == set(expected)
    for key, value in expected.items():
        actual = torch.cat([ours[f"{key}.weight"].flatten(), ours[f"{key}.bias"].flatten()])
        torch.testing.assert_close(actual, r * value, rtol=1e-9, atol=1e-12)


def test_hesscale_and_bl89_differ_on_revmlp():
    """The exact head matters (``U ∇²ℓ Uᵀ`` is not diagonal): the test above tells them apart."""
    model, loss_func, x, y = _case("ce-mean")
    ours = compute(model, loss_func, x, y, [HesScale(), BL89()])
    name = "body.blocks.1.g.proj.weight"
    assert not torch.allclose(ours["HesScale"][name], ours["BL89"][name])


@pytest.mark.parametrize("method", ["hesscale", "bl89"])
def test_adahesscale_trains_revmlp_on_bundled_fashion_mnist(method):
    images, labels = load_dataset("bundled", "train")
    x = to_float(images).flatten(1)
    torch.manual_seed(0)
    model = RevMLP(784, 10, hidden=64, depth=2)
    loss_func = nn.CrossEntropyLoss()
    optimizer = AdaHesScale(model, lr=3e-4, loss_func=loss_func, method=method)
    g, losses = torch.Generator().manual_seed(1), []
    for _ in range(20):
        index = torch.randint(0, len(x), (128,), generator=g)
        xb, yb = x[index], labels[index]

        def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
            optimizer.zero_grad()
            loss = loss_func(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(optimizer.step(closure).detach()))
    with torch.no_grad():
        final = float(loss_func(model(x), labels))
    assert torch.isfinite(torch.tensor(losses)).all()
    assert final < 0.5 * losses[0], (losses[0], final)


@pytest.mark.parametrize("exact", [False, True])
def test_revmlp_diagonals_with_subsampling(exact):
    model, loss_func, x, y = _case("ce-mean")
    q = HesScale() if exact else BL89()
    ours = compute(model, loss_func, x, y, [q], subsampling=[1, 3])[q.name]
    expected = _dense(model, loss_func, x[[1, 3]], y[[1, 3]], exact)
    for key, value in expected.items():
        actual = torch.cat([ours[f"{key}.weight"].flatten(), ours[f"{key}.bias"].flatten()])
        torch.testing.assert_close(actual, value / 5, rtol=1e-9, atol=1e-12)
