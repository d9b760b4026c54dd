"""Every exact quantity x every problem x every loss, both methods, against float64 references."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from curvlab.backprop import (
    GGNMP,
    HMP,
    BatchDiagGGN,
    BatchDiagHessian,
    BatchGrad,
    BatchL2,
    DiagGGN,
    DiagHessian,
    SqrtGGN,
    SumGradSquared,
    Variance,
    compute,
)
from tests import reference
from tests.backprop.problems import LOSSES, PROBLEMS, build

PROBLEM_NAMES = [p.name for p in PROBLEMS]
QUANTITIES = [
    BatchGrad(),
    BatchL2(),
    SumGradSquared(),
    Variance(),
    DiagGGN(),
    BatchDiagGGN(),
    SqrtGGN(),
    DiagHessian(),
    BatchDiagHessian(),
]
PRODUCTS = [GGNMP(), HMP()]


def _problem(name: str):
    return next(p for p in PROBLEMS if p.name == name)


@functools.cache
def _references(problem: str, loss: str) -> dict[str, torch.Tensor]:
    model, loss_func, x, y = build(_problem(problem), loss)
    grads = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    per_sample_ggn = reference.per_sample_ggn(model, loss_func, x, y)  # [N, P, P]
    per_sample_hess = reference.per_sample_hessian_diagonals(model, loss_func, x, y)  # [N, P]
    r = 1.0 / x.shape[0] if loss_func.reduction == "mean" else 1.0
    return {
        "grad": reference.gradient(model, loss_func, x, y),
        "BatchGrad": grads,
        "BatchL2": grads.square().sum(1),
        "SumGradSquared": grads.square().sum(0),
        "Variance": (grads - grads.mean(0)).square().mean(0),
        "DiagGGN": r * torch.diagonal(per_sample_ggn, dim1=1, dim2=2).sum(0),
        "BatchDiagGGN": torch.diagonal(per_sample_ggn, dim1=1, dim2=2),
        "SqrtGGN": reference.ggn(model, loss_func, x, y),
        "DiagHessian": reference.hessian_diagonal(model, loss_func, x, y),
        "BatchDiagHessian": per_sample_hess,
    }


@functools.cache
def _ours(problem: str, loss: str, method: str):
    model, loss_func, x, y = build(_problem(problem), loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute(model, loss_func, x, y, QUANTITIES, method=method)


def _flatten(values: dict[str, torch.Tensor], batch_dims: int) -> torch.Tensor:
    """Concatenate per-parameter tensors ``[*batch, *p]`` into ``[*batch, P]``."""
    return torch.cat([v.flatten(start_dim=batch_dims) for v in values.values()], dim=-1)


@pytest.mark.parametrize("method", ["auto", "func"])
@pytest.mark.parametrize("quantity", [q.name for q in QUANTITIES])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("problem", PROBLEM_NAMES)
def test_quantity_matches_dense_reference(problem, loss, quantity, method):
    ours = _ours(problem, loss, method)[quantity]
    ref = _references(problem, loss)[quantity]
    if quantity == "SqrtGGN":
        v = _flatten(ours, 2)  # [M, N, P]
        actual = torch.einsum("mnp,mnq->pq", v, v)
    elif quantity == "BatchL2":
        actual = torch.stack(list(ours.values())).sum(0)
    else:
        batch_dims = 1 if quantity.startswith("Batch") else 0
        actual = _flatten(ours, batch_dims)
    torch.testing.assert_close(actual, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("problem", PROBLEM_NAMES)
def test_gradient_and_loss(problem):
    ours = _ours(problem, "ce-mean", "auto")
    ref = _references(problem, "ce-mean")["grad"]
    torch.testing.assert_close(_flatten(ours.grad, 0), ref, rtol=1e-8, atol=1e-10)


def _blocks(model, dense: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = dense[start : start + p.numel(), start : start + p.numel()]
        start += p.numel()
    return out


@pytest.mark.parametrize("method", ["auto", "func"])
@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
@pytest.mark.parametrize("problem", PROBLEM_NAMES)
def test_block_products_match_dense_blocks(problem, loss, method):
    model, loss_func, x, y = build(_problem(problem), loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = compute(model, loss_func, x, y, PRODUCTS, method=method)
    ggn = _blocks(model, reference.ggn(model, loss_func, x, y))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        hess = _blocks(model, reference.full_hessian(model, loss_func, x, y))
    torch.manual_seed(5)
    actual, expected = [], []
    for name, p in model.named_parameters():
        v = torch.randn(2, *p.shape, dtype=p.dtype)
        flat = v.reshape(2, -1)
        actual += [results["GGNMP"][name](v), results["HMP"][name](v), results["HMP"][name](v[0])]
        expected += [flat @ ggn[name], flat @ hess[name], flat[:1] @ hess[name]]
    actual_flat = torch.cat([a.flatten() for a in actual])
    expected_flat = torch.cat([e.flatten() for e in expected])
    torch.testing.assert_close(actual_flat, expected_flat, rtol=1e-7, atol=1e-9)
