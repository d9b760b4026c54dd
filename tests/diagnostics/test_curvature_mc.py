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
