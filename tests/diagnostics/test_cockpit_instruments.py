"""Alpha, CABS, early stopping, gradient histograms and TIC against their definitions.

Each definition is computed directly from the per-sample gradients of ``tests/reference.py``
(``torch.func.jacrev`` of the per-sample losses) and the dense Hessian, in float64.
"""

from __future__ import annotations

import pytest
import torch

from curvlab.diagnostics import (
    GradientHistogram1d,
    GradientHistogram2d,
    Monitor,
)
from tests import reference
from tests.diagnostics.test_monitor import LOSSES, N, monitored_step, problem


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def mean_scale(loss_func) -> float:
    return 1.0 if loss_func.reduction == "mean" else 1.0 / N


def one_step(loss: str, instruments: list, optimizer_lr: float | None = None):
    model, loss_func, x, y = problem(loss)
    optimizer = None if optimizer_lr is None else torch.optim.SGD(model.parameters(), optimizer_lr)
    with Monitor(model, loss_func, instruments, schedule=1) as monitor:
        batch_loss = monitored_step(model, loss_func, x, y, monitor, optimizer=optimizer)
    G = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    return monitor.latest(), G, model, loss_func, x, y, batch_loss


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_cabs_is_lr_times_variance_trace_over_mean_loss(loss):
    record, G, _, loss_func, _, _, batch_loss = one_step(loss, ["cabs"], optimizer_lr=0.3)
    variance = G.var(0, correction=0).sum()
    want = 0.3 * float(variance) / (float(batch_loss) * mean_scale(loss_func))
    assert record["cabs"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_early_stopping_is_one_minus_n_times_mean_snr(loss):
    record, G, *_ = one_step(loss, ["early_stopping"])
    snr = G.mean(0).square() / (G.var(0, correction=1) + 1e-5)
    assert record["early_stopping"] == pytest.approx(1 - N * float(snr.mean()), rel=1e-9)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("kind", ["diag", "trace"])
def test_tic_against_per_sample_gradients_and_the_hessian(loss, kind):
    record, G, model, loss_func, x, y, _ = one_step(loss, [f"tic_{kind}"])
    second = G.square().mean(0)  # diag of (1/N) sum_n g_n g_n^T
    h = reference.full_hessian(model, loss_func, x, y).diagonal() * mean_scale(loss_func)
    if kind == "diag":
        want = float((second / (h + 1e-7)).sum())
    else:
        want = float(second.sum() / (h.sum() + 1e-7))
    assert record[f"tic_{kind}"] == pytest.approx(want, rel=1e-8)


def test_gradient_histogram_1d_against_torch_histogram():
    low, high = -0.3, 0.3
    record, G, *_ = one_step("ce-mean", [GradientHistogram1d(bins=7, range=(low, high))])
    counts, edges = torch.histogram(G.clamp(low, high).flatten(), bins=7, range=(low, high))
    value = record["gradient_histogram_1d"]
    assert value["counts"] == counts.long().tolist() and value["edges"] == pytest.approx(
        edges.tolist()
    )


def test_gradient_histogram_2d_against_torch_histogramdd():
    bins, ranges = (5, 6), ((-0.2, 0.2), (-0.5, 0.5))
    record, G, model, *_ = one_step("mse-sum", [GradientHistogram2d(bins, ranges)])
    theta = flat_params(model).expand(N, -1)
    points = torch.stack([G.clamp(*ranges[0]).flatten(), theta.clamp(*ranges[1]).flatten()], dim=1)
    counts, _ = torch.histogramdd(points, bins=list(bins), range=[*ranges[0], *ranges[1]])
    value = record["gradient_histogram_2d"]
    assert value["counts"] == counts.long().tolist() and sum(map(sum, value["counts"])) == G.numel()


def per_sample_losses(model, loss_func, x, y) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
        return torch.stack([loss_func(out[n : n + 1], y[n : n + 1]) for n in range(N)])


def alpha_by_definition(start: dict, end: dict) -> float:
    """The weighted least-squares parabola through both points' losses and slopes."""
    d = end["theta"] - start["theta"]
    t = float(d.norm())
    fs, dfs, var_f, var_df = [], [], [], []
    for point in (start, end):
        slopes = point["G"] @ d / t
        fs.append(float(point["losses"].mean()))
        dfs.append(float(slopes.mean()))
        var_f.append(float(point["losses"].var()))
        var_df.append(float(slopes.var()))
    design = torch.tensor([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=torch.float64)
    root_w = torch.tensor(var_f + var_df, dtype=torch.float64).rsqrt()
    observed = torch.tensor(fs + dfs, dtype=torch.float64)
    mu = torch.linalg.lstsq(root_w[:, None] * design, (root_w * observed)[:, None]).solution[:, 0]
    return 2 * t / float(-mu[1] / mu[2]) - 1 if mu[2] > 0 else -1.0


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_alpha_against_its_definition(loss, optimizer):
    """Two steps on two batches; any optimizer (the direction is the update taken)."""
    model, loss_func, x, y = problem(loss)
    _, _, x1, y1 = problem(loss, seed=1)
    batches = [(x, y), (x1, y1)]
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.2),
        "adam": lambda p: torch.optim.Adam(p, 0.05),
    }
    opt = make[optimizer](model.parameters())
    points, records = [], []
    plain_loss = LOSSES[loss][0]()  # the monitored loss_func runs once per step
    with Monitor(model, loss_func, ["alpha"]) as monitor:
        for step, (xb, yb) in enumerate(batches):
            points.append(
                {
                    "theta": flat_params(model),
                    "G": reference.per_sample_gradients(model, plain_loss, xb, yb),
                    "losses": per_sample_losses(model, plain_loss, xb, yb),
                }
            )
            monitored_step(model, loss_func, xb, yb, monitor, step, opt)
            records.append(monitor.latest())
            opt.step()
    assert "alpha" not in records[0]
    assert records[1]["alpha"] == pytest.approx(alpha_by_definition(*points), rel=1e-7, abs=1e-10)


def test_alpha_is_left_out_after_an_unmonitored_step():
    model, loss_func, x, y = problem("ce-mean")
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    seen = []
    with Monitor(model, loss_func, ["alpha", "loss"]) as monitor:
        for step in (0, 1, 3, 4):
            monitored_step(model, loss_func, x, y, monitor, step, opt)
            seen.append("alpha" in monitor.latest())
            opt.step()
    assert seen == [False, True, False, True]
