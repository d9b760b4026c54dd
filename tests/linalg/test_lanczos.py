"""Lanczos eigenpairs against torch.linalg.eigh of explicit float64 matrices."""

from __future__ import annotations

import pytest
import torch

from curvlab.linalg import MatmatOperator, lanczos_eigs
from curvlab.linalg.lanczos import LanczosProcess
from tests.linalg.spectra import matrix, with_spectrum


def reference(A: torch.Tensor, k: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(A)
    if which == "largest":
        return values.flip(0)[:k], vectors.flip(1)[:, :k]
    return values[:k], vectors[:, :k]


TOL = 1.5e-8  # the default relative residual in float64, sqrt(eps)


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("k", [1, 5])
def test_eigenvalues_match_eigh(name, which, k):
    """Error about residual^2 / gap: far below tol * ||A||."""
    A, eigenvalues = matrix(name, size=150)
    values, _ = lanczos_eigs(A, k, which, generator=torch.Generator().manual_seed(0))
    norm = float(eigenvalues.abs().max())
    torch.testing.assert_close(values, reference(A, k, which)[0], rtol=0, atol=1e-10 * norm)


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", ["psd", "indefinite"])
def test_eigenvectors_match_eigh_to_residual_over_gap(name, which):
    A, eigenvalues = matrix(name, size=150)
    values, vectors = lanczos_eigs(A, 5, which, generator=torch.Generator().manual_seed(0))
    norm = float(eigenvalues.abs().max())
    residuals = torch.linalg.vector_norm(A @ vectors - vectors * values, dim=0)
    assert (residuals <= TOL * norm).all(), residuals
    expected_values, expected_vectors = reference(A, 6, which)
    gaps = (expected_values[:5, None] - eigenvalues[None, :]).abs()
    gaps = gaps.where(gaps > 0, float("inf")).min(1).values
    sines = (1 - (vectors * expected_vectors[:, :5]).sum(0).square()).clamp_min(0).sqrt()
    assert (sines <= 2 * TOL * norm / gaps).all(), (sines, TOL * norm / gaps)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_order_shape_and_orthonormality(which):
    A, _ = matrix("indefinite", size=80)
    values, vectors = lanczos_eigs(A, 6, which, generator=torch.Generator().manual_seed(1))
    assert values.shape == (6,) and vectors.shape == (80, 6)
    steps = values.diff()
    assert (steps < 0).all() if which == "largest" else (steps > 0).all()
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(6, dtype=A.dtype), rtol=0, atol=1e-10)


def test_zero_eigenvalues_of_a_low_rank_matrix_are_found_by_restarts():
    """The Krylov space of a rank-10 matrix has dimension 11; each breakdown restarts orthogonally
    and finds one more copy of the zero eigenvalue."""
    A, _ = matrix("low_rank", size=60)
    values, vectors = lanczos_eigs(A, 4, "smallest", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(values, torch.zeros_like(values), rtol=0, atol=1e-10)
    torch.testing.assert_close(A @ vectors, torch.zeros_like(vectors), rtol=0, atol=1e-10)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(4, dtype=A.dtype), rtol=0, atol=1e-10)


def test_top_eigenpairs_of_a_low_rank_matrix():
    A, _ = matrix("low_rank", size=60)
    values, _ = lanczos_eigs(A, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        values, torch.linspace(5.0, 1.0, 10, dtype=A.dtype), rtol=0, atol=1e-10
    )


def test_full_reorthogonalisation_keeps_the_basis_orthonormal():
    """Over 80 steps (outliers converged early) the basis stays orthonormal to round-off."""
    A, _ = matrix("indefinite", size=150)
    start = torch.randn(150, 3, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    process = LanczosProcess(A, start)
    for _ in range(80):
        process.step()
    V = process.basis_matrix()  # [3, P, 80]
    gram = V.transpose(1, 2) @ V
    torch.testing.assert_close(
        gram, torch.eye(80, dtype=A.dtype).expand(3, 80, 80), rtol=0, atol=1e-12
    )
    T = process.tridiagonal()
    torch.testing.assert_close(V.transpose(1, 2) @ A @ V, T, rtol=0, atol=1e-10)


def test_float32():
    A, _ = matrix("indefinite", size=100)
    values, _ = lanczos_eigs(A.float(), 3, generator=torch.Generator().manual_seed(0))
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), reference(A, 3, "largest")[0], rtol=0, atol=1e-4)


def test_one_vector_per_product_and_early_stop():
    """Well-separated outliers converge long before P steps, each step one product."""
    eigenvalues = torch.cat(
        [torch.linspace(0.0, 1.0, 397), torch.tensor([10.0, 20.0, 30.0])]
    ).double()
    A = with_spectrum(eigenvalues)
    columns: list[int] = []

    def matmat(V):
        columns.append(V.shape[1])
        return A @ V

    values, _ = lanczos_eigs(MatmatOperator(matmat, 400, dtype=A.dtype), 3)
    torch.testing.assert_close(values, torch.tensor([30.0, 20.0, 10.0], dtype=A.dtype))
    assert set(columns) == {1} and len(columns) < 60


def test_max_steps_reached_warns():
    A, _ = matrix("psd", size=150)
    with pytest.warns(RuntimeWarning, match="not converged in max_steps=6"):
        lanczos_eigs(A, 5, "smallest", max_steps=6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 11}, "k=11 eigenpairs asked of a 10 x 10"),
        ({"k": 2, "which": "biggest"}, "unknown which='biggest'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    A, _ = matrix("psd", size=10)
    with pytest.raises(ValueError, match=message):
        lanczos_eigs(A, **kwargs)
