"""curvlab's SINGD side by side with its authors' package ``singd`` (0.0.5), in float64.

Both start at :math:`K = C = I` and follow the same equations (Lin et al., ICML 2024); the
structure-preserving map :math:`\\hat\\Pi` of a symmetric matrix is the paper's in both
(:meth:`curvlab.optim.structures.StructuredMatrix.from_symmetric`). The package names map as

=========================  ==========================================================
curvlab ``SINGD``          ``singd.optim.optimizer.SINGD``
=========================  ==========================================================
``lr``                     ``lr`` (:math:`\\beta_2`)
``momentum``               ``momentum`` (:math:`\\alpha_2`)
``weight_decay``           ``weight_decay`` (:math:`\\gamma`)
``damping``                ``damping`` (:math:`\\lambda`)
``alpha1``, ``lr_cov``     ``alpha1``, ``lr_cov`` (:math:`\\alpha_1`, :math:`\\beta_1`)
``update_interval``        ``T``
``structure``              ``structures`` (a pair of the package's names, below)
``fisher_type="empirical"``  the package's only Fisher (its hooks see the labels' gradients)
``kfac_approx="expand"``   ``kfac_approx="expand"``
joint weight and bias      the package's bias column (always joint)
loss mean over the batch   ``loss_average="batch"``
=========================  ==========================================================

and neither has a warm start (``kfac_like=False``, ``normalize_lr_cov=False``, no AMP scale).
The package offers no block size or hierarchical sizes but their templates, nor plain
triangular factors; the test defines them from the package's own classes (the templates, and
its recursive ``[[A, 0], [B, C]]`` / ``[[A, B], [0, C]]`` blocks nested down to a dense 1 x 1).

``singd`` is not a CI dependency (``pip install --no-deps singd`` works, but it imports
``einconv`` and ``einops``): the test is skipped where it does not import.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.optim import SINGD, structures

package = pytest.importorskip(
    "singd.optim.optimizer",
    reason="the authors' package singd (with einconv, einops) is not installed",
)
import singd.structures.blockdiagonal  # noqa: E402
import singd.structures.hierarchical  # noqa: E402
import singd.structures.triutoeplitz  # noqa: E402
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate  # noqa: E402
from singd.structures.dense import DenseMatrix  # noqa: E402
from singd.structures.diagonal import DiagonalMatrix  # noqa: E402
from singd.structures.hierarchical import HierarchicalMatrixTemplate  # noqa: E402
from singd.structures.recursive import (  # noqa: E402
    RecursiveBottomLeftMatrixTemplate,
    RecursiveTopRightMatrixTemplate,
)
from singd.structures.triutoeplitz import TriuToeplitzMatrix  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Calling naive implementation:UserWarning")

BLOCK, K1, K2 = 3, 2, 2
MAX_DIM = 28  # the largest factor of the models below (the second conv: 3 * 3 * 3 + 1)
LOSS = nn.CrossEntropyLoss()
HYPER = {  # curvlab's names; every one differs from its default
    "lr": 0.05,
    "momentum": 0.8,
    "weight_decay": 1e-3,
    "damping": 0.01,
    "alpha1": 0.4,
    "lr_cov": 0.2,
    "update_interval": 2,
}


def _lowest_precision(*dtypes: torch.dtype) -> torch.dtype:
    """The package's ``lowest_precision`` (float16 < bfloat16 < float32), float64 added."""
    order = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    return order[min(order.index(dtype) for dtype in dtypes)]


def _block_diagonal_rmatmat(self, mat: torch.Tensor) -> torch.Tensor:
    r""":math:`S^\top M` for the package's block-diagonal :math:`S` (0.0.5 computes :math:`S M`)."""
    return self.from_dense(self.to_dense().T) @ mat


def _block_diagonal_from_inner(self, X: torch.Tensor | None = None):  # noqa: N803 - its name
    r""":math:`\Pi(S^\top X X^\top S)`; for ``X=None`` :math:`\Pi(S^\top S)` (0.0.5: :math:`S S^\top`)."""
    return self.from_mat_inner(self.to_dense().T if X is None else self.rmatmat(X))


@pytest.fixture(autouse=True)
def _package_in_float64(monkeypatch):
    r"""The package's structures in float64 (0.0.5: float32 at most) and two block-diagonal fixes.

    The package's block-diagonal matrix assumes symmetric blocks twice: ``rmatmat`` (for
    :math:`S^\top M`) returns :math:`S M`, and ``from_inner()`` (for :math:`\Pi(S^\top S)`)
    returns :math:`\Pi(S S^\top)`. :math:`K (I - \beta_1 m_K)` is not symmetric from the
    second update on, so there its preconditioner is :math:`C C G K K` and its damping term
    :math:`\Pi(K K^\top)`: a departure from the paper's equations, not a choice
    (:func:`test_packages_block_diagonal_ignores_the_transpose`). The side-by-side runs use
    the package with both corrected.
    """
    for module in (
        singd.structures.blockdiagonal,
        singd.structures.hierarchical,
        singd.structures.triutoeplitz,
    ):
        monkeypatch.setattr(module, "lowest_precision", _lowest_precision)
    monkeypatch.setattr(BlockDiagonalMatrixTemplate, "rmatmat", _block_diagonal_rmatmat)
    monkeypatch.setattr(BlockDiagonalMatrixTemplate, "from_inner", _block_diagonal_from_inner)


class Block3(BlockDiagonalMatrixTemplate):
    """The package's block-diagonal template with blocks of 3."""

    BLOCK_DIM = BLOCK


