"""The Hutchinson diagonal and squared Frobenius norm converge as their known variances predict."""

from __future__ import annotations

import pytest
import torch

from curvlab.linalg import MatmatOperator, hutchinson_diag, hutchinson_squared_fro
from tests.linalg.spectra import matrix

TRIALS = {8: 300, 512: 60}


def diag_variance(A: torch.Tensor, distribution: str) -> torch.Tensor:
    """The variance of one sample :math:`z \\odot A z`, per entry ``[P]``."""
    off = A.square().sum(1) - A.diagonal().square()
    return off if distribution == "rademacher" else off + 2 * A.diagonal().square()


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("num_matvecs", [8, 512])
def test_diag_squared_error_is_its_variance(name, distribution, num_matvecs):
    A, _ = matrix(name)
    squared_errors = torch.stack(
        [
            (
                hutchinson_diag(A, num_matvecs, distribution, torch.Generator().manual_seed(s))
                - A.diagonal()
            )
            .square()
            .sum()
            for s in range(TRIALS[num_matvecs])
        ]
    )
    ratio = float(squared_errors.mean()) / float(diag_variance(A, distribution).sum() / num_matvecs)
    assert 0.85 < ratio < 1.15, ratio


def test_diag_is_exact_for_a_diagonal_matrix_with_rademacher_vectors():
    d = torch.linspace(-2.0, 3.0, 50, dtype=torch.float64)
    torch.testing.assert_close(hutchinson_diag(torch.diag(d), 1), d, rtol=0, atol=1e-15)


def test_diag_is_unbiased_in_every_entry():
    A, _ = matrix("indefinite", size=30)
    trials = 400
    mean = torch.stack(
        [hutchinson_diag(A, 4, generator=torch.Generator().manual_seed(s)) for s in range(trials)]
    ).mean(0)
    standard_error = (diag_variance(A, "rademacher") / 4 / trials).sqrt()
    assert ((mean - A.diagonal()).abs() < 4.5 * standard_error).all()


def fro_variance(A: torch.Tensor, distribution: str) -> float:
    """The variance of one sample :math:`\\|A z\\|^2`."""
    B = A.T @ A
    fro = B.square().sum()
    return float(
        2 * (fro - B.diagonal().square().sum()) if distribution == "rademacher" else 2 * fro
    )


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("num_matvecs", [8, 512])
def test_squared_fro_mean_squared_error_is_its_variance(name, distribution, num_matvecs):
    A, eigenvalues = matrix(name)
    exact = eigenvalues.square().sum()
    torch.testing.assert_close(exact, A.square().sum())
    trials = 2 * TRIALS[num_matvecs]
    e = torch.stack(
        [
            hutchinson_squared_fro(A, num_matvecs, distribution, torch.Generator().manual_seed(s))
            - exact
            for s in range(trials)
        ]
    )
    ratio = float(e.square().mean()) / (fro_variance(A, distribution) / num_matvecs)
    assert 0.7 < ratio < 1.4, ratio


@pytest.mark.parametrize("estimator", [hutchinson_diag, hutchinson_squared_fro])
def test_one_batched_product(estimator):
    A, _ = matrix("psd", size=20)
    columns: list[int] = []

    def matmat(V):
        columns.append(V.shape[1])
        return A @ V

    estimator(MatmatOperator(matmat, 20, dtype=A.dtype), 17)
    assert columns == [17]
