"""Per-sample directional derivatives and the damped Newton step against dense references."""

from __future__ import annotations

import pytest
import torch

from curvlab.vivit import (
    constant_damping,
    curvature_projections,
    damped_newton_step,
    directional_derivatives,
    gradient_projections,
)
from tests import reference
from tests.vivit.helpers import PROBLEM_NAMES, dense_ggn, mc_factor, problem, rank, top_eigh

CASES = [(name, "ce-mean") for name in PROBLEM_NAMES] + [("residual-shared", "mse-sum")]


def _subset(x, y, subsampling):
    return (x, y) if subsampling is None else (x[subsampling], y[subsampling])


@pytest.mark.parametrize("subsampling", [None, [2, 0]])
@pytest.mark.parametrize(("name", "loss"), CASES)
def test_gammas_are_per_sample_gradient_projections(name, loss, subsampling):
    model, loss_func, x, y = problem(name, loss)
    out = directional_derivatives(model, loss_func, x, y, k=3, subsampling=subsampling)
    grads = reference.per_sample_gradients(model, loss_func, *_subset(x, y, subsampling))
    torch.testing.assert_close(out.gammas, grads @ out.eigenvectors, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("subsampling", [None, [2, 0]])
@pytest.mark.parametrize(("name", "loss"), CASES)
def test_lambdas_are_per_sample_ggn_curvatures(name, loss, subsampling):
    model, loss_func, x, y = problem(name, loss)
    out = directional_derivatives(model, loss_func, x, y, k=3, subsampling=subsampling)
    ggns = reference.per_sample_ggn(model, loss_func, *_subset(x, y, subsampling))
    e = out.eigenvectors
    expected = torch.einsum("pk,npq,qk->nk", e, ggns, e)
    torch.testing.assert_close(out.lambdas, expected, rtol=1e-7, atol=1e-10)


def test_mc_lambdas_use_the_sampled_factor():
    model, loss_func, x, y = problem("cnn2d", "ce-mean")
    n = x.shape[0]
    generator = torch.Generator().manual_seed(7)
    out = directional_derivatives(model, loss_func, x, y, k=2, mc_samples=1, generator=generator)
    factor = mc_factor(model, loss_func, x, y, seed=7)  # [N, P], includes sqrt(1/N)
    expected = (factor @ out.eigenvectors).square() * n
    torch.testing.assert_close(out.lambdas, expected, rtol=1e-7, atol=1e-10)


def test_lambdas_average_to_the_eigenvalues():
    model, loss_func, x, y = problem("mlp", "ce-mean")
    out = directional_derivatives(model, loss_func, x, y, k=4)
    torch.testing.assert_close(out.lambdas.mean(0), out.eigenvalues)


def test_per_parameter_directional_derivatives_use_the_blocks():
    model, loss_func, x, y = problem("mlp", "ce-mean")
    out = directional_derivatives(model, loss_func, x, y, k=2, per_parameter=True)
    grads = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    start = 0
    for name, p in reference.trainable_params(model).items():
        g = grads[:, start : start + p.numel()]
        start += p.numel()
        expected = g @ out.eigenvectors[name]
        torch.testing.assert_close(out.gammas[name], expected, rtol=1e-7, atol=1e-10)


def test_projection_functions_return_n_by_k():
    model, loss_func, x, y = problem("mlp", "mse-sum")
    gammas = gradient_projections(model, loss_func, x, y, 3, subsampling=[1, 3])
    lambdas = curvature_projections(model, loss_func, x, y, 3, subsampling=[1, 3])
    assert gammas.shape == lambdas.shape == (2, 3)


def _flat_step(step, model):
    return torch.cat([step[name].flatten() for name in reference.trainable_params(model)])


def _dense_step(ggn, grad, k, damping):
    values, vectors = top_eigh(ggn, k)
    return -vectors @ ((vectors.T @ grad) / (values + damping(values)))


DAMPINGS = {"constant": constant_damping(0.1), "scaled": lambda ev: 0.5 * ev + 1e-2}


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize(("name", "loss"), CASES)
def test_newton_step_equals_dense_projected_solve(name, loss, damping):
    model, loss_func, x, y = problem(name, loss)
    ggn = dense_ggn(model, loss_func, x, y)
    k = min(3, rank(ggn))
    grad = reference.gradient(model, loss_func, x, y)
    step = damped_newton_step(model, loss_func, x, y, k, damping=DAMPINGS[damping])
    expected = _dense_step(ggn, grad, k, DAMPINGS[damping])
    torch.testing.assert_close(_flat_step(step, model), expected, rtol=1e-6, atol=1e-10)


def test_subsampled_mc_newton_step_uses_the_sampled_subsample_ggn_and_full_gradient():
    model, loss_func, x, y = problem("mlp", "ce-mean")
    subsampling = [0, 1, 3]
    factor = mc_factor(model, loss_func, x, y, seed=2, subsampling=subsampling)
    grad = reference.gradient(model, loss_func, x, y)
    step = damped_newton_step(
        model,
        loss_func,
        x,
        y,
        2,
        damping=0.01,
        mc_samples=1,
        subsampling=subsampling,
        generator=torch.Generator().manual_seed(2),
    )
    expected = _dense_step(factor.T @ factor, grad, 2, constant_damping(0.01))
    torch.testing.assert_close(_flat_step(step, model), expected, rtol=1e-6, atol=1e-10)


def test_per_parameter_newton_step_solves_each_block():
    model, loss_func, x, y = problem("mlp", "mse-sum")
    ggn = dense_ggn(model, loss_func, x, y)
    grad = reference.gradient(model, loss_func, x, y)
    params = reference.trainable_params(model)
    step = damped_newton_step(model, loss_func, x, y, 1, damping=0.1, per_parameter=True)
    start, checked = 0, 0
    for name, p in params.items():
        idx = slice(start, start + p.numel())
        start += p.numel()
        values = torch.linalg.eigvalsh(ggn[idx, idx]).flip(0)
        if values.numel() > 1 and values[0] - values[1] <= 1e-8 * values[0]:
            continue  # tied top eigenvalues (MSE's last layer, I ⊗ ...): the step is not unique
        expected = _dense_step(ggn[idx, idx], grad[idx], 1, constant_damping(0.1))
        torch.testing.assert_close(step[name].flatten(), expected, rtol=1e-6, atol=1e-10)
        checked += 1
    assert checked >= 2  # the first layer's weight and bias


def test_negative_constant_damping_is_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        constant_damping(-1.0)
