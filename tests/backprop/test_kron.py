"""The typed Kronecker results: one test per layout against the dense GGN block, and their algebra.

Where the Kronecker product is exact (one sample, one position; a grouped layer last before an
MSE loss, whose output Hessian is diagonal), ``block.dense()`` must equal the dense float64 GGN
block of the covered parameters, built with torch.func in ``tests/reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvlab.backprop import KFAC, KFLR, DenseBlock, KFACEmpirical, KronFactors, compute, pool
from tests import reference
from tests.backprop.problems import LOSSES, PROBLEMS, build, make_targets


def _exact_case(layer: nn.Module, head: list[nn.Module], x_shape, loss: str, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(layer, *head).double()
    x = torch.randn(*x_shape, dtype=torch.float64)
    loss_func = LOSSES[loss]()
    return model, loss_func, x, make_targets(loss_func, model(x).detach())


def _ggn_block(model, loss_func, x, y, names: tuple[str, ...]) -> torch.Tensor:
    ggn = reference.ggn(model, loss_func, x, y)
    index, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            index.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    idx = torch.cat(index)
    return ggn[idx][:, idx]


# layout -> (layer, head, input shape, loss); one sample and one output position each
LAYOUTS = {
    "linear-rows": (nn.Linear(3, 4), [nn.Tanh(), nn.Linear(4, 2)], (1, 3), "ce-mean"),
    "conv-rows": (
        nn.Conv2d(2, 3, 3),
        [nn.Flatten(), nn.Sigmoid(), nn.Linear(3, 2)],
        (1, 2, 3, 3),
        "bce-mean",
    ),
    "grouped-conv": (nn.Conv2d(4, 4, 3, groups=2), [nn.Flatten()], (1, 4, 3, 3), "mse-mean"),
    "conv-transpose": (
        nn.ConvTranspose2d(2, 3, 3, padding=1),
        [nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)],
        (1, 2, 1, 1),
        "ce-sum",
    ),
    "grouped-conv-transpose": (
        nn.ConvTranspose1d(4, 6, 3, padding=1, groups=2),
        [nn.Flatten()],
        (1, 4, 1),
        "mse-sum",
    ),
}


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dense_is_the_ggn_block(layout, separate):
    layer, head, shape, loss = LAYOUTS[layout]
    model, loss_func, x, y = _exact_case(layer, head, shape, loss)
    results = compute(model, loss_func, x, y, [KFLR(separate_weight_and_bias=separate)])
    blocks = results["KFLRJoint" if not separate else "KFLR"]
    weight = blocks["0.weight"]
    assert isinstance(weight, KronFactors)
    if separate:
        assert weight.names == ("0.weight",) and blocks["0.bias"].names == ("0.bias",)
        for block in (weight, blocks["0.bias"]):
            expected = _ggn_block(model, loss_func, x, y, block.names)
            torch.testing.assert_close(block.dense(), expected, rtol=1e-8, atol=1e-12)
    else:
        assert blocks["0.bias"] is weight and weight.names == ("0.weight", "0.bias")
        expected = _ggn_block(model, loss_func, x, y, weight.names)
        torch.testing.assert_close(weight.dense(), expected, rtol=1e-8, atol=1e-12)


def test_embedding_columns_layout_is_the_ggn_block():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(4, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.tensor([[2]]), torch.tensor([1])
    loss_func = nn.CrossEntropyLoss()
    block = compute(model, loss_func, x, y, [KFLR()])["KFLR"]["0.weight"]
    assert block.layout.kind == "columns"
    expected = _ggn_block(model, loss_func, x, y, ("0.weight",))
    torch.testing.assert_close(block.dense(), expected, rtol=1e-8, atol=1e-12)


def test_whole_block_for_layer_norm():
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == "layernorm-mlp"), "ce-sum")
    block = compute(model, loss_func, x, y, [KFLR()])["KFLR"]["1.bias"]
    assert isinstance(block, DenseBlock)
    expected = _ggn_block(model, loss_func, x, y, ("1.bias",))
    torch.testing.assert_close(block.dense(), expected, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------- algebra of blocks
ALGEBRA = [
    ("cnn2d-grouped", True),
    ("conv-transpose", True),
    ("mlp", False),
    ("embedding-batchnorm-groupnorm", True),
]


def _blocks(problem: str, separate: bool, seed: int = 0) -> list:
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == problem), "ce-mean", seed)
    q = KFLR(separate_weight_and_bias=separate)
    values = compute(model, loss_func, x, y, [q])[q.name]
    unique = {id(b): b for b in values.values()}
    return list(unique.values())


def _random_value(block, lead=()):
    shapes = block.layout.shapes if isinstance(block, KronFactors) else block.shapes
    tensors = [torch.randn(*lead, *s, dtype=torch.float64) for s in shapes]
    return tensors[0] if len(tensors) == 1 else tensors


def _flat(value, lead: int = 0) -> torch.Tensor:
    tensors = [value] if isinstance(value, torch.Tensor) else list(value)
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=-1)


@pytest.mark.parametrize(("problem", "separate"), ALGEBRA)
def test_matvec_is_dense_times_vector(problem, separate):
    for block in _blocks(problem, separate):
        v = _random_value(block, (3,))
        expected = _flat(v, 1) @ block.dense()
        torch.testing.assert_close(_flat(block.matvec(v), 1), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("problem", "separate"), ALGEBRA)
def test_solve_inverts_the_damped_block(problem, separate):
    for block in _blocks(problem, separate):
        v = _random_value(block)
        dense = block.dense()
        eye = torch.eye(dense.shape[0], dtype=dense.dtype)
        expected = torch.linalg.solve(dense + 0.3 * eye, _flat(v))
        torch.testing.assert_close(
            _flat(block.solve(v, damping=0.3)), expected, rtol=1e-8, atol=1e-10
        )


@pytest.mark.parametrize(("problem", "separate"), ALGEBRA[:3])
def test_pi_damping_inverts_the_damped_factors(problem, separate):
    for block in _blocks(problem, separate):
        a, b = block.input_factor, block.output_factor
        pi = (a.diagonal(dim1=-2, dim2=-1).mean(-1) / b.diagonal(dim1=-2, dim2=-1).mean(-1)).sqrt()
        damped = KronFactors(
            a + pi[:, None, None] * math.sqrt(0.2) * torch.eye(a.shape[-1], dtype=a.dtype),
            b + math.sqrt(0.2) / pi[:, None, None] * torch.eye(b.shape[-1], dtype=b.dtype),
            block.layout,
            block.names,
            block.num_samples,
            block.input_count,
            block.batch_factor,
        )
        v = _random_value(block)
        expected = torch.linalg.solve(damped.dense(), _flat(v))
        ours = block.solve(v, damping=0.2, pi_damping=True)
        torch.testing.assert_close(_flat(ours), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("problem", "separate"), ALGEBRA[:3])
def test_eigh_reconstructs_the_factors(problem, separate):
    for block in _blocks(problem, separate):
        la, qa, lb, qb = block.eigh()
        torch.testing.assert_close(
            qa @ torch.diag_embed(la) @ qa.transpose(-2, -1), block.input_factor
        )
        torch.testing.assert_close(
            qb @ torch.diag_embed(lb) @ qb.transpose(-2, -1), block.output_factor
        )


def test_running_average_is_factor_wise_arithmetic():
    old, new = _blocks("cnn2d-grouped", True, 0), _blocks("cnn2d-grouped", True, 1)
    for a, b in zip(old, new, strict=True):
        avg = 0.9 * a + 0.1 * b
        torch.testing.assert_close(avg.input_factor, 0.9 * a.input_factor + 0.1 * b.input_factor)
        torch.testing.assert_close(avg.output_factor, 0.9 * a.output_factor + 0.1 * b.output_factor)
        assert avg.num_samples == a.num_samples + b.num_samples
        assert avg.layout == a.layout


def test_dense_block_algebra():
    blocks = [
        b for b in _blocks("embedding-batchnorm-groupnorm", True) if isinstance(b, DenseBlock)
    ]
    assert blocks
    for block in blocks:
        v = _random_value(block)
        torch.testing.assert_close(_flat(block.matvec(v)), _flat(v) @ block.dense())
        twice = block + 2.0 * block
        torch.testing.assert_close(twice.dense(), 3.0 * block.dense())


def test_blocks_of_different_layers_do_not_combine():
    a, b = _blocks("mlp", True)[:2]
    with pytest.raises(TypeError, match="cannot combine"):
        a + b  # noqa: B018


def test_matvec_rejects_wrong_shapes():
    block = _blocks("mlp", True)[0]
    with pytest.raises(ValueError, match=r"expected tensors shaped"):
        block.matvec(torch.zeros(2, 2, dtype=torch.float64))


# ---------------------------------------------------------------------- expand and reduce
def _jacobian_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``u`` ``[G, N, T, a]``: the weight-row Jacobian of each group's first output channel."""
    weight = layer.weight.detach()
    transposed = getattr(layer, "transposed", False)
    jac = jacrev(lambda w: functional_call(layer, {"weight": w}, (x,)))(weight)
    n, o = jac.shape[:2]
    g = getattr(layer, "groups", 1)
    jac = jac.reshape(n, o, -1, *weight.shape)
    rows = []
    for group in range(g):
        first = group * (o // g)
        if transposed:
            span = slice(group * (weight.shape[0] // g), (group + 1) * (weight.shape[0] // g))
            u = jac[:, first, :, span, 0]
        else:
            u = jac[:, first, :, first]
        rows.append(u.reshape(n, u.shape[1], -1))
    return torch.stack(rows)


REDUCE = ["cnn2d", "cnn2d-grouped", "conv-transpose", "conv-transpose-3d", "cnn1d-grouped"]


def _layer_inputs(
    model: nn.Module, x: torch.Tensor, kinds
) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Every layer of the given kinds with its input, by module name (forward hooks)."""
    seen: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=name: seen.__setitem__(n, (mod, a[0].detach())))
        for name, m in model.named_modules()
        if isinstance(m, kinds)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("problem", REDUCE)
def test_reduce_input_factor_is_the_mean_position(problem):
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == problem), "ce-mean")
    results = compute(model, loss_func, x, y, [KFLR(kfac_approx="reduce")])["KFLRReduce"]
    layers = _layer_inputs(model, x, (nn.modules.conv._ConvNd,))
    assert layers
    for name, (layer, inp) in layers.items():
        u = _jacobian_rows(layer, inp)  # [G, N, T, a]
        mean = u.mean(2)
        expected = torch.einsum("gna,gnb->gab", mean, mean) / mean.shape[1]
        block = results[f"{name}.weight"]
        torch.testing.assert_close(block.input_factor, expected, rtol=1e-8, atol=1e-12)
        bias = results[f"{name}.bias"].output_factor[0]
        g = block.groups
        if g == 1:
            torch.testing.assert_close(block.output_factor[0], bias)
        else:
            o = bias.shape[0] // g
            diag = torch.stack([bias[i * o : (i + 1) * o, i * o : (i + 1) * o] for i in range(g)])
            torch.testing.assert_close(block.output_factor, diag)


def test_reduce_equals_expand_for_one_position():
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == "mlp"), "mse-mean")
    results = compute(model, loss_func, x, y, [KFLR(), KFLR(kfac_approx="reduce")])
    for name, block in results["KFLR"].items():
        torch.testing.assert_close(results["KFLRReduce"][name].dense(), block.dense())


def test_reduce_for_sequences():
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == "sequence"), "ce-mean")
    results = compute(model, loss_func, x, y, [KFLR(kfac_approx="reduce")])["KFLRReduce"]
    checked = 0
    for name, (m, inp) in _layer_inputs(model, x, (nn.Linear,)).items():
        if inp.dim() == 2:
            continue
        mean = inp.reshape(inp.shape[0], -1, m.in_features).mean(1)
        expected = mean.T @ mean / mean.shape[0]
        torch.testing.assert_close(results[f"{name}.weight"].input_factor[0], expected)
        checked += 1
    assert checked


def test_kfac_options_are_validated():
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        KFAC(kfac_approx="average")
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        KFAC(mc_samples=0)


# ------------------------------------------------------------- MC values, not only keys
@pytest.mark.parametrize("problem", ["cnn2d-grouped", "conv-transpose", "cnn1d-grouped"])
def test_kfac_converges_to_kflr_for_grouped_and_transposed(problem):
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == problem), "mse-mean")
    torch.manual_seed(2)
    n = x.shape[0]
    results = compute(
        model, loss_func, x, y, [KFLR(), KFAC(mc_samples=4000)], subsampling=list(range(n))
    )
    for name, exact in results["KFLR"].items():
        mc = results["KFACMC4000"][name]
        if isinstance(exact, DenseBlock):
            continue
        torch.testing.assert_close(mc.input_factor, exact.input_factor)
        err = (mc.output_factor - exact.output_factor).norm() / exact.output_factor.norm()
        assert err < 0.1, (name, float(err))


def test_empirical_kfac_is_the_gradient_outer_product_for_one_sample():
    model, loss_func, x, y = _exact_case(
        nn.Linear(3, 4), [nn.Tanh(), nn.Linear(4, 2)], (1, 3), "ce-mean"
    )
    results = compute(model, loss_func, x, y, [KFACEmpirical()])
    block = results["KFACEmpirical"]["2.weight"]
    g = results.grad["2.weight"].flatten()  # one sample, r = 1: the per-sample gradient
    torch.testing.assert_close(block.dense(), torch.outer(g, g), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
def test_pooled_batches_equal_one_pass(loss):
    model, loss_func, x, y = build(next(p for p in PROBLEMS if p.name == "cnn2d-grouped"), loss)
    whole = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    parts = [
        compute(model, loss_func, x[s], y[s], [KFLR()])["KFLR"]
        for s in (slice(0, 1), slice(1, None))
    ]
    r = 1.0 / x.shape[0] if loss_func.reduction == "mean" else 1.0
    for name, block in whole.items():
        pooled = pool([p[name] for p in parts], r)
        torch.testing.assert_close(pooled.dense(), block.dense(), rtol=1e-10, atol=1e-12, msg=name)
        assert pooled.num_samples == block.num_samples
