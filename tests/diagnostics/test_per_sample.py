"""The shared per-sample statistics on convolutions, and the histogram estimates' unbiasedness.

Convolutions take the path that forms each layer's per-sample gradients once (or samples
blocks of them); ``tests/diagnostics/test_monitor.py`` covers the factored ``Linear`` path.
Everything against per-sample gradients from ``tests/reference.py`` in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics import GradientHistogram1d, GradientHistogram2d, Monitor
from curvlab.diagnostics.per_sample import PerSampleStatistics, block_sample
from tests import reference
from tests.diagnostics.test_cockpit_instruments import alpha_by_definition, per_sample_losses

N = 7


def conv_problem(seed: int = 0):
    """A small tanh CNN (two convolutions, one linear layer) in float64, CE loss, a batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(18, 3),
    ).double()
    x = torch.randn(N, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    return model, nn.CrossEntropyLoss(), x, y


def step(model, loss_func, x, y, monitor, number=0, optimizer=None):
    model.zero_grad()
    loss = loss_func(model(x), y)
    with monitor(number, loss=loss, optimizer=optimizer):
        loss.backward()
    return monitor.latest()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_gradient_tests_on_convolutions_equal_their_definitions():
    model, loss_func, x, y = conv_problem()
    names = [
        "norm_test",
        "inner_product_test",
        "orthogonality_test",
        "mean_gsnr",
        "batch_grad_norms",
    ]
    with Monitor(model, loss_func, names, schedule=1) as monitor:
        record = step(model, loss_func, x, y, monitor)
    G = reference.per_sample_gradients(model, loss_func, x, y)
    mean = G.mean(0)
    m = mean.square().sum()
    dots = G @ mean
    orthogonal = G - (dots / m)[:, None] * mean
    want = {
        "norm_test": math.sqrt((G - mean).square().sum() / (N * (N - 1) * m)),
        "inner_product_test": math.sqrt((dots - m).square().sum() / (N * (N - 1) * m**2)),
        "orthogonality_test": math.sqrt(orthogonal.square().sum() / (N * (N - 1) * m)),
        "mean_gsnr": float((mean.square() / (G.var(0, correction=0) + 1e-5)).mean()),
        "batch_grad_norms": float(G.norm(dim=1).max()),
    }
    got = {k: record[k] for k in want}
    got["batch_grad_norms"] = record["batch_grad_norms"]["max"]
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_alpha_on_convolutions_equals_its_definition(optimizer):
    model, loss_func, x, y = conv_problem()
    _, _, x1, y1 = conv_problem(seed=1)
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.2),
        "adam": lambda p: torch.optim.Adam(p, 0.05),
    }
    opt = make[optimizer](model.parameters())
    plain = nn.CrossEntropyLoss()
    points, records = [], []
    with Monitor(model, loss_func, ["alpha"]) as monitor:
        for number, (xb, yb) in enumerate([(x, y), (x1, y1)]):
            points.append(
                {
                    "theta": flat(model),
                    "G": reference.per_sample_gradients(model, plain, xb, yb),
                    "losses": per_sample_losses(model, plain, xb, yb),
                }
            )
            records.append(step(model, loss_func, xb, yb, monitor, number, opt))
            opt.step()
    assert records[1]["alpha"] == pytest.approx(alpha_by_definition(*points), rel=1e-7)


def histograms(budget):
    return [
        GradientHistogram1d(bins=6, range=(-0.05, 0.05), budget=budget),
        GradientHistogram2d(bins=(3, 4), range=((-0.05, 0.05), (-0.4, 0.4)), budget=budget),
    ]


def exact_counts(model, loss_func, x, y):
    G = reference.per_sample_gradients(model, loss_func, x, y)
    counts_1d, _ = torch.histogram(G.clamp(-0.05, 0.05).flatten(), bins=6, range=(-0.05, 0.05))
    theta = flat(model).expand(N, -1)
    points = torch.stack([G.clamp(-0.05, 0.05).flatten(), theta.clamp(-0.4, 0.4).flatten()], 1)
    counts_2d, _ = torch.histogramdd(points, bins=[3, 4], range=[-0.05, 0.05, -0.4, 0.4])
    return counts_1d, counts_2d


