"""curvlab.optim.structures: each structure's operations against the dense masked reference."""

from __future__ import annotations

import pytest
import torch

from curvlab.optim import singd, structures
from curvlab.optim.rootfree import shampoo_curvature
from tests.optim import singd_reference as reference

NAMES = sorted(structures.STRUCTURES)
DIM, GROUPS = 11, 2  # 11: block size 4 leaves a remainder of 3; hierarchical (3, 2)
CONFIG = {"block_size": 4, "hierarchical_sizes": (3, 2)}
FREE_DENSE = {  # nonzero entries of a structured matrix
    "dense": DIM * DIM,
    "diagonal": DIM,
    "block_diagonal": 2 * 16 + 9,
    "lower_triangular": DIM * (DIM + 1) // 2,
    "upper_triangular": DIM * (DIM + 1) // 2,
    "hierarchical": 3 * DIM + (DIM - 5) + 2 * (DIM - 3),
    "triu_toeplitz": DIM * (DIM + 1) // 2,
}
FREE = {  # stored entries per matrix: the memory saving
    "dense": DIM * DIM,
    "diagonal": DIM,
    "block_diagonal": 2 * 16 + 9,
    "lower_triangular": DIM * (DIM + 1) // 2,
    "upper_triangular": DIM * (DIM + 1) // 2,
    "hierarchical": 3 * DIM + (DIM - 5) + 2 * (DIM - 3),
    "triu_toeplitz": DIM,
}


def random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def spd(dim, seed):
    x = random(GROUPS, dim, 3 * dim, seed=seed)
    return x @ x.mT / (3 * dim)


def pair(name, seed=1):
    """The structure, the mask reference and a structured matrix near the identity."""
    ours = structures.make_structure(name, **CONFIG)
    ref = reference.make_structure(name, **CONFIG)
    dense = torch.eye(DIM, dtype=torch.float64) + 0.3 * random(GROUPS, DIM, DIM, seed=seed)
    return ours, ref, ours.from_dense(dense)


@pytest.mark.parametrize("name", NAMES)
def test_projection_equals_the_mask_reference(name):
    ours, ref, _ = pair(name)
    m = random(GROUPS, DIM, DIM, seed=5)
    torch.testing.assert_close(ours.from_dense(m).to_dense(), ref.project(m), rtol=0, atol=1e-14)


def symmetric(seed):
    m = random(GROUPS, DIM, DIM, seed=seed)
    return m + m.mT


@pytest.mark.parametrize("name", NAMES)
def test_symmetric_map_is_the_papers_natural_gradient(name):
    """from_symmetric equals the map derived from its definition (singd_reference.paper_map)."""
    ours, ref, _ = pair(name)
    m = symmetric(6)
    got = ours.from_symmetric(m).to_dense()
    torch.testing.assert_close(got, ref.paper_map(m), rtol=0, atol=1e-12)


# (i, j) of a free entry whose mirror (j, i) is not free -> factor 2 against the orthogonal map
DOUBLED = {
    "dense": 0,
    "diagonal": 0,
    "block_diagonal": 0,
    "lower_triangular": DIM * (DIM - 1) // 2,
    "upper_triangular": DIM * (DIM - 1) // 2,
    "hierarchical": 3 * (DIM - 3) + 2 * (DIM - 5),
    "triu_toeplitz": DIM * (DIM - 1) // 2,
}


@pytest.mark.parametrize("name", NAMES)
def test_symmetric_map_doubles_the_entries_without_a_free_mirror(name):
    """Of a symmetric all-ones matrix, the map keeps 1 where the mirror is free, else 2."""
    ours, _, _ = pair(name)
    ones = torch.ones(GROUPS, DIM, DIM, dtype=torch.float64)
    dense = ours.from_symmetric(ones).to_dense()
    assert int((dense == 2).sum()) == GROUPS * DOUBLED[name]
    assert int((dense == 1).sum()) == GROUPS * (FREE_DENSE[name] - DOUBLED[name])


