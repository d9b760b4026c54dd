"""What the estimators accept as A, and the errors that name the culprit."""

from __future__ import annotations

import pytest
import torch

from curvlab.linalg import MatmatOperator, hutchinson_diag, hutchinson_trace
from curvlab.linalg.operator import random_vectors


def test_matmat_operator_multiplies_vectors_and_blocks():
    A = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
    op = MatmatOperator(lambda V: A @ V, 3, dtype=torch.float64)
    v = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(op @ v, A @ v)
    torch.testing.assert_close(op @ torch.eye(3, dtype=torch.float64), A)
    assert op.shape == (3, 3) and op.dtype == torch.float64


def test_matmat_operator_dtype_sets_the_probes_dtype():
    op = MatmatOperator(lambda V: 2 * V, 4, dtype=torch.float32)
    estimate = hutchinson_diag(op, 3)
    assert estimate.dtype == torch.float32
    torch.testing.assert_close(estimate, torch.full((4,), 2.0))


@pytest.mark.parametrize(
    ("A", "error", "message"),
    [
        (torch.zeros(3, 4), ValueError, r"square operator \[P, P\], got shape \(3, 4\)"),
        (lambda V: V, TypeError, "wrap a function in MatmatOperator"),
        (MatmatOperator(lambda V: V[:2], 3), ValueError, r"A @ V returned shape \(2, 5\)"),
    ],
)
def test_bad_operators_are_named(A, error, message):
    with pytest.raises(error, match=message):
        hutchinson_trace(A, 5)


def test_unknown_distribution_is_named():
    with pytest.raises(ValueError, match="unknown distribution 'uniform'"):
        hutchinson_trace(torch.eye(3), 2, distribution="uniform")


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_random_vectors_are_isotropic(distribution):
    Z = random_vectors(
        4,
        20000,
        distribution,
        dtype=torch.float64,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(
        Z @ Z.T / 20000, torch.eye(4, dtype=torch.float64), rtol=0, atol=0.05
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimators_run_on_the_operators_device():
    from curvlab.linalg import (
        hutchinson_squared_fro,
        hutchpp_trace,
        lanczos_eigs,
        slq_density,
        xtrace,
    )

    A = torch.diag(torch.linspace(1.0, 2.0, 50, dtype=torch.float64)).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    for estimator in (hutchinson_trace, hutchpp_trace, xtrace, hutchinson_squared_fro):
        assert estimator(A, 12, generator=generator).device.type == "cuda"
    assert hutchinson_diag(A, 3, generator=generator).device.type == "cuda"
    values, vectors = lanczos_eigs(A, 2, generator=generator)
    assert vectors.device.type == "cuda"
    torch.testing.assert_close(values.cpu(), torch.tensor([2.0, 2.0 - 1 / 49], dtype=torch.float64))
    grid, density = slq_density(A, 4, 10, generator=generator)
    assert abs(float(torch.trapezoid(density, grid)) - 1) < 1e-6
