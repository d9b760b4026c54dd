"""C11: trace and eigenvalues of G^{-1} H against scipy's generalized eigh, and their invariance."""

import pytest
import scipy.linalg
import torch
from torch import nn

from curvlab.diagnostics import invariant_eigs, invariant_trace
from curvlab.linops import GGN, EmpiricalFisher, Hessian
from tests.reference import full_hessian, ggn


class ScaledLinear(nn.Linear):
    """``nn.Linear`` with its weight stored as ``c W`` and divided by ``c`` in forward."""

    def __init__(self, n_in: int, n_out: int, c: float) -> None:
        super().__init__(n_in, n_out, dtype=torch.float64)
        self.c = c
        with torch.no_grad():
            self.weight.mul_(c)

    def forward(self, x):  # noqa: D102
        return nn.functional.linear(x, self.weight / self.c, self.bias)


def _data(n=24, d=3, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        n, c, generator=g, dtype=torch.float64
    )


def _tanh_net(c: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    first = nn.Linear(3, 4, dtype=torch.float64)
    second = ScaledLinear(4, 2, c)
    torch.manual_seed(1)
    base = nn.Linear(4, 2, dtype=torch.float64)
    with torch.no_grad():
        second.weight.copy_(base.weight * c)
        second.bias.copy_(base.bias)
    return nn.Sequential(first, nn.Tanh(), second)


@pytest.mark.parametrize("metric", ["ggn", "empirical-fisher"])
def test_against_scipy_generalized_eigh(metric):
    x, y = _data()
    model, loss = _tanh_net(), nn.MSELoss()
    damping = 1e-2
    H = full_hessian(model, loss, x, y).numpy()
    if metric == "ggn":
        G = ggn(model, loss, x, y).numpy()
    else:
        G = EmpiricalFisher(model, loss, None, [(x, y)]).dense().numpy()
    expected = scipy.linalg.eigh(H, G + damping * torch.eye(len(H)).numpy(), eigvals_only=True)
    got = invariant_eigs(model, loss, [(x, y)], k=5, metric=metric, damping=damping)
    torch.testing.assert_close(
        got, torch.from_numpy(expected[::-1][:5].copy()), rtol=1e-6, atol=1e-8
    )
    trace = invariant_trace(model, loss, [(x, y)], metric=metric, damping=damping)
    assert trace == pytest.approx(expected.sum(), rel=1e-6)


def test_hutchpp_matches_exact_trace():
    x, y = _data()
    model, loss, data = _tanh_net(), nn.MSELoss(), [(_data()[0], _data()[1])]
    exact = invariant_trace(model, loss, data, damping=1e-2)
    P = sum(p.numel() for p in model.parameters())
    estimate = invariant_trace(model, loss, data, damping=1e-2, method="hutch++", num_matvecs=3 * P)
    assert estimate == pytest.approx(exact, rel=1e-5)


def test_user_operator_metric():
    x, y = _data()
    model, loss, data = _tanh_net(), nn.MSELoss(), [(x, y)]
    G = GGN(model, loss, None, data)
    assert invariant_trace(model, loss, data, metric=G, damping=1e-3) == pytest.approx(
        invariant_trace(model, loss, data, metric="ggn", damping=1e-3), rel=1e-12
    )


def test_stored_scale_changes_hessian_not_invariants():
    """theta = psi / c for one weight: same function, H and G both become J^T (.) J."""
    x, y = _data()
    loss, data = nn.MSELoss(), [(x, y)]
    plain, scaled = _tanh_net(1.0), _tanh_net(10.0)
    torch.testing.assert_close(plain(x), scaled(x))
    h_plain = Hessian(plain, loss, None, data).dense()
    h_scaled = Hessian(scaled, loss, None, data).dense()
    assert torch.trace(h_plain) > 1.3 * torch.trace(h_scaled)
    top = torch.linalg.eigvalsh(h_plain)[-1] / torch.linalg.eigvalsh(h_scaled)[-1]
    assert top > 1.1
    # P = 26 < N C = 48: the GGN is positive definite, no damping needed
    for fn in (invariant_trace,):
        assert fn(plain, loss, data, damping=0.0) == pytest.approx(
            fn(scaled, loss, data, damping=0.0), rel=1e-7
        )
    torch.testing.assert_close(
        invariant_eigs(plain, loss, data, k=3, damping=0.0),
        invariant_eigs(scaled, loss, data, k=3, damping=0.0),
        rtol=1e-7,
        atol=1e-9,
    )


def _relu_net(alpha: float, hidden=(5, 4)) -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(3, hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], 2),
    ).double()
    with torch.no_grad():
        net[0].weight.mul_(alpha)
        net[0].bias.mul_(alpha)
        net[2].weight.div_(alpha)
    return net


