"""Monte-Carlo quantities: their average converges to the exact value."""

from __future__ import annotations

import warnings

import pytest
import torch

from curvlab.backprop import BatchDiagGGN, DiagGGN, SqrtGGN, compute
from tests.backprop.problems import PROBLEMS, build

SAMPLES = 20_000
CASES = [
    ("mlp", "mse-mean"),
    ("mlp", "ce-mean"),
    ("mlp", "bce-sum"),
    ("cnn2d", "ce-sum"),
    ("sequence", "ce-mean"),
    ("residual-shared", "ce-smooth"),
    ("attention-layernorm", "bce-mean"),
]


def _relative_error(mc: dict, exact: dict) -> float:
    mc = torch.cat([v.flatten() for v in mc.values()])
    exact = torch.cat([v.flatten() for v in exact.values()])
    return ((mc - exact).norm() / exact.norm()).item()


def _run(problem: str, loss: str, quantities):
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == problem), loss)
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute(model, loss_func, x, y, quantities)


@pytest.mark.parametrize(("problem", "loss"), CASES)
def test_diag_ggn_mc_converges(problem, loss):
    results = _run(problem, loss, [DiagGGN(), DiagGGN(mc_samples=SAMPLES)])
    assert _relative_error(results[DiagGGN(mc_samples=SAMPLES)], results["DiagGGN"]) < 0.05


@pytest.mark.parametrize(("problem", "loss"), CASES[:3])
def test_batch_diag_ggn_mc_converges(problem, loss):
    results = _run(problem, loss, [BatchDiagGGN(), BatchDiagGGN(mc_samples=SAMPLES)])
    error = _relative_error(results[BatchDiagGGN(mc_samples=SAMPLES)], results["BatchDiagGGN"])
    assert error < 0.05


@pytest.mark.parametrize(("problem", "loss"), CASES[:3])
def test_sqrt_ggn_mc_gram_converges(problem, loss):
    results = _run(problem, loss, [SqrtGGN(), SqrtGGN(mc_samples=SAMPLES)])

    def ggn(values: dict) -> dict:
        v = torch.cat([t.flatten(start_dim=2) for t in values.values()], dim=-1)
        return {"ggn": torch.einsum("mnp,mnq->pq", v, v)}

    error = _relative_error(ggn(results[SqrtGGN(mc_samples=SAMPLES)]), ggn(results["SqrtGGN"]))
    assert error < 0.05


def test_single_sample_mc_is_unbiased_on_average():
    """Average of many independent 1-sample DiagGGNMC runs approaches the exact diagonal."""
    model, loss_func, x, y = build(PROBLEMS[0], "ce-mean")
    torch.manual_seed(3)
    exact = compute(model, loss_func, x, y, [DiagGGN()])["DiagGGN"]
    runs = [
        compute(model, loss_func, x, y, [DiagGGN(mc_samples=1)])["DiagGGNMC"] for _ in range(400)
    ]
    mean = {k: torch.stack([r[k] for r in runs]).mean(0) for k in exact}
    assert _relative_error(mean, exact) < 0.1


@pytest.mark.parametrize(("problem", "loss"), [("mlp", "ce-mean"), ("cnn2d", "bce-sum")])
def test_ggn_product_mc_converges(problem, loss):
    from curvlab.backprop import GGNMP

    results = _run(problem, loss, [GGNMP(), GGNMP(mc_samples=SAMPLES)])
    exact, mc = results["GGNMP"], results[GGNMP(mc_samples=SAMPLES)]
    torch.manual_seed(7)
    model, *_ = build(next(p for p in PROBLEMS if p.name == problem), loss)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    v = {k: torch.randn(3, *s, dtype=torch.float64) for k, s in shapes.items()}
    error = _relative_error({k: mc[k](v[k]) for k in v}, {k: exact[k](v[k]) for k in v})
    assert error < 0.05
