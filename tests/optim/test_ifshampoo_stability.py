"""IFShampoo's factor step stays a descent step under a large gradient (issue 18).

The optim-race's RevMLP (initial loss about 10) diverged at IFShampoo's third update for seed 44
at any learning rate: with the unnormalised step :math:`K \\leftarrow K (I - \\beta_1 m_K)` a
curvature term :math:`B\\,Z^\\top Z` much larger than the identity makes an eigenvalue of
:math:`I - \\beta_1 m_K` large and negative, so :math:`K K^\\top` grows by orders of magnitude
where it should shrink. The authors' ``SIRFShampoo`` divides :math:`\\beta_1` by
:math:`\\max(1, \\|m_K\\|_F)`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.optim import IFShampoo


def _large_gradient_layer(scale: float) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    x = scale * torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (32,))
    return layer, x, y


def _step(layer: nn.Linear, opt: IFShampoo, x: torch.Tensor, y: torch.Tensor) -> float:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(layer(x), y)
        loss.backward()
        return loss

    return float(opt.step(closure).detach())


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_a_large_gradient_shrinks_the_preconditioner(structure):
    layer, x, y = _large_gradient_layer(scale=30.0)
    opt = IFShampoo(layer.parameters(), lr=1e-4, batch_size=32, structure=structure)
    _step(layer, opt, x, y)
    pi_k, pi_c = opt.structures
    weight = opt.state[layer.weight]
    grad = layer.weight.grad.reshape(1, 5, 6)
    assert float((32 * grad.mT @ grad).diagonal(dim1=-2, dim2=-1).max()) > 1e3  # a large term
    for pi, key in ((pi_k, "K"), (pi_c, "C")):
        factor = pi.wrap(tuple(weight[key])).to_dense()[0]
        eigenvalues = torch.linalg.eigvalsh(factor @ factor.T)
        # a curvature term above the identity's shrinks K K^T (unnormalised: it grows ~1e3)
        assert float(eigenvalues.max()) < 1.001  # directions without curvature grow a little
        assert float(eigenvalues.min()) > 0.9  # and by at most beta_1 = 0.01 per step (twice)


def test_a_large_first_loss_does_not_diverge():
    layer, x, y = _large_gradient_layer(scale=30.0)
    opt = IFShampoo(layer.parameters(), lr=1e-4, batch_size=32)
    losses = [_step(layer, opt, x, y) for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # unnormalised: the factors blow up and the loss to ~1e5