def test_relu_rescaling_at_a_minimum():
    """Scale layer 1 by alpha, layer 2's weight by 1/alpha: at a realisable target (a minimum)."""
    x = _data(n=40)[0]
    teacher = _relu_net(1.0)
    y = teacher(x).detach()
    loss, data = nn.MSELoss(), [(x, y)]
    a, b = _relu_net(1.0), _relu_net(4.0)
    torch.testing.assert_close(a(x), b(x))
    ha, hb = (Hessian(m, loss, None, data).dense() for m in (a, b))
    assert abs(torch.trace(ha) - torch.trace(hb)) > 0.1 * torch.trace(ha)
    damping = 1e-9
    ta, tb = (invariant_trace(m, loss, data, damping=damping) for m in (a, b))
    assert ta == pytest.approx(tb, rel=1e-4)
    torch.testing.assert_close(
        invariant_eigs(a, loss, data, k=4, damping=damping),
        invariant_eigs(b, loss, data, k=4, damping=damping),
        rtol=1e-4,
        atol=1e-6,
    )


def test_damping_breaks_invariance_on_a_singular_ggn():
    """6-8-3 ReLU, cross-entropy, away from a minimum: GGN rank 66 of 83.

    H is not zero on the GGN's null space (the gradient term), so the damped trace grows like
    1/delta there and the rescaled network disagrees at every damping (docs/diagnostics.md).
    """
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    loss, data = nn.CrossEntropyLoss(), [(x, y)]

    def net(alpha):
        torch.manual_seed(5)
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        with torch.no_grad():
            m[0].weight.mul_(alpha)
            m[0].bias.mul_(alpha)
            m[2].weight.div_(alpha)
        return m

    G = GGN(net(1.0), loss, None, data).dense()
    assert torch.linalg.matrix_rank(G, hermitian=True).item() == 66
    traces = {
        d: [invariant_trace(net(a), loss, data, damping=d) for a in (1.0, 3.0)]
        for d in (1e-1, 1e-5, 1e-6)
    }
    for ta, tb in traces.values():
        assert abs(ta - tb) > 0.2 * abs(ta)
    assert traces[1e-5][0] / traces[1e-6][0] == pytest.approx(0.1, rel=0.05)


def test_errors_name_the_argument():
    x, y = _data()
    model, loss, data = _tanh_net(), nn.MSELoss(), [(x, y)]
    with pytest.raises(ValueError, match="metric"):
        invariant_trace(model, loss, data, metric="hessian")
    with pytest.raises(ValueError, match="method"):
        invariant_trace(model, loss, data, method="lanczos")
    with pytest.raises(ValueError, match="k must"):
        invariant_eigs(model, loss, data, k=0)
    with pytest.raises(ValueError, match="max_params"):
        invariant_eigs(model, loss, data, k=1, max_params=3)


def test_pseudo_inverse_route_against_numpy_and_its_breakage():
    """G^+ H on the 6-8-3 CE ReLU net: equals numpy's pinv, and is not invariant either."""
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    loss, data = nn.CrossEntropyLoss(), [(x, y)]

    def net(alpha):
        torch.manual_seed(5)
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        with torch.no_grad():
            m[0].weight.mul_(alpha)
            m[0].bias.mul_(alpha)
            m[2].weight.div_(alpha)
        return m

    model = net(1.0)
    G = GGN(model, loss, None, data).dense()
    H = Hessian(model, loss, None, data).dense()
    product = torch.linalg.pinv(G, rtol=1e-10, hermitian=True) @ H
    got = invariant_trace(model, loss, data, damping=0.0, pinv_rcond=1e-10)
    assert got == pytest.approx(torch.trace(product).item(), rel=1e-6)
    expected = torch.linalg.eigvals(product).real.sort(descending=True).values[:3]
    eigs = invariant_eigs(model, loss, data, k=3, damping=0.0, pinv_rcond=1e-10)
    torch.testing.assert_close(eigs, expected, rtol=1e-6, atol=1e-8)
    rescaled = invariant_trace(net(3.0), loss, data, damping=0.0, pinv_rcond=1e-10)
    assert abs(rescaled - got) > 0.5 * abs(got)
    with pytest.raises(ValueError, match="pinv_rcond needs method='exact'"):
        invariant_trace(model, loss, data, method="hutchinson", pinv_rcond=1e-10)
