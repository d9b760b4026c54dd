"""Every model operator against its dense float64 reference, over unequal batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

from curvlab.linops import (
    GGN,
    CurvatureOperator,
    EmpiricalFisher,
    Hessian,
    Jacobian,
    JacobianT,
    NondeterminismError,
)
from tests.linops.cases import CASES, dense_reference, make_case

OPERATORS = {"ggn": GGN, "hessian": Hessian, "ef": EmpiricalFisher}
LOSSES = ["ce-mean", "mse-mean"]
TOL = {"atol": 1e-10, "rtol": 1e-8}


def _setup(kind: str, case: str, loss: str = "ce-mean"):
    model, loss_func, data, inputs, targets = make_case(case, loss)
    op = OPERATORS[kind](model, loss_func, None, data)
    return op, dense_reference(kind, model, loss_func, inputs, targets)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", OPERATORS)
def test_matmat_list_equals_dense_reference(kind, case, loss):
    op, ref = _setup(kind, case, loss)
    m = torch.randn(ref.shape[1], 3, dtype=torch.float64)
    as_list, start = [], 0
    for shape in op.in_shapes:
        size = int(np.prod(shape))
        as_list.append(m[start : start + size].reshape(*shape, 3))
        start += size
    result = torch.cat([t.reshape(-1, 3) for t in op @ as_list])
    torch.testing.assert_close(result, ref @ m, **TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", OPERATORS)
def test_matvec_and_rmatvec_flat(kind, case):
    op, ref = _setup(kind, case)
    v = torch.randn(ref.shape[1], dtype=torch.float64)
    torch.testing.assert_close(
        torch.stack([op @ v, v @ op]), torch.stack([ref @ v, v @ ref]), **TOL
    )


@pytest.mark.parametrize("case", CASES)
def test_jacobian_and_its_transpose(case):
    model, _, data, inputs, _ = make_case(case)
    jac = Jacobian(model, None, data)
    ref = dense_reference("jacobian", model, None, inputs, None)
    u = torch.randn(ref.shape[0], 2, dtype=torch.float64)
    v = torch.randn(ref.shape[1], 2, dtype=torch.float64)
    assert jac.shape == tuple(ref.shape)
    torch.testing.assert_close(
        torch.cat([jac @ v, jac.T @ u, (u.T @ jac).T, JacobianT(model, None, data) @ u]),
        torch.cat([ref @ v, ref.T @ u, ref.T @ u, ref.T @ u]),
        **TOL,
    )


def test_jacobian_list_form_is_per_batch():
    model, _, data, inputs, _ = make_case("mlp")
    jac = Jacobian(model, None, data)
    v = [torch.randn(p.shape, dtype=torch.float64) for p in model.parameters()]
    out = jac @ v
    assert [tuple(t.shape) for t in out] == [(3, 3), (1, 3), (3, 3)]


def test_sum_reduction_over_unequal_batches():
    model, loss_func, data, inputs, targets = make_case("mlp", "ce-sum")
    op = GGN(model, loss_func, None, data)
    torch.testing.assert_close(
        op.dense(), dense_reference("ggn", model, loss_func, inputs, targets), **TOL
    )


@pytest.mark.parametrize("case", ["mlp", "attention"])
def test_composition_against_dense(case):
    model, loss_func, data, inputs, targets = make_case(case)
    g, h = GGN(model, loss_func, None, data), Hessian(model, loss_func, None, data)
    jac = Jacobian(model, None, data)
    rg, rh = (dense_reference(k, model, loss_func, inputs, targets) for k in ("ggn", "hessian"))
    rj = dense_reference("jacobian", model, None, inputs, None)
    combined = 2.0 * g - h / 4 + (-g) * 0.5 + g @ h + jac.T @ jac
    expected = 2.0 * rg - rh / 4 - 0.5 * rg + rg @ rh + rj.T @ rj
    m = torch.randn(rg.shape[1], 4, dtype=torch.float64)
    torch.testing.assert_close(combined @ m, expected @ m, **TOL)


def test_adjoint_of_composition():
    model, loss_func, data, inputs, targets = make_case("mlp")
    g, h = GGN(model, loss_func, None, data), Hessian(model, loss_func, None, data)
    rg, rh = (dense_reference(k, model, loss_func, inputs, targets) for k in ("ggn", "hessian"))
    torch.testing.assert_close((g @ h - 3 * h).T.dense(), (rg @ rh - 3 * rh).T, **TOL)


def test_scipy_export_matmat_and_top_eigenvalue():
    model, loss_func, data, inputs, targets = make_case("cnn")
    op = GGN(model, loss_func, None, data)
    ref = dense_reference("ggn", model, loss_func, inputs, targets)
    lin = op.to_scipy()
    m = np.random.default_rng(0).standard_normal((ref.shape[1], 2))
    top = eigsh(lin, k=1, which="LA", tol=1e-10)[0][0]
    assert np.allclose(lin @ m, ref.numpy() @ m, atol=1e-10) and np.isclose(
        top, float(torch.linalg.eigvalsh(ref)[-1]), rtol=1e-7
    )


@pytest.mark.parametrize("kind", OPERATORS)
def test_restriction_to_parameters_is_the_block(kind):
    model, loss_func, data, inputs, targets = make_case("residual-layernorm")
    op = OPERATORS[kind](model, loss_func, None, data)
    ref = dense_reference(kind, model, loss_func, inputs, targets)
    names = ["norm.weight", "head.bias"]
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    index = torch.cat([offsets[n] for n in names])
    sub = op.restrict(names)
    generic = (op + 0.0 * op).restrict(names)  # a sum restricts its terms
    params_subset = OPERATORS[kind](
        model, loss_func, {n: dict(model.named_parameters())[n] for n in names}, data
    )
    expected = ref[index][:, index]
    torch.testing.assert_close(
        torch.stack(
            [
                sub.dense(),
                generic.dense(),
                params_subset.dense(),
                CurvatureOperator.restrict(op, names).dense(),
            ]
        ),
        torch.stack([expected] * 4),
        **TOL,
    )


def test_float32_matches_float64_reference():
    model, loss_func, data, inputs, targets = make_case("cnn")
    ref = dense_reference("ggn", model, loss_func, inputs, targets)
    model32 = model.float()
    data32 = [(x.float(), y) for x, y in data]
    op = GGN(model32, loss_func, None, data32)
    v = torch.randn(ref.shape[1], dtype=torch.float64)
    out = op @ v.float()
    assert out.dtype == torch.float32 and op.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref @ v, atol=1e-5, rtol=1e-4)


class _Shuffled:
    """Data that reshuffles at every pass, as a ``DataLoader(shuffle=True)``."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets, self.calls = inputs, targets, 0

    def __iter__(self):
        self.calls += 1
        order = torch.randperm(
            len(self.inputs), generator=torch.Generator().manual_seed(self.calls)
        )
        return iter(zip(self.inputs[order].split(3), self.targets[order].split(3), strict=True))