@pytest.mark.parametrize("name", NAMES)
def test_stores_only_the_free_entries(name):
    _, _, s = pair(name)
    assert s.numel() == GROUPS * FREE[name]
    assert s.shape == (GROUPS, DIM, DIM) and s.dim == DIM and s.groups == GROUPS


@pytest.mark.parametrize("name", NAMES)
def test_products_with_dense_matrices(name):
    _, _, s = pair(name)
    dense, m = s.to_dense(), random(GROUPS, DIM, 4, seed=7)
    torch.testing.assert_close(s.matmul(m), dense @ m)
    torch.testing.assert_close(s.tmatmul(m), dense.mT @ m)
    torch.testing.assert_close(s.rmatmul(m.mT), m.mT @ dense)
    torch.testing.assert_close(s.rtmatmul(m.mT), m.mT @ dense.mT)


@pytest.mark.parametrize("name", NAMES)
def test_product_stays_in_the_structure(name):
    ours, ref, s = pair(name)
    t = ours.from_dense(
        torch.eye(DIM, dtype=torch.float64) + 0.2 * random(GROUPS, DIM, DIM, seed=9)
    )
    product = s.product(t)
    want = s.to_dense() @ t.to_dense()
    assert type(product) is type(s)
    torch.testing.assert_close(product.to_dense(), want)  # closed: no projection error
    torch.testing.assert_close(ref.project(want), want)


@pytest.mark.parametrize("name", NAMES)
def test_congruence_and_gram_equal_the_projected_dense_products(name):
    _, ref, s = pair(name)
    a, dense = spd(DIM, 3), s.to_dense()
    projected, trace = s.congruence(a)
    full = dense.mT @ a @ dense
    torch.testing.assert_close(projected.to_dense(), ref.paper_map(full))
    torch.testing.assert_close(trace, full.diagonal(dim1=-2, dim2=-1).sum(-1))
    projected, trace = s.gram()
    full = dense.mT @ dense
    torch.testing.assert_close(projected.to_dense(), ref.paper_map(full))
    torch.testing.assert_close(trace, full.diagonal(dim1=-2, dim2=-1).sum(-1))


@pytest.mark.parametrize("name", NAMES)
def test_identity_scaling_and_sums(name):
    ours, _, s = pair(name)
    eye = torch.eye(DIM, dtype=torch.float64).expand(GROUPS, DIM, DIM)
    torch.testing.assert_close(s.eye_like().to_dense(), eye)
    torch.testing.assert_close(ours.eye(GROUPS, DIM, torch.float64, "cpu").to_dense(), eye)
    assert not s.zeros_like().to_dense().any()
    factor = torch.tensor([2.0, -0.5], dtype=torch.float64)
    torch.testing.assert_close(s.scale(factor).to_dense(), factor[:, None, None] * s.to_dense())
    torch.testing.assert_close((s + s.eye_like() - s).to_dense(), eye)


@pytest.mark.parametrize("name", NAMES)
def test_wrap_round_trips_the_parameters(name):
    ours, _, s = pair(name)
    back = ours.wrap(s.tensors)
    assert type(back) is type(s)
    assert all(torch.equal(x, y) for x, y in zip(back.tensors, s.tensors, strict=True))


# ------------------------------------------------------- the update against the reference
def _dense_reference_run(name, steps, statistics, damping=0.01, alpha1=0.5, beta1=0.2):
    ref = reference.make_structure(name, **CONFIG)
    factors = [torch.eye(DIM, dtype=torch.float64).expand(GROUPS, DIM, DIM).clone()] * 2
    momenta = [torch.zeros(GROUPS, DIM, DIM, dtype=torch.float64)] * 2
    for _ in range(steps):
        factors, momenta = reference.inverse_free_update(
            factors, momenta, statistics, (ref, ref), damping, alpha1, beta1
        )
    return factors


