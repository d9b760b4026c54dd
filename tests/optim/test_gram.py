"""GramInverse against dense float64 pseudo-inverses."""

import pytest
import torch

from curvlab.optim.gram import GramInverse

N, H, M = 6, 9, 3


def feature_batch(ranks, seed=0):
    """``[B, N, H]`` features with the given row ranks and their Gram matrices."""
    torch.manual_seed(seed)
    features = torch.stack(
        [
            torch.randn(N, r, dtype=torch.float64) @ torch.randn(r, H, dtype=torch.float64)
            for r in ranks
        ]
    )
    return features, features @ features.mT


def dense_coefficients(features, rhs, rtol):
    """(A A^T)^+ R from the thresholded SVD pseudo-inverse of A: (A^+)^T A^+ R."""
    pinv = torch.linalg.pinv(features, rtol=rtol)
    return pinv.mT @ pinv @ rhs


@pytest.mark.parametrize("solver", ["cholesky", "eigh", "svd"])
def test_batched_solve_matches_dense_pseudo_inverse_with_mixed_ranks(solver):
    features, grams = feature_batch([N, 3, N, 4])
    rhs = torch.randn(4, N, M, dtype=torch.float64)
    inverse = GramInverse(features, grams, solver, rtol=1e-6, atol=0.0)
    expected = dense_coefficients(features, rhs, 1e-6)
    assert torch.allclose(inverse.solve(rhs), expected, atol=1e-8, rtol=0)


def test_solve_with_indices_matches_one_matrix_at_a_time():
    features, grams = feature_batch([N, 3, N, 4])
    inverse = GramInverse(None, grams, "cholesky", rtol=1e-6, atol=0.0)
    rhs = torch.randn(3, N, M, dtype=torch.float64)
    indices = [3, 0, 1]
    one_by_one = torch.stack([inverse.coefficients(b, r) for b, r in zip(indices, rhs)])
    assert torch.allclose(inverse.solve(rhs, indices), one_by_one, atol=1e-12, rtol=0)


def test_full_rank_flags_follow_the_ranks():
    _, grams = feature_batch([N, 3, N, 4])
    inverse = GramInverse(None, grams, "cholesky", rtol=1e-6, atol=0.0)
    assert inverse.full_rank.tolist() == [True, False, True, False]


@pytest.mark.parametrize(("solver", "damping"), [("cholesky", 0.0), ("eigh", 0.0), ("damped", 0.1)])
def test_only_the_lower_triangle_is_read(solver, damping):
    _, grams = feature_batch([N, 3])
    upper_nan = torch.triu(torch.full_like(grams, float("nan")), diagonal=1)
    rhs = torch.randn(2, N, M, dtype=torch.float64)
    full = GramInverse(None, grams, solver, 1e-6, 0.0, damping).solve(rhs)
    lower = GramInverse(None, grams.tril() + upper_nan, solver, 1e-6, 0.0, damping).solve(rhs)
    assert torch.allclose(lower, full, atol=1e-12, rtol=0)
