"""ViViT eigenpairs against ``torch.linalg.eigh`` of the dense float64 GGN on its non-zero part."""

from __future__ import annotations

import pytest
import torch

from curvlab.vivit import ggn_eigh
from tests import reference
from tests.vivit.helpers import (
    PROBLEM_NAMES,
    assert_eigenpairs,
    dense_ggn,
    mc_factor,
    problem,
    rank,
)

LOSSES = ["ce-mean", "mse-sum"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_exact_eigenpairs_equal_dense_nonzero_part(name, loss):
    model, loss_func, x, y = problem(name, loss)
    ggn = dense_ggn(model, loss_func, x, y)
    values, vectors = ggn_eigh(model, loss_func, x, y, k=rank(ggn))
    assert_eigenpairs(values, vectors, ggn)


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_mc_eigenpairs_equal_those_of_the_same_sampled_factor(name):
    model, loss_func, x, y = problem(name, "ce-mean")
    factor = mc_factor(model, loss_func, x, y, seed=3)
    ggn = factor.T @ factor
    values, vectors = ggn_eigh(
        model,
        loss_func,
        x,
        y,
        k=rank(ggn),
        mc_samples=1,
        generator=torch.Generator().manual_seed(3),
    )
    assert_eigenpairs(values, vectors, ggn)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", ["mlp", "residual-conv-batchnorm"])
def test_subsampled_eigenpairs_equal_the_subsample_ggn(name, loss):
    model, loss_func, x, y = problem(name, loss)
    subsampling = [2, 0]
    ggn = dense_ggn(model, loss_func, x, y, subsampling)
    values, vectors = ggn_eigh(model, loss_func, x, y, k=rank(ggn), subsampling=subsampling)
    assert_eigenpairs(values, vectors, ggn)


def test_mc_subsampled_eigenpairs_equal_those_of_the_sampled_factor():
    model, loss_func, x, y = problem("cnn2d", "ce-mean")
    subsampling = [1, 2]
    factor = mc_factor(model, loss_func, x, y, seed=5, subsampling=subsampling)
    ggn = factor.T @ factor
    values, vectors = ggn_eigh(
        model,
        loss_func,
        x,
        y,
        k=rank(ggn),
        mc_samples=1,
        subsampling=subsampling,
        generator=torch.Generator().manual_seed(5),
    )
    assert_eigenpairs(values, vectors, ggn)


def _slices(model):
    params = reference.trainable_params(model)
    out, start = {}, 0
    for name, p in params.items():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_per_parameter_blocks_equal_dense_diagonal_blocks(name):
    model, loss_func, x, y = problem(name, "ce-mean")
    ggn = dense_ggn(model, loss_func, x, y)
    slices = _slices(model)
    k = 2
    values, vectors = ggn_eigh(model, loss_func, x, y, k=k, per_parameter=True)
    assert list(values) == list(slices)
    for param, idx in slices.items():
        block = ggn[idx, idx]
        if rank(block) < k:
            continue
        assert_eigenpairs(values[param], vectors[param], block)


def test_parameter_groups_equal_dense_group_blocks():
    model, loss_func, x, y = problem("residual-shared", "mse-sum")
    ggn = dense_ggn(model, loss_func, x, y)
    slices = _slices(model)
    groups = [["inp.weight", "inp.bias", "head.bias"], ["block.weight", "block.bias"]]
    values, vectors = ggn_eigh(model, loss_func, x, y, k=3, per_parameter=groups)
    for group in groups:
        order = [name for name in slices if name in group]
        idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in order])
        assert_eigenpairs(values[tuple(order)], vectors[tuple(order)], ggn[idx][:, idx])


def test_rank_deficient_tail_is_zero():
    """CE with C classes: rank at most (C - 1) N < C N; the extra eigenpairs are zero."""
    model, loss_func, x, y = problem("mlp", "ce-mean")
    values, vectors = ggn_eigh(model, loss_func, x, y, k=12)
    r = rank(dense_ggn(model, loss_func, x, y))
    assert r < 12
    assert torch.all(values[r:] == 0) and torch.all(vectors[:, r:] == 0)


def test_eigenvectors_are_orthonormal_and_reconstruct_the_ggn():
    model, loss_func, x, y = problem("cnn2d", "mse-sum")
    ggn = dense_ggn(model, loss_func, x, y)
    values, vectors = ggn_eigh(model, loss_func, x, y, k=rank(ggn))
    reconstruction = vectors @ torch.diag(values) @ vectors.T
    torch.testing.assert_close(reconstruction, ggn, rtol=1e-8, atol=1e-10 * ggn.abs().max())


@pytest.mark.parametrize("k", [0, 13, 2.0])
def test_k_out_of_range_is_rejected(k):
    model, loss_func, x, y = problem("mlp", "ce-mean")
    with pytest.raises(ValueError, match="k"):
        ggn_eigh(model, loss_func, x, y, k=k)


def test_unknown_group_is_rejected():
    model, loss_func, x, y = problem("mlp", "ce-mean")
    with pytest.raises(ValueError, match="nope"):
        ggn_eigh(model, loss_func, x, y, k=1, per_parameter=[["0.weight", "nope"]])


def test_linear_layers_never_form_per_sample_vjps(monkeypatch):
    """On an MLP the Gram matrix and eigenvectors come from factored forms only."""
    from curvlab.backprop.rules.linear import LinearRule

    def forbidden(*args, **kwargs):
        raise AssertionError("LinearRule.jac_t formed [M, N, out, in]")

    monkeypatch.setattr(LinearRule, "jac_t", forbidden)
    model, loss_func, x, y = problem("mlp", "ce-mean")
    ggn = dense_ggn(model, loss_func, x, y)
    values, vectors = ggn_eigh(model, loss_func, x, y, k=rank(ggn))
    assert_eigenpairs(values, vectors, ggn)


def test_attention_model_on_the_default_gram():
    model, loss_func, x, y = problem("attention-layernorm", "ce-mean")
    ggn = dense_ggn(model, loss_func, x, y)
    values, vectors = ggn_eigh(model, loss_func, x, y, k=rank(ggn))
    assert_eigenpairs(values, vectors, ggn)
