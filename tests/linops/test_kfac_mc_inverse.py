"""MC operators converge in mean; KFAC blocks and their damped inverses; CG and Neumann solves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.backprop import KFLR, compute
from curvlab.linops import (
    GGN,
    CGInverse,
    DenseOperator,
    FisherMC,
    Hessian,
    KFACOperator,
    NeumannInverse,
)
from tests.linops.cases import CASES, dense_reference, make_case


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss", ["ce-mean", "mse-mean", "bce-mean"])
def test_mc_ggn_converges_in_mean(loss):
    model, loss_func, data, inputs, targets = make_case("mlp", loss)
    exact = dense_reference("ggn", model, loss_func, inputs, targets)
    few = GGN(model, loss_func, None, data, mc_samples=4, seed=1).dense()
    many = GGN(model, loss_func, None, data, mc_samples=4000, seed=1).dense()
    assert _relative_error(many, exact) < 0.06 < _relative_error(few, exact)


def test_fisher_mc_is_a_fixed_symmetric_matrix_equal_to_mc_ggn():
    model, loss_func, data, _, _ = make_case("cnn")
    fisher = FisherMC(model, loss_func, None, data, mc_samples=3, seed=7)
    ggn = GGN(model, loss_func, None, data, mc_samples=3, seed=7)
    first, second = fisher.dense(), fisher.dense()
    torch.testing.assert_close(
        torch.stack([second, first.T, ggn.dense()]), torch.stack([first] * 3)
    )


def test_fisher_mc_mean_over_seeds_converges():
    model, loss_func, data, inputs, targets = make_case("residual-layernorm")
    exact = dense_reference("ggn", model, loss_func, inputs, targets)
    mean = sum(FisherMC(model, loss_func, None, data, 50, seed=s).dense() for s in range(20)) / 20
    assert _relative_error(mean, exact) < 0.06


@pytest.mark.parametrize("case", CASES)
def test_kfac_operator_single_batch_is_block_diagonal_of_engine_blocks(case):
    model, loss_func, data, inputs, targets = make_case(case)
    op = KFACOperator(model, loss_func, None, [(inputs, targets)], fisher_type="type-2")
    blocks = compute(model, loss_func, inputs, targets, [KFLR()])["KFLR"]
    expected = torch.block_diag(*(blocks[name].dense() for name, _ in model.named_parameters()))
    torch.testing.assert_close(op.dense(), expected)


@pytest.mark.parametrize("case", ["mlp", "cnn", "attention"])
def test_kfac_loader_accumulation_equals_one_batch_of_all_data(case):
    model, loss_func, data, inputs, targets = make_case(case)
    loader = KFACOperator(model, loss_func, None, data, fisher_type="type-2")
    whole = KFACOperator(model, loss_func, None, [(inputs, targets)], fisher_type="type-2")
    torch.testing.assert_close(loader.dense(), whole.dense())


def test_kfac_bias_and_layernorm_blocks_are_exact_ggn_blocks():
    model, loss_func, data, inputs, targets = make_case("residual-layernorm")
    ggn = dense_reference("ggn", model, loss_func, inputs, targets)
    names = ["inp.bias", "norm.weight", "norm.bias", "head.bias"]
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    expected = torch.block_diag(*(ggn[offsets[n]][:, offsets[n]] for n in names))
    op = KFACOperator(model, loss_func, None, data, fisher_type="type-2").restrict(names)
    torch.testing.assert_close(op.dense(), expected)


def test_kfac_is_exact_for_one_linear_layer_and_one_sample():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    op = KFACOperator(
        model,
        nn.CrossEntropyLoss(),
        None,
        [(x, y)],
        fisher_type="type-2",
        separate_weight_and_bias=False,
    )
    torch.testing.assert_close(
        op.dense(), dense_reference("ggn", model, nn.CrossEntropyLoss(), x, y)
    )


def test_empirical_kfac_is_the_empirical_fisher_for_one_linear_layer_and_one_sample():
    torch.manual_seed(0)
    model, loss_func = nn.Linear(4, 3).double(), nn.MSELoss()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    op = KFACOperator(
        model, loss_func, None, [(x, y)], fisher_type="empirical", separate_weight_and_bias=False
    )
    torch.testing.assert_close(op.dense(), dense_reference("ef", model, loss_func, x, y))


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_kfac_types_over_a_loader_equal_one_batch(fisher_type):
    model, loss_func, data, inputs, targets = make_case("cnn")
    ops = [
        KFACOperator(model, loss_func, None, d, fisher_type=fisher_type, mc_samples=4000)
        for d in (data, [(inputs, targets)])
    ]
    loader, whole = (op.dense() for op in ops)
    assert _relative_error(loader, whole) < (1e-12 if fisher_type == "empirical" else 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operators_on_the_gpu_match_the_cpu(dtype):
    model, loss_func, data, _, _ = make_case("attention")
    tol = {"atol": 1e-4, "rtol": 1e-3} if dtype == torch.float32 else {}
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        m = model.to(device=device, dtype=dtype)
        ops = [
            GGN(m, loss_func, None, data),
            Hessian(m, loss_func, None, data),
            KFACOperator(m, loss_func, None, data, fisher_type="type-2"),
            GGN(m, loss_func, None, data, mc_samples=2),
        ]
        results.append(torch.stack([(op @ v.to(device, dtype)).cpu().double() for op in ops]))
    torch.testing.assert_close(results[1], results[0], **tol)


def test_kfac_inverse_inverts_the_damped_operator():
    model, loss_func, data, _, _ = make_case("cnn")
    op = KFACOperator(model, loss_func, None, data, mc_samples=2)
    damping = 1e-2
    m = torch.randn(op.shape[1], 3, dtype=torch.float64)
    damped = op.dense() + damping * torch.eye(op.shape[1], dtype=torch.float64)
    torch.testing.assert_close(op.inverse(damping) @ (damped @ m), m)


def test_kfac_pi_damping_inverts_the_factored_damping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    op = KFACOperator(
        model,
        nn.CrossEntropyLoss(),
        [model[0].weight],
        [(x[:2], y[:2]), (x[2:], y[2:])],
        fisher_type="type-2",
    )
    (block,) = op.blocks[:1]
    a, b, damping = block.input_factor[0], block.output_factor[0], 0.1
    pi = ((a.trace() / 4) / (b.trace() / 5)).sqrt()
    damped_a = a + pi * damping**0.5 * torch.eye(4, dtype=torch.float64)
    damped_b = b + damping**0.5 / pi * torch.eye(5, dtype=torch.float64)
    expected = torch.linalg.inv(torch.kron(damped_b, damped_a))  # row-major W.flatten()
    torch.testing.assert_close(op.inverse(damping, pi_damping=True).dense(), expected)


def test_cg_solves_damped_ggn_to_tolerance():
    model, loss_func, data, inputs, targets = make_case("attention")
    ggn = GGN(model, loss_func, None, data)
    dense = dense_reference("ggn", model, loss_func, inputs, targets)
    damping = 1e-3
    b = torch.randn(ggn.shape[1], 2, dtype=torch.float64)
    inverse = CGInverse(ggn, damping=damping, tol=1e-10)
    x = inverse @ b
    residual = b - (dense + damping * torch.eye(len(dense), dtype=dense.dtype)) @ x
    assert inverse.info.converged and float(residual.norm() / b.norm()) < 1e-9


def test_cg_with_exact_preconditioner_takes_one_iteration():
    model, loss_func, data, inputs, targets = make_case("cnn")
    ggn, damping = GGN(model, loss_func, None, data), 1e-2
    dense = dense_reference("ggn", model, loss_func, inputs, targets)
    damped = dense + damping * torch.eye(len(dense), dtype=dense.dtype)
    b = torch.randn(ggn.shape[1], 2, dtype=torch.float64)
    pre = CGInverse(ggn, damping, tol=1e-8, preconditioner=DenseOperator(torch.linalg.inv(damped)))
    x = pre @ b
    assert pre.info.iterations == 1 and torch.allclose(damped @ x, b, atol=1e-8)


def test_cg_with_kfac_preconditioner_solves_the_same_system():
    model, loss_func, data, _, _ = make_case("cnn")
    ggn = GGN(model, loss_func, None, data)
    kfac = KFACOperator(model, loss_func, None, data, fisher_type="type-2")
    b = torch.randn(ggn.shape[1], dtype=torch.float64)
    plain = CGInverse(ggn, damping=1e-2, tol=1e-10)
    pre = CGInverse(ggn, damping=1e-2, tol=1e-10, preconditioner=kfac.inverse(1e-2))
    torch.testing.assert_close(pre @ b, plain @ b, atol=1e-7, rtol=1e-7)


def test_neumann_series_solves_to_tolerance():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))[0]
    matrix = q @ torch.diag(torch.linspace(0.0, 4.0, 20, dtype=torch.float64)) @ q.T
    op, damping = DenseOperator(matrix), 0.5
    b = torch.randn(20, 3, dtype=torch.float64)
    x = NeumannInverse(op, damping=damping, num_terms=150) @ b
    expected = torch.linalg.solve(matrix + damping * torch.eye(20, dtype=torch.float64), b)
    assert float((x - expected).norm() / expected.norm()) < 1e-6


def test_neumann_with_too_few_terms_is_not_accurate():
    matrix = torch.diag(torch.linspace(0.01, 1.0, 10, dtype=torch.float64))
    b = torch.ones(10, dtype=torch.float64)
    x = NeumannInverse(DenseOperator(matrix), num_terms=5) @ b
    assert float((x - b / matrix.diagonal()).norm()) > 1.0
