"""Trace estimators converge to the exact trace as their known (or bounded) variance predicts."""

from __future__ import annotations

import pytest
import torch

from curvlab.linalg import MatmatOperator, hutchinson_trace, hutchpp_trace, xtrace
from tests.linalg.spectra import matrix

TRIALS = {8: 400, 512: 100}


def errors(estimator, A, num_matvecs, trials, **kwargs) -> torch.Tensor:
    """``estimate - tr(A)`` over ``trials`` fixed seeds ``[trials]``."""
    out = []
    for seed in range(trials):
        generator = torch.Generator().manual_seed(seed)
        out.append(estimator(A, num_matvecs, generator=generator, **kwargs) - A.trace())
    return torch.stack(out)


def hutchinson_variance(A: torch.Tensor, distribution: str) -> float:
    """The variance of one Hutchinson sample :math:`z^T A z`."""
    fro = A.square().sum()
    return float(
        2 * (fro - A.diagonal().square().sum()) if distribution == "rademacher" else 2 * fro
    )


def range_finder_bound(eigenvalues: torch.Tensor, k: int) -> float:
    r""":math:`\min_r (1 + r / (k - r - 1)) \sum_{i > r} \lambda_i^2`, Halko et al.'s bound on
    :math:`\mathbb{E} \|(I - Q Q^\top) A\|_F^2` for a Gaussian sketch with :math:`k` columns."""
    squares = eigenvalues.abs().sort(descending=True).values.square()
    tails = [float(squares[r:].sum()) * (1 + r / (k - r - 1)) for r in range(max(k - 1, 1))]
    return min(tails)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("num_matvecs", [8, 512])
def test_hutchinson_mean_squared_error_is_its_variance(name, distribution, num_matvecs):
    A, _ = matrix(name)
    mse = errors(hutchinson_trace, A, num_matvecs, TRIALS[num_matvecs], distribution=distribution)
    ratio = float(mse.square().mean()) / (hutchinson_variance(A, distribution) / num_matvecs)
    assert 0.7 < ratio < 1.4, ratio


def test_hutchinson_is_unbiased():
    A, _ = matrix("indefinite")
    e = errors(hutchinson_trace, A, 8, 400)
    standard_error = (hutchinson_variance(A, "rademacher") / 8 / 400) ** 0.5
    assert abs(float(e.mean())) < 3.5 * standard_error


@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("num_matvecs", [9, 48, 192])
def test_hutchpp_mean_squared_error_within_its_bound(name, num_matvecs):
    """E err^2 = E 2 ||R||_F^2 / g <= 2 / g * (range-finder bound), for Gaussian vectors."""
    A, eigenvalues = matrix(name)
    k = num_matvecs // 3
    g = num_matvecs - 2 * k
    mse = float(errors(hutchpp_trace, A, num_matvecs, 100, distribution="normal").square().mean())
    assert mse < 1.3 * 2 * range_finder_bound(eigenvalues, k) / g