class Hierarchical2x2(HierarchicalMatrixTemplate):
    """The package's hierarchical template with ``K1 = K2 = 2``."""

    MAX_K1, MAX_K2 = K1, K2


def _nested(template: type, name: str) -> type:
    """A triangular matrix from the package's recursive blocks: a 1 x 1 dense block and the rest.

    Exact for dimensions up to :data:`MAX_DIM` (the innermost rest is diagonal).
    """
    inner: type = DiagonalMatrix
    for level in range(MAX_DIM):
        if template is RecursiveBottomLeftMatrixTemplate:  # [[a, 0], [b, rest]]
            attributes = {"CLS_A": DenseMatrix, "CLS_C": inner, "MAX_DIMS": (1, float("inf"))}
        else:  # [[rest, b], [0, a]]
            attributes = {"CLS_A": inner, "CLS_C": DenseMatrix, "MAX_DIMS": (float("inf"), 1)}
        inner = type(f"{name}{level}", (template,), attributes)
    return inner


PACKAGE_STRUCTURES = {  # curvlab's name -> the package's class
    "dense": DenseMatrix,
    "diagonal": DiagonalMatrix,
    "block_diagonal": Block3,
    "lower_triangular": _nested(RecursiveBottomLeftMatrixTemplate, "Tril"),
    "upper_triangular": _nested(RecursiveTopRightMatrixTemplate, "Triu"),
    "hierarchical": Hierarchical2x2,
    "triu_toeplitz": TriuToeplitzMatrix,
}
NAMES = sorted(structures.STRUCTURES)


class PackageSINGD(package.SINGD):
    """The package's optimizer, knowing the structures above by curvlab's names."""

    SUPPORTED_STRUCTURES = {**package.SINGD.SUPPORTED_STRUCTURES, **PACKAGE_STRUCTURES}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (2, 6, 6))}


def batches(shape, steps, n=16):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(steps)
    ]


def run_curvlab(model, structure, data):
    optimizer = SINGD(
        model,
        loss_func=LOSS,
        structure=structure,
        block_size=BLOCK,
        hierarchical_sizes=(K1, K2),
        fisher_type="empirical",
        kfac_approx="expand",
        **HYPER,
    )
    for x, y in data:

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = LOSS(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return optimizer


def run_package(model, structure, data):
    hyper = dict(HYPER)
    hyper["T"] = hyper.pop("update_interval")
    optimizer = PackageSINGD(
        model,
        structures=(structure, structure),
        kfac_approx="expand",
        loss_average="batch",
        **hyper,
    )
    for x, y in data:
        optimizer.zero_grad()
        LOSS(model(x), y).backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("name", NAMES)
def test_symmetric_map_equals_the_packages(name):
    """curvlab's map of a symmetric matrix is the package's ``from_dense`` for every structure."""
    ours = structures.make_structure(name, block_size=BLOCK, hierarchical_sizes=(K1, K2))
    g = torch.Generator().manual_seed(4)
    m = torch.randn(9, 9, generator=g, dtype=torch.float64)
    m = m + m.T
    want = PACKAGE_STRUCTURES[name].from_dense(m).to_dense()
    torch.testing.assert_close(ours.from_symmetric(m[None]).to_dense()[0], want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_orthogonal_projection_is_half_the_packages_off_its_mirror(name):
    """The former map (the free entries kept): the package's, halved where the mirror is not free.

    A known factor of 2, e.g. for hierarchical and triu-Toeplitz (both follow the paper now).
    """
    ours = structures.make_structure(name, block_size=BLOCK, hierarchical_sizes=(K1, K2))
    ones = torch.ones(9, 9, dtype=torch.float64)
    orthogonal = ours.from_dense(ones[None]).to_dense()[0]
    paper = PACKAGE_STRUCTURES[name].from_dense(ones).to_dense()
    mirror_free = orthogonal.T != 0
    torch.testing.assert_close(paper[mirror_free], orthogonal[mirror_free])
    torch.testing.assert_close(paper[~mirror_free], 2 * orthogonal[~mirror_free])


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_parameters_equal_the_packages_over_steps(model_name, name):
    """Same model, data and hyperparameters: the parameters agree after 6 steps (3 updates)."""
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    ours = make().double()
    theirs = make().double()
    theirs.load_state_dict(ours.state_dict())
    start = [p.detach().clone() for p in ours.parameters()]
    data = batches(shape, steps=6)
    optimizer = run_curvlab(ours, name, data)
    run_package(theirs, name, data)
    for p, q, p0 in zip(ours.parameters(), theirs.parameters(), start, strict=True):
        assert not torch.allclose(p, p0)  # it moved
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    k, _ = next(iter(optimizer.preconditioner().values()))
    assert not torch.allclose(k.to_dense(), k.eye_like().to_dense())  # K moved off the identity


def test_packages_block_diagonal_ignores_the_transpose(monkeypatch):
    """``singd`` 0.0.5 (corrected in the side-by-side runs): ``S M`` for ``S^T M``, ``S S^T``."""
    monkeypatch.undo()
    g = torch.Generator().manual_seed(5)
    blocks, last = torch.randn(2, 3, 3, generator=g), torch.randn(1, 1, generator=g)
    s, m = Block3(blocks, last), torch.randn(7, 2, generator=g)
    dense = s.to_dense()
    torch.testing.assert_close(s.rmatmat(m), dense @ m)
    torch.testing.assert_close(
        s.from_inner().to_dense(), Block3.from_dense(dense @ dense.T).to_dense()
    )
    assert not torch.allclose(s.rmatmat(m), dense.T @ m)
