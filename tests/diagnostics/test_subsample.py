"""The per-sample statistics on a subsample (``Monitor(samples=S)``): estimates of the batch's.

The squared norm, inner-product and orthogonality statistics and the TIC's second moment are
unbiased from a uniform subsample drawn without replacement: their mean over many seeds must
converge to the exact value (computed with ``samples=None``, checked against per-sample
gradients by a loop), within four standard errors of the seeds' mean, a tolerance of a few
percent that a biased estimator (the subsample's own sums, not rescaled) fails by far. The
records say that (and from how many samples) they were estimated; alpha is finite from a
subsample and uses the exact slope means.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics import Monitor
from tests import reference

N, S, SEEDS = 12, 4, 300
SQUARED = ("norm_test", "inner_product_test", "orthogonality_test")


def problem():
    """A small conv + linear tanh net in float64 (a non-factored and factored layers)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()
    x = torch.randn(N, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    return model, nn.CrossEntropyLoss(), x, y


def record(samples: int | None, seed: int, names) -> dict:
    model, loss_func, x, y = problem()
    with Monitor(model, loss_func, list(names), schedule=1, samples=samples, seed=seed) as mon:
        loss = loss_func(model(x), y)
        with mon(0, loss=loss):
            loss.backward()
        return mon.latest()


def test_exact_setting_matches_per_sample_gradients():
    model, loss_func, x, y = problem()
    G = reference.per_sample_gradients(model, loss_func, x, y)
    mean = G.mean(0)
    m = float(mean.square().sum())
    sq, dots = G.square().sum(1), G @ mean
    want = {
        "norm_test": (float(sq.sum()) / m - N) / (N * (N - 1)),
        "inner_product_test": (float(dots.square().sum()) / m**2 - N) / (N * (N - 1)),
        "orthogonality_test": (float(sq.sum()) / m - float(dots.square().sum()) / m**2)
        / (N * (N - 1)),
    }
    got = record(None, 0, SQUARED)
    assert got["per_sample"] == {"estimated": False, "samples": N, "batch": N}
    for name in SQUARED:
        assert got[name] ** 2 == pytest.approx(want[name], rel=1e-10)


def _estimates(requests, seeds=SEEDS):
    from curvlab.backprop import capture
    from curvlab.diagnostics.per_sample import PerSampleStatistics

    model, loss_func, x, y = problem()
    out = []
    for seed in range(seeds):
        stats = PerSampleStatistics(requests, seed=seed, samples=S)
        with capture(model, loss_func, [stats]) as block:
            loss_func(model(x), y).backward()
        out.append(block.results[stats.name])
    return out, reference.per_sample_gradients(model, loss_func, x, y)


def _assert_unbiased(values: torch.Tensor, exact: torch.Tensor, biased: torch.Tensor | None):
    """``values`` ``[SEEDS, ...]``: their mean within four standard errors of ``exact``."""
    error = 4 * values.std(0) / math.sqrt(values.shape[0])
    assert bool((values.std(0) > 0).all())  # the estimates do vary
    assert bool((error < 0.25 * exact.abs()).all())  # a tolerance tight enough to fail
    assert bool(((values.mean(0) - exact).abs() <= error).all())
    if biased is not None:  # the subsample's sums without the N / S: fail by far
        assert bool(((biased.mean(0) - exact).abs() > error).all())


def test_subsampled_test_sums_are_unbiased():
    """The norm, inner-product and orthogonality tests' sums (their squares are affine in them)."""
    runs, G = _estimates(["sq_norms", "dots_with_mean"])
    mean = G.mean(0)
    exact = torch.stack([G.square().sum(), (G @ mean).square().sum()])
    sums = []
    for value in runs:
        sq = sum(v["sq_norms"] for v in value.values())
        dots = sum(v["dots_with_mean"] for v in value.values())
        assert sq.shape == dots.shape == (S,)
        sums.append(torch.stack([sq.sum(), dots.square().sum()]) * N / S)
    values = torch.stack(sums)
    _assert_unbiased(values, exact, values * S / N)


def test_subsampled_tic_second_moment_is_unbiased():
    runs, G = _estimates(["sum_sq"])
    exact = G.square().sum(0)
    values = torch.stack([torch.cat([v["sum_sq"].flatten() for v in r.values()]) for r in runs])
    keep = exact > 1e-6 * exact.max()  # entries whose per-sample values are not all zero
    _assert_unbiased(values[:, keep], exact[keep], None)


def test_subsampled_monitor_tests_average_to_the_exact_ones():
    """The monitor's squared statistics over seeds (clamped at zero: a bias only where an
    estimate falls below zero, rare at these sizes) against the exact ones, within 4 s.e."""
    exact = record(None, 0, SQUARED)
    runs = [record(S, seed, SQUARED) for seed in range(100)]
    assert all(r["per_sample"] == {"estimated": True, "samples": S, "batch": N} for r in runs)
    for name in SQUARED:
        values = torch.tensor([r[name] ** 2 for r in runs], dtype=torch.float64)
        error = 4 * float(values.std()) / math.sqrt(values.numel())
        assert float(values.mean()) == pytest.approx(exact[name] ** 2, abs=error), name


def test_alpha_from_a_subsample_runs_and_is_recorded():
    model, loss_func, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    names = ["alpha", "batch_grad_norms"]
    with Monitor(model, loss_func, names, schedule=1, samples=S) as monitor:
        for step in range(3):
            optimizer.zero_grad()
            loss = loss_func(model(x), y)
            with monitor(step, loss=loss, optimizer=optimizer):
                loss.backward()
            optimizer.step()
        latest = monitor.latest()
    assert latest["per_sample"]["estimated"]
    assert math.isfinite(latest["alpha"])
    assert latest["batch_grad_norms"]["min"] <= latest["batch_grad_norms"]["max"]


def test_samples_must_be_an_int_of_at_least_two():
    model, loss_func, *_ = problem()
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="samples"):
            Monitor(model, loss_func, ["norm_test"], samples=bad)
