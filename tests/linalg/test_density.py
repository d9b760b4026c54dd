"""Stochastic Lanczos quadrature: exact moments per probe, a density that integrates to 1 and whose
moments match the trace moments, and its PNG."""

from __future__ import annotations

import math

import pytest
import torch

from curvlab.linalg import MatmatOperator, plot_spectral_density, slq_density, slq_quadrature
from tests.linalg.spectra import matrix


@pytest.mark.parametrize("name", ["psd", "indefinite"])
def test_quadrature_moments_equal_the_probes_quadratic_forms(name):
    """m steps integrate polynomials of degree < 2 m exactly: sum_l tau theta^k = v^T A^k v."""
    A, _ = matrix(name)
    nodes, weights = slq_quadrature(A, 4, 6, generator=torch.Generator().manual_seed(7))
    z = 2 * torch.randint(0, 2, (A.shape[0], 4), generator=torch.Generator().manual_seed(7)) - 1
    v = z.to(A.dtype) / A.shape[0] ** 0.5
    for k in range(12):
        forms = (v * (torch.linalg.matrix_power(A, k) @ v)).sum(0)
        torch.testing.assert_close((weights * nodes**k).sum(1), forms, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["psd", "indefinite"])
def test_density_integrates_to_one(name):
    A, _ = matrix(name)
    grid, density = slq_density(A, 8, 30, generator=torch.Generator().manual_seed(0))
    assert grid.shape == density.shape == (1024,) and (density >= 0).all()
    assert abs(float(torch.trapezoid(density, grid)) - 1) < 6e-7  # the tails beyond 5 sigma


def smoothed_moment(quadrature_moments: list[torch.Tensor], k: int, sigma: float) -> torch.Tensor:
    """The k-th moment of the quadrature convolved with N(0, sigma^2)."""
    return sum(
        math.comb(k, j) * quadrature_moments[k - j] * sigma**j * math.prod(range(j - 1, 0, -2))
        for j in range(0, k + 1, 2)
    )


@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("num_probes", [8, 512])
def test_density_moments_match_trace_moments(name, num_probes):
    r"""The k-th moment of the density is tr(A^k) / P (plus the kernel's), up to the probes'
    known variance 2 (||A^k||_F^2 - sum_i (A^k)_ii^2) / (P^2 n) (Rademacher)."""
    A, eigenvalues = matrix(name)
    P, sigma = A.shape[0], 0.05
    grid = torch.linspace(
        float(eigenvalues.min()) - 1, float(eigenvalues.max()) + 1, 4001, dtype=A.dtype
    )
    grid, density = slq_density(
        A, num_probes, 10, grid, sigma, generator=torch.Generator().manual_seed(1)
    )
    trace_moments = [eigenvalues.pow(k).sum() / P for k in range(5)]
    for k in range(1, 5):
        measured = torch.trapezoid(grid**k * density, grid)
        expected = smoothed_moment(trace_moments, k, sigma)
        Ak = torch.linalg.matrix_power(A, k)
        sd = (2 * (Ak.square().sum() - Ak.diagonal().square().sum()) / (P**2 * num_probes)) ** 0.5
        assert abs(float(measured - expected)) < 4 * float(sd) + 1e-8, (k, measured, expected, sd)


def test_more_probes_shrink_the_first_moment_error():
    A, eigenvalues = matrix("indefinite")
    errors = {}
    for n in (8, 512):
        e = []
        for seed in range(20):
            nodes, weights = slq_quadrature(A, n, 3, generator=torch.Generator().manual_seed(seed))
            e.append(float((weights * nodes).sum(1).mean() - eigenvalues.mean()) ** 2)
        errors[n] = sum(e) / len(e)
    assert errors[512] < errors[8] / 16  # 64 x fewer in expectation


def test_extreme_nodes_converge_to_extreme_eigenvalues():
    A, eigenvalues = matrix("indefinite")
    nodes, _ = slq_quadrature(A, 3, 40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nodes.max(1).values, eigenvalues.max().expand(3), rtol=0, atol=1e-8)
    torch.testing.assert_close(nodes.min(1).values, eigenvalues.min().expand(3), rtol=0, atol=1e-8)


def test_probes_are_batched():
    A, _ = matrix("psd", size=30)
    columns: list[int] = []

    def matmat(V):
        columns.append(V.shape[1])
        return A @ V

    slq_density(MatmatOperator(matmat, 30, dtype=A.dtype), 5, 12)
    assert columns == [5] * 12


def test_low_rank_matrix_breakdown_keeps_weights_summing_to_one():
    """A rank-10 matrix exhausts its Krylov space in 11 steps; later nodes carry no weight."""
    A, eigenvalues = matrix("low_rank", size=40)
    nodes, weights = slq_quadrature(A, 2, 25, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weights.sum(1), torch.ones(2, dtype=A.dtype))
    torch.testing.assert_close(
        (weights * nodes**2).sum(1).mean(), eigenvalues.square().mean(), rtol=0.5, atol=0
    )


@pytest.mark.parametrize("log_scale", [False, True])
def test_plot_writes_a_labelled_png(tmp_path, log_scale):
    A, _ = matrix("psd", size=50)
    grid, density = slq_density(A, 4, 20, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "plots" / "density.png"
    figure = plot_spectral_density(grid, density, path, log_scale=log_scale, title="psd")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (axes,) = figure.axes
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title()) == (
        "eigenvalue",
        "spectral density",
        "psd",
    )
    assert axes.get_yscale() == ("log" if log_scale else "linear")


def test_plot_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="grid and density must both be"):
        plot_spectral_density(torch.zeros(5), torch.zeros(4), tmp_path / "x.png")