def test_hutchpp_equals_its_definition():
    """Meyer et al.'s Algorithm 1 with k = m // 3 sketch and g = m - 2 k test vectors."""
    A, _ = matrix("indefinite")
    ours = hutchpp_trace(A, 31, "normal", torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    S = torch.randn(A.shape[0], 10, generator=generator, dtype=A.dtype)
    G = torch.randn(A.shape[0], 11, generator=generator, dtype=A.dtype)
    Q = torch.linalg.qr(A @ S).Q
    projector = torch.eye(A.shape[0], dtype=A.dtype) - Q @ Q.T
    reference = (Q.T @ A @ Q).trace() + (G.T @ projector @ A @ projector @ G).trace() / 11
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", [hutchpp_trace, xtrace])
def test_sketching_estimators_are_unbiased(estimator):
    A, _ = matrix("indefinite")
    e = errors(estimator, A, 12, 400)
    assert abs(float(e.mean())) < 3.5 * float(e.std()) / 400**0.5


def test_hutchpp_converges_faster_than_hutchinson_on_a_decaying_spectrum():
    """At 192 products Hutch++'s error is far below Hutchinson's (1/m versus 1/sqrt(m))."""
    A, _ = matrix("psd")
    rms = {
        f: float(errors(f, A, 192, 50).square().mean().sqrt())
        for f in (hutchinson_trace, hutchpp_trace)
    }
    assert rms[hutchpp_trace] < 0.2 * rms[hutchinson_trace]


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    A, _ = matrix("indefinite", size=20)
    estimate = hutchpp_trace(A, 60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate, A.trace(), rtol=1e-12, atol=1e-12)


def naive_xtrace(A: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """The exchangeable estimator by its definition: one QR per left-out vector."""
    Y = A @ omega
    estimates = []
    for i in range(omega.shape[1]):
        Q = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1)).Q
        u = omega[:, i] - Q @ (Q.T @ omega[:, i])
        estimates.append((Q.T @ A @ Q).trace() + u @ A @ u)
    return torch.stack(estimates).mean()


@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_xtrace_equals_its_definition(name, distribution):
    A, _ = matrix(name)
    ours = xtrace(A, 20, distribution, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    if distribution == "normal":
        omega = torch.randn(A.shape[0], 10, generator=generator, dtype=A.dtype)
    else:
        omega = (2 * torch.randint(0, 2, (A.shape[0], 10), generator=generator) - 1).to(A.dtype)
    torch.testing.assert_close(ours, naive_xtrace(A, omega), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["psd", "indefinite"])
@pytest.mark.parametrize("num_matvecs", [8, 64, 192])
def test_xtrace_mean_squared_error_within_its_bound(name, num_matvecs):
    """Each left-out estimate has E err^2 <= 2 (range-finder bound with s - 1 columns); so has
    their mean."""
    A, eigenvalues = matrix(name)
    s = num_matvecs // 2
    mse = float(errors(xtrace, A, num_matvecs, 100).square().mean())
    assert mse < 1.3 * 2 * range_finder_bound(eigenvalues, s - 1)


def test_xtrace_error_falls_from_8_to_512_products():
    A, _ = matrix("psd")
    rms = [float(errors(xtrace, A, m, 40).square().mean().sqrt()) for m in (8, 64)]
    assert rms[1] < 0.1 * rms[0]


@pytest.mark.parametrize("num_matvecs", [24, 512])
def test_xtrace_is_exact_beyond_the_rank(num_matvecs):
    """With more vectors than the rank (or than P), A Omega spans range(A): the trace is exact."""
    A, _ = matrix("low_rank")
    estimate = xtrace(A, num_matvecs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate, A.trace(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("estimator", "num_matvecs", "calls"),
    [(hutchinson_trace, 30, [30]), (hutchpp_trace, 30, [10, 20]), (xtrace, 30, [15, 15])],
)
def test_products_are_batched(estimator, num_matvecs, calls):
    A, _ = matrix("psd")
    columns: list[int] = []

    def matmat(V):
        columns.append(V.shape[1])
        return A @ V

    estimator(MatmatOperator(matmat, A.shape[0], dtype=A.dtype), num_matvecs)
    assert columns == calls


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace, xtrace])
def test_float32_operator_gives_the_float64_estimate_in_float32(estimator):
    """Same seed, same (Rademacher) vectors: the estimate depends on the dtype by round-off only."""
    A, _ = matrix("psd")
    single = estimator(A.float(), 60, "rademacher", torch.Generator().manual_seed(0))
    double = estimator(A, 60, "rademacher", torch.Generator().manual_seed(0))
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("estimator", "minimum"), [(hutchinson_trace, 1), (hutchpp_trace, 3), (xtrace, 2)]
)
def test_too_few_products_are_rejected(estimator, minimum):
    A, _ = matrix("psd", size=5)
    with pytest.raises(ValueError, match=f"num_matvecs must be an integer >= {minimum}"):
        estimator(A, minimum - 1)