def test_determinism_check_catches_shuffling_and_can_be_switched_off():
    model, loss_func, _, inputs, targets = make_case("mlp")
    data = _Shuffled(inputs, targets)
    with pytest.raises(NondeterminismError, match="batch 0"):
        GGN(model, loss_func, None, data)
    assert GGN(model, loss_func, None, data, check_deterministic=False).shape == (39, 39)


def test_determinism_check_catches_dropout_in_training_mode():
    model, loss_func, data, _, _ = make_case("mlp")
    model = torch.nn.Sequential(model[0], torch.nn.Dropout(0.5), *model[1:]).train()
    with pytest.raises(NondeterminismError, match="model outputs"):
        Hessian(model, loss_func, None, data)


def test_one_shot_iterator_is_rejected():
    model, loss_func, data, _, _ = make_case("mlp")
    with pytest.raises(TypeError, match="re-iterable"):
        GGN(model, loss_func, None, iter(data))


def test_bad_shapes_name_the_problem():
    model, loss_func, data, _, _ = make_case("mlp")
    op = GGN(model, loss_func, None, data)
    with pytest.raises(ValueError, match=r"\[39\]"):
        op @ torch.ones(5)
    with pytest.raises(ValueError, match="shapes"):
        op + Jacobian(model, None, data)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", OPERATORS)
def test_kept_graph_equals_recomputed_and_dense(kind, case):
    model, loss_func, data, inputs, targets = make_case(case)
    ref = dense_reference(kind, model, loss_func, inputs, targets)
    kept = OPERATORS[kind](model, loss_func, None, data, keep_graph=True)
    fresh = OPERATORS[kind](model, loss_func, None, data, keep_graph=False)
    m = torch.randn(ref.shape[1], 3, dtype=torch.float64)
    first, second = kept @ m, kept @ m  # the GGN family records its passes at the second
    third = kept @ m  # and reuses them
    assert len(kept._kept_passes) == len(data) and not fresh._kept_passes
    torch.testing.assert_close(
        torch.stack([first, second, third, fresh @ m]), torch.stack([ref @ m] * 4), **TOL
    )


@pytest.mark.parametrize("kind", OPERATORS)
def test_kept_graph_follows_in_place_changes(kind):
    model, loss_func, data, inputs, targets = make_case("mlp")
    op = OPERATORS[kind](model, loss_func, None, [(inputs, targets)])
    assert op.keep_graph  # one batch in a list: kept by default
    v = torch.randn(op.shape[1], dtype=torch.float64)
    op @ v, op @ v  # passes recorded
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimizer step, in place
        inputs.mul_(0.5)
    ref = dense_reference(kind, model, loss_func, inputs, targets)
    torch.testing.assert_close(op @ v, ref @ v, **TOL)