@pytest.mark.parametrize("name", NAMES)
def test_update_equals_the_dense_implementation_over_steps(name):
    ours = structures.make_structure(name, **CONFIG)
    statistics = (spd(DIM, 11), spd(DIM, 12))
    k = ours.eye(GROUPS, DIM, torch.float64, "cpu")
    factors, momenta = (k, k), (k.zeros_like(), k.zeros_like())
    for _ in range(8):
        factors, momenta = singd.inverse_free_update(factors, momenta, statistics, 0.01, 0.5, 0.2)
    want = _dense_reference_run(name, 8, statistics)
    for got, expected in zip(factors, want, strict=True):
        assert not torch.allclose(expected, torch.eye(DIM, dtype=torch.float64))  # it moved
        torch.testing.assert_close(got.to_dense(), expected, rtol=1e-10, atol=1e-12)
    g = random(GROUPS, DIM, DIM, seed=13)
    torch.testing.assert_close(
        singd.precondition(*factors, g), reference.precondition(*want, g), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", NAMES)
def test_ifshampoo_step_equals_the_dense_implementation(name):
    ours = structures.make_structure(name, **CONFIG)
    ref = reference.make_structure(name, **CONFIG)
    g = random(1, DIM, DIM, seed=21)
    k = ours.eye(1, DIM, torch.float64, "cpu")
    factors, momenta = (k, k), (k.zeros_like(), k.zeros_like())
    dense = [torch.eye(DIM, dtype=torch.float64)[None]] * 2
    dense_momenta = [torch.zeros(1, DIM, DIM, dtype=torch.float64)] * 2
    for _ in range(4):
        curvature = shampoo_curvature(*factors, g, 8)
        factors, momenta = singd.riemannian_step(factors, momenta, curvature, 1e-3, 0.5, 0.05)
        z = dense[1].mT @ g @ dense[0]
        dense, dense_momenta = reference.riemannian_step(
            dense, dense_momenta, (8 * z.mT @ z, 8 * z @ z.mT), (ref, ref), 1e-3, 0.5, 0.05
        )
    for got, expected in zip(factors, dense, strict=True):
        torch.testing.assert_close(got.to_dense(), expected, rtol=1e-10, atol=1e-12)


class _Banded(structures.Structure):
    """A structure of one's own: only a projection (tridiagonal), stored densely."""

    def project(self, matrix):
        return matrix.triu(-1).tril(1)


def test_a_custom_projection_runs_densely():
    custom = _Banded()
    s = custom.from_dense(random(GROUPS, DIM, DIM, seed=2))
    assert isinstance(s, structures.ProjectedDenseMatrix)
    product = s.product(s)
    torch.testing.assert_close(product.to_dense(), custom.project(s.to_dense() @ s.to_dense()))
    assert custom.wrap(s.tensors).projection == custom.project


@pytest.mark.parametrize("name", NAMES)
def test_damped_congruence_in_two_phases(name):
    """Pi(S^T (alpha A + beta I) S) with alpha, beta per group, and tr(S^T A S), ||S||_F^2."""
    _, ref, s = pair(name)
    a, dense = spd(DIM, 4), s.to_dense()
    alpha = torch.tensor([0.7, 2.0], dtype=torch.float64)
    beta = torch.tensor([0.1, 0.03], dtype=torch.float64)
    parts, trace = s.congruence_parts(a)
    eye = torch.eye(DIM, dtype=torch.float64)
    full = dense.mT @ (alpha[:, None, None] * a + beta[:, None, None] * eye) @ dense
    torch.testing.assert_close(
        s.damped_congruence(parts, alpha, beta).to_dense(), ref.paper_map(full)
    )
    torch.testing.assert_close(trace, (dense.mT @ a @ dense).diagonal(dim1=-2, dim2=-1).sum(-1))
    torch.testing.assert_close(s.frobenius_sq(), dense.square().sum((-2, -1)))