@pytest.mark.parametrize("with_dots", [False, True], ids=["sampled-blocks", "from-rows"])
def test_exact_histograms_equal_torch_histogram(with_dots):
    model, loss_func, x, y = conv_problem()
    extra = ["orthogonality_test"] if with_dots else []  # norms and dots: the first layer's rows
    with Monitor(model, loss_func, [*histograms(None), *extra], schedule=1) as monitor:
        record = step(model, loss_func, x, y, monitor)
    counts_1d, counts_2d = exact_counts(model, loss_func, x, y)
    one, two = record["gradient_histogram_1d"], record["gradient_histogram_2d"]
    assert not one["estimated"] and one["elements"] == one["total"] == counts_1d.sum()
    assert one["counts"] == counts_1d.long().tolist()
    assert two["counts"] == counts_2d.long().tolist()


@pytest.mark.parametrize("with_dots", [False, True], ids=["sampled-blocks", "from-rows"])
def test_histogram_estimates_are_unbiased(with_dots):
    """The mean of the estimates over seeds converges to the exact counts (5 standard errors)."""
    model, loss_func, x, y = conv_problem()
    extra = ["orthogonality_test"] if with_dots else []  # norms and dots: the first layer's rows
    runs = 300
    estimates_1d, estimates_2d = [], []
    for seed in range(runs):
        with Monitor(model, loss_func, [*histograms(24), *extra], seed=seed) as monitor:
            record = step(model, loss_func, x, y, monitor)
        estimates_1d.append(record["gradient_histogram_1d"]["counts"])
        estimates_2d.append(record["gradient_histogram_2d"]["counts"])
    assert record["gradient_histogram_1d"]["estimated"]
    assert record["gradient_histogram_1d"]["elements"] < record["gradient_histogram_1d"]["total"]
    exact_1d, exact_2d = exact_counts(model, loss_func, x, y)
    for estimates, exact in ((estimates_1d, exact_1d), (estimates_2d, exact_2d)):
        values = torch.tensor(estimates, dtype=torch.float64)
        mean, error = values.mean(0), values.std(0) / math.sqrt(runs)
        assert bool((mean - exact).abs().le(5 * error + 1e-9).all()), (mean, exact, error)


def test_histogram_estimate_is_seeded():
    model, loss_func, x, y = conv_problem()
    records = []
    for _ in range(2):
        with Monitor(model, loss_func, histograms(24), seed=3) as monitor:
            records.append(step(model, loss_func, x, y, monitor)["gradient_histogram_1d"])
    assert records[0] == records[1]


def test_block_sample_draws_each_element_equally_often():
    """E[times (n, r, c) is drawn] = S R C / (N p) for every element."""
    gen = torch.Generator().manual_seed(0)
    n, first, rest, budget, runs = 3, 4, 5, 10, 4000
    hits = torch.zeros(n, first, rest, dtype=torch.float64)
    for _ in range(runs):
        samples, rows, columns = block_sample(n, first, rest, budget, gen, "cpu")
        for s, sample in enumerate(samples.tolist()):
            for r in rows[s].tolist():
                for c in columns[s].tolist():
                    hits[sample, r, c] += 1
    per_run = samples.shape[0] * rows.shape[1] * columns.shape[1]
    expected = runs * per_run / hits.numel()
    assert bool(((hits - expected).abs() < 5 * math.sqrt(expected)).all())


def test_unknown_statistics_are_named():
    with pytest.raises(ValueError, match="unknown per-sample statistics"):
        PerSampleStatistics(["sq_norm"])


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_alpha_on_a_wide_mlp_equals_its_definition(optimizer):
    """Wide layers (N (in + out) < in out): under plain SGD the end point's projections come from
    cross Gram matrices with the kept start; with momentum from one product per layer."""

    def wide_mlp() -> nn.Module:
        layers = [nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 25), nn.Tanh(), nn.Linear(25, 3)]
        return nn.Sequential(*layers).double()

    torch.manual_seed(0)
    model, twin = wide_mlp(), wide_mlp()  # the twin computes the references (no hooks)
    loss_func, plain = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    batches = [
        (torch.randn(N, 20, dtype=torch.float64), torch.randint(0, 3, (N,))) for _ in range(3)
    ]
    momentum = 0.9 if optimizer == "momentum" else 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum)
    points, records = [], []
    with Monitor(model, loss_func, ["alpha"]) as monitor:
        for number, (xb, yb) in enumerate(batches):
            twin.load_state_dict(model.state_dict())
            points.append(
                {
                    "theta": flat(model),
                    "G": reference.per_sample_gradients(twin, plain, xb, yb),
                    "losses": per_sample_losses(twin, plain, xb, yb),
                }
            )
            records.append(step(model, loss_func, xb, yb, monitor, number, opt))
            opt.step()
    for k in (1, 2):
        assert records[k]["alpha"] == pytest.approx(
            alpha_by_definition(*points[k - 1 : k + 1]), rel=1e-7
        )