def test_kept_graph_mc_ggn_uses_the_same_samples():
    model, loss_func, data, _, _ = make_case("cnn")
    kept = GGN(model, loss_func, None, data, mc_samples=2, seed=3, keep_graph=True)
    fresh = GGN(model, loss_func, None, data, mc_samples=2, seed=3, keep_graph=False)
    m = torch.randn(kept.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(
        torch.stack([kept @ m, kept @ m, kept @ m]), torch.stack([fresh @ m] * 3)
    )


def test_ggn_falls_back_when_the_model_cannot_be_linearised(monkeypatch):
    import curvlab.linops.ggn as ggn_module

    def untraceable(*args, **kwargs):
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(ggn_module, "linearize", untraceable)
    model, loss_func, data, inputs, targets = make_case("cnn")
    op = GGN(model, loss_func, None, data, keep_graph=True)
    m = torch.randn(op.shape[1], 2, dtype=torch.float64)
    ref = dense_reference("ggn", model, loss_func, inputs, targets)
    torch.testing.assert_close(torch.stack([op @ m, op @ m]), torch.stack([ref @ m] * 2), **TOL)
    assert not op.keep_graph and not op._kept_passes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_hessian_linearised_gradient_equals_dense(case, dtype):
    model, loss_func, data, inputs, targets = make_case(case)
    ref = dense_reference("hessian", model, loss_func, inputs, targets)
    model = model.to(dtype)
    data = [(x.to(dtype), y.to(dtype) if y.is_floating_point() else y) for x, y in data]
    op = Hessian(model, loss_func, None, data, keep_graph=True, linearize_after=0)
    m = torch.randn(ref.shape[1], 3, dtype=torch.float64)
    products = [(op @ m.to(dtype)).double() for _ in range(3)]  # graph, then linearised
    kinds = {entry[3][0] for entry in op._kept_passes.values()}
    assert op.linearized and kinds == {"linear"}  # and the graphs freed
    tol = TOL if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(torch.stack(products), torch.stack([ref @ m] * 3), **tol)


def _three_products_equal_the_dense_hessian(case: str) -> Hessian:
    """A Hessian told to linearise at once; its first three products against the dense one."""
    model, loss_func, data, inputs, targets = make_case(case)
    op = Hessian(model, loss_func, None, data, keep_graph=True, linearize_after=0)
    m = torch.randn(op.shape[1], 2, dtype=torch.float64)
    ref = dense_reference("hessian", model, loss_func, inputs, targets)
    products = torch.stack([op @ m for _ in range(3)])  # graph, then linearisation tried
    torch.testing.assert_close(products, torch.stack([ref @ m] * 3), **TOL)
    return op


def test_hessian_keeps_the_graph_when_the_linearisation_is_wrong(monkeypatch):
    linearize = Hessian._linearize

    def wrong(self, inputs, targets):  # as a faulty forward-over-reverse rule would be
        tangent = linearize(self, inputs, targets)
        return lambda v: {k: 1.01 * t for k, t in tangent(v).items()}

    monkeypatch.setattr(Hessian, "_linearize", wrong)
    op = _three_products_equal_the_dense_hessian("cnn")
    assert op.linearized is False


def test_hessian_keeps_the_graph_when_the_model_cannot_be_traced(monkeypatch):
    import curvlab.linops.hessian as hessian_module

    def untraceable(*args, **kwargs):
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(hessian_module, "linearize", untraceable)
    op = _three_products_equal_the_dense_hessian("mlp")
    assert op.linearized is False and len(op._kept_passes) == len(op.data)


@pytest.mark.parametrize("after", [None, 2.0])
def test_hessian_stays_on_the_graph_without_or_before_linearisation(after):
    model, loss_func, data, inputs, targets = make_case("mlp")
    op = Hessian(model, loss_func, None, data, keep_graph=True, linearize_after=after)
    m = torch.randn(op.shape[1], 2, dtype=torch.float64)
    ref = dense_reference("hessian", model, loss_func, inputs, targets)
    products = torch.stack([op @ m for _ in range(3)])  # milliseconds, far below 2 s
    torch.testing.assert_close(products, torch.stack([ref @ m] * 3), **TOL)
    assert op.linearized is None
    assert {entry[3][0] for entry in op._kept_passes.values()} == {"graph"}


def test_hessian_rejects_negative_linearize_after():
    model, loss_func, data, _, _ = make_case("mlp")
    with pytest.raises(ValueError, match="linearize_after"):
        Hessian(model, loss_func, None, data, linearize_after=-1.0)
