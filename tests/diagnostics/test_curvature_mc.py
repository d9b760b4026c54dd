"""The Monte-Carlo curvature options of ``hessian_trace`` and the TIC (``DiagGGN(mc_samples=1)``).

On a ReLU network the GGN equals the Hessian, so the MC trace is an unbiased estimate of the
Hessian trace: the mean over seeds converges to the dense float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics import HessianTrace, Monitor, TICDiag
from tests import reference


def relu_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    return model, nn.CrossEntropyLoss(), x, y


def monitored(model, loss_func, x, y, instruments, seed):
    with Monitor(model, loss_func, instruments, schedule=1, seed=seed) as monitor:
        model.zero_grad()
        loss = loss_func(model(x), y)
        with monitor(0, loss=loss):
            loss.backward()
    return monitor.latest()


def test_mc_hessian_trace_is_unbiased_on_a_relu_network():
    model, loss_func, x, y = relu_problem()
    want = float(reference.full_hessian(model, loss_func, x, y).trace())
    runs = 200
    values = torch.tensor(
        [
            monitored(model, loss_func, x, y, [HessianTrace(method="mc")], seed)["hessian_trace"]
            for seed in range(runs)
        ],
        dtype=torch.float64,
    )
    assert abs(float(values.mean()) - want) < 5 * float(values.std()) / math.sqrt(runs)


def test_mc_tic_and_trace_share_one_sample_and_are_seeded():
    model, loss_func, x, y = relu_problem()
    instruments = [HessianTrace(method="mc"), TICDiag(curvature="mc")]
    first = monitored(model, loss_func, x, y, instruments, seed=4)
    again = monitored(
        model, loss_func, x, y, [HessianTrace(method="mc"), TICDiag(curvature="mc")], 4
    )
    assert first == again and math.isfinite(first["tic_diag"])


def test_curvature_options_are_checked():
    with pytest.raises(ValueError, match="curvature"):
        TICDiag(curvature="kfac")
    with pytest.raises(ValueError, match="method"):
        HessianTrace(method="ggn")


def test_mc_subsample_trace_is_unbiased_and_shared():
    """``mc-subsample``: S of the N samples in one extra pass; unbiased over seeds for tr(H)."""
    model, loss_func, x, y = relu_problem()
    want = float(reference.full_hessian(model, loss_func, x, y).trace())
    runs, values = 300, []
    for seed in range(runs):
        instruments = [HessianTrace(method="mc-subsample"), TICDiag(curvature="mc-subsample")]
        with Monitor(model, loss_func, instruments, schedule=1, seed=seed, samples=3) as monitor:
            model.zero_grad()
            loss = loss_func(model(x), y)
            with monitor(0, loss=loss):
                loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
        record = monitor.latest()
        assert record["per_sample"] == {"estimated": True, "samples": 3, "batch": 9}
        assert math.isfinite(record["tic_diag"])
        values.append(record["hessian_trace"])
    values = torch.tensor(values, dtype=torch.float64)
    error = 4 * float(values.std()) / math.sqrt(runs)
    assert error < 0.1 * want  # tight enough to fail
    assert abs(float(values.mean()) - want) < error
    # the extra pass leaves .grad as the plain backward does
    model.zero_grad()
    loss_func(model(x), y).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_mc_subsample_of_a_sum_loss_is_rescaled():
    """With ``reduction="sum"`` the subsample's diagonal is scaled by N / S (unbiased)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss_func = nn.MSELoss(reduction="sum")
    want = float(reference.full_hessian(model, loss_func, x, y).trace())
    values = []
    for seed in range(300):
        with Monitor(
            model,
            loss_func,
            [HessianTrace(method="mc-subsample")],
            schedule=1,
            seed=seed,
            samples=4,
        ) as monitor:
            loss = loss_func(model(x), y)
            with monitor(0, loss=loss):
                loss.backward()
        values.append(monitor.latest()["hessian_trace"])
    values = torch.tensor(values, dtype=torch.float64)
    error = 4 * float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - want) < error < 0.2 * want
