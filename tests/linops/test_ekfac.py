"""EKFAC against its dense definition: KFAC's eigenbasis Q, eigenvalues diag(Qᵀ G Q)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from curvlab.backprop import KronFactors
from curvlab.linops import EKFACOperator, KFACOperator
from tests.linops.cases import dense_reference, make_case

REFERENCE = {"type-2": "ggn", "empirical": "ef"}


def _dense_ekfac(kfac: KFACOperator, curvature: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Σ_blocks Q diag(Qᵀ G_block Q) Qᵀ with Q = Q_B ⊗ Q_A from KFAC's blocks, G dense."""
    offsets, start = {}, 0
    for name in names:
        size = kfac.params[name].numel()
        offsets[name] = torch.arange(start, start + size)
        start += size
    out = torch.zeros_like(curvature)
    for block in kfac.blocks:
        index = torch.cat([offsets[n] for n in block.names])
        g = curvature[index][:, index]
        if isinstance(block, KronFactors):
            _, qa, _, qb = block.eigh()
            q = replace(block, input_factor=qa, output_factor=qb).dense()  # Q_B ⊗ Q_A
            g = q @ torch.diag((q.T @ g @ q).diagonal()) @ q.T
        out[index[:, None], index[None, :]] = g
    return out


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("case", ["mlp", "cnn", "residual-layernorm", "attention"])
def test_ekfac_equals_dense_definition_over_unequal_batches(case, fisher_type):
    model, loss_func, data, inputs, targets = make_case(case)
    ekfac = EKFACOperator(model, loss_func, None, data, fisher_type=fisher_type)
    kfac = KFACOperator(model, loss_func, None, data, fisher_type=fisher_type)
    curvature = dense_reference(REFERENCE[fisher_type], model, loss_func, inputs, targets)
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(ekfac.dense(), _dense_ekfac(kfac, curvature, names))


def test_ekfac_joint_weight_and_bias_and_mse_sum():
    model, loss_func, data, inputs, targets = make_case("mlp", "mse-sum")
    options = {"fisher_type": "type-2", "separate_weight_and_bias": False}
    ekfac = EKFACOperator(model, loss_func, None, data, **options)
    kfac = KFACOperator(model, loss_func, None, data, **options)
    curvature = dense_reference("ggn", model, loss_func, inputs, targets)
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(ekfac.dense(), _dense_ekfac(kfac, curvature, names))


def test_ekfac_is_closer_to_the_ggn_blocks_than_kfac():
    model, loss_func, data, inputs, targets = make_case("cnn")
    ekfac = EKFACOperator(model, loss_func, None, data, fisher_type="type-2").dense()
    kfac = KFACOperator(model, loss_func, None, data, fisher_type="type-2").dense()
    mask = (kfac != 0) | (ekfac != 0)  # the block-diagonal pattern
    ggn = dense_reference("ggn", model, loss_func, inputs, targets) * mask
    assert (ekfac - ggn).norm() < (kfac - ggn).norm()


def test_ekfac_mc_is_reproducible_and_its_trace_is_the_dense_trace():
    model, loss_func, data, _, _ = make_case("cnn")
    first = EKFACOperator(model, loss_func, None, data, mc_samples=2, seed=3)
    second = EKFACOperator(model, loss_func, None, data, mc_samples=2, seed=3)
    dense = first.dense()
    torch.testing.assert_close(
        torch.stack([second.dense(), dense.T, first.trace().expand_as(dense)]),
        torch.stack([dense, dense, dense.trace().expand_as(dense)]),
    )


def test_ekfac_damped_inverse_solves():
    model, loss_func, data, _, _ = make_case("cnn")
    ekfac = EKFACOperator(model, loss_func, None, data, fisher_type="type-2")
    damping = 1e-3
    dense = ekfac.dense() + damping * torch.eye(ekfac.shape[0], dtype=torch.float64)
    rhs = torch.randn(ekfac.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(ekfac.inverse(damping) @ rhs, torch.linalg.solve(dense, rhs))


def test_ekfac_rejects_pi_damping():
    model, loss_func, data, _, _ = make_case("mlp")
    with pytest.raises(ValueError, match="pi_damping"):
        EKFACOperator(model, loss_func, None, data, fisher_type="type-2").inverse(1.0, True)
