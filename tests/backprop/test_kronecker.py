"""KFLR / KFAC factors against definitions built from dense float64 references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvlab.backprop import (
    KFAC,
    KFLR,
    KFRA,
    DenseBlock,
    GenericPathWarning,
    UnsupportedModuleError,
    compute,
)
from tests import reference
from tests.backprop.problems import LOSSES, PROBLEMS, build, generic_attention, make_targets

SEQUENTIAL = ["mlp", "mlp-activations", "cnn2d", "cnn3d", "conv-transpose-3d", "cnn2d-grouped"]
LAYERS = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)


def _layers(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, LAYERS)]


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def _input_factor(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A = mean over samples and positions of u u^T, u read off the weight Jacobian.

    ``u`` at output position ``t`` is the derivative of output channel ``o`` (the first of its
    group) w.r.t. the row of the weight matrix that produces ``o``: ``weight[o]`` for
    ``Linear``/``Conv``, ``weight[:, o]`` (channels of the group) for ``ConvTranspose``.
    Returns ``[in*K, in*K]``, or ``[G, in/G*K, in/G*K]`` for a grouped layer.
    """
    weight = layer.weight.detach()
    transposed = getattr(layer, "transposed", False)

    def out(w):
        return functional_call(layer, {"weight": w}, (x,))

    jac = jacrev(out)(weight)  # [N, O, *T, *w]
    n, o = jac.shape[:2]
    g = _groups(layer)
    jac = jac.reshape(n, o, -1, *weight.shape)
    factors = []
    for group in range(g):
        first = group * (o // g)
        if transposed:  # weight [in, out/G, *K]: row of output channel `first`
            rows = slice(group * (weight.shape[0] // g), (group + 1) * (weight.shape[0] // g))
            u = jac[:, first, :, rows, 0]
        else:  # weight [out, in/G, *K]
            u = jac[:, first, :, first]
        u = u.reshape(-1, u[0, 0].numel())  # [N*T, in/G*K]
        factors.append(u.T @ u / u.shape[0])
    return factors[0] if g == 1 else torch.stack(factors)


def _grouped(b: torch.Tensor, groups: int) -> torch.Tensor:
    """Diagonal blocks ``[G, out/G, out/G]`` of an output factor (itself for one group)."""
    if groups == 1:
        return b
    o = b.shape[0] // groups
    return torch.stack([b[i * o : (i + 1) * o, i * o : (i + 1) * o] for i in range(groups)])


def _output_factor(model: nn.Sequential, k: int, loss_func, x, y) -> torch.Tensor:
    """B = sum over samples and positions of the diagonal blocks of the GGN w.r.t. z_k."""
    z = model[: k + 1](x).detach()
    g = reference.ggn_wrt_intermediate(model[k + 1 :], loss_func, z, y)
    n, o = z.shape[:2]
    t = z[0, 0].numel()
    g = g.reshape(n, o, t, n, o, t)
    return torch.einsum("natnbt->ab", g)


def _factors(block) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a Kronecker block, without the group dimension when there is one group."""
    a, b = block.input_factor, block.output_factor
    return (a[0], b[0]) if block.groups == 1 else (a, b)


def _pairs(results: dict) -> list[torch.Tensor]:
    return [t for block in results.values() for t in _factors(block)]


def _case(problem: str, loss: str):
    return build(next(p for p in PROBLEMS if p.name == problem), loss)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("problem", SEQUENTIAL)
def test_kflr_output_factor(problem, loss):
    model, loss_func, x, y = _case(problem, loss)
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    actual = torch.cat([_factors(ours[f"{k}.weight"])[1].flatten() for k in _layers(model)])
    expected = torch.cat(
        [
            _grouped(_output_factor(model, k, loss_func, x, y), _groups(model[k])).flatten()
            for k in _layers(model)
        ]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("problem", SEQUENTIAL)
def test_kflr_input_factor(problem):
    model, loss_func, x, y = _case(problem, "ce-mean")
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    actual = torch.cat([_factors(ours[f"{k}.weight"])[0].flatten() for k in _layers(model)])
    expected = torch.cat(
        [_input_factor(model[k], model[:k](x).detach()).flatten() for k in _layers(model)]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


def _sequence_mlp_data(n: int = 3, t: int = 4):
    """Linear layers applied to sequences ``[N, T, D]`` (a weight shared over T positions)."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(2 * t, 3)
    ).double()
    x = torch.randn(n, t, 3, dtype=torch.float64)
    loss_func = LOSSES["ce-mean"]()
    return model, loss_func, x, make_targets(loss_func, model(x).detach())


@pytest.mark.parametrize("quantity", [KFLR(), KFAC()], ids=lambda q: q.name)
def test_input_factor_of_linear_on_sequences(quantity):
    """A of a Linear on ``[N, T, D]`` is the mean over all N*T rows of the recorded inputs."""
    model, loss_func, x, y = _sequence_mlp_data()
    ours = compute(model, loss_func, x, y, [quantity])[quantity.name]
    actual, expected = [], []
    for k in (0, 2):
        rows = model[:k](x).detach().reshape(-1, model[k].in_features)  # [N*T, in]
        expected.append((rows.T @ rows / rows.shape[0]).flatten())
        actual.append(_factors(ours[f"{k}.weight"])[0].flatten())
    torch.testing.assert_close(torch.cat(actual), torch.cat(expected), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_kflr_bias_factor_is_output_factor(loss):
    model, loss_func, x, y = _case("mlp", loss)
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    for k in (0, 2):  # one position: the bias's exact block is the weight's output factor
        assert torch.equal(_factors(ours[f"{k}.bias"])[1], _factors(ours[f"{k}.weight"])[1])
        assert torch.equal(_factors(ours[f"{k}.bias"])[0], torch.ones(1, 1, dtype=torch.float64))


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum"])
def test_grouped_conv_weight_output_factor_is_grouped_expand_factor(loss):
    model, loss_func, x, y = _case("cnn2d-grouped", loss)
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    expand = _output_factor(model, 0, loss_func, x, y)
    torch.testing.assert_close(_factors(ours["0.weight"])[1], _grouped(expand, 2))


BIAS_CASES = [
    ("cnn2d", "ce-mean"),
    ("cnn2d-grouped", "mse-sum"),
    ("cnn3d", "bce-mean"),
    ("conv-transpose", "ce-mean"),
    ("conv-transpose-3d", "mse-mean"),
    ("sequence", "ce-mean"),
    ("mlp", "mse-mean"),
]


@pytest.mark.parametrize(("problem", "loss"), BIAS_CASES)
def test_bias_gets_its_exact_ggn_block(problem, loss):
    """A bias shared over positions (conv, sequence) gets its exact GGN block, not an approximation."""
    model, loss_func, x, y = _case(problem, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        ours = compute(model, loss_func, x, y, [KFLR(), KFLR(kfac_approx="reduce")])
    ggn = reference.ggn(model, loss_func, x, y)
    start, checked = 0, 0
    for name, param in model.named_parameters():
        size = param.numel()
        if name.endswith("bias") and name in ours["KFLR"]:
            exact = ggn[start : start + size, start : start + size]
            for key in ("KFLR", "KFLRReduce"):
                block = ours[key][name]
                if isinstance(block, DenseBlock):
                    continue
                torch.testing.assert_close(block.dense(), exact, rtol=1e-8, atol=1e-12, msg=name)
                checked += 1
        start += size
    assert checked >= 2


@pytest.mark.parametrize("loss", ["mse-sum", "ce-mean", "bce-mean"])
def test_conv_transpose_kronecker_order(loss):
    """One sample, one output pixel: torch.kron(B, A) is the GGN block of W viewed [out, in*K]."""
    torch.manual_seed(3)
    layer = nn.ConvTranspose2d(2, 3, 1)
    model = nn.Sequential(layer, nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(1, 2, 1, 1, dtype=torch.float64)
    loss_func = LOSSES[loss]()
    y = make_targets(loss_func, model(x).detach())
    a, b = _factors(compute(model, loss_func, x, y, [KFLR()])["KFLR"]["0.weight"])
    block = reference.ggn(model, loss_func, x, y)[:6, :6]  # row-major over W [in, out]
    order = torch.arange(6).reshape(2, 3).T.flatten()  # row-major over W^T [out, in]
    torch.testing.assert_close(torch.kron(b, a), block[order][:, order], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_generic_module_gets_its_whole_ggn_block(loss):
    """Modules without a Kronecker rule (attention, layer norm): (B,) is the exact GGN block."""
    model, loss_func, x, y = generic_attention(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    ggn = reference.ggn(model, loss_func, x, y)
    start = 0
    for name, param in model.named_parameters():
        size = param.numel()
        block = ggn[start : start + size, start : start + size]
        start += size
        if name.startswith("head."):
            continue
        assert isinstance(ours[name], DenseBlock)
        torch.testing.assert_close(ours[name].dense(), block, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_kflr_is_exact_ggn_block_for_one_sample(loss):
    """Kronecker order: for N = 1, torch.kron(B, A) is the weight's GGN block (row-major)."""
    model, loss_func, x, y = _case("mlp", loss)
    x, y = x[:1], y[:1]
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    ggn = reference.ggn(model, loss_func, x, y)
    a, b = _factors(ours["2.weight"])
    start = sum(p.numel() for p in list(model.parameters())[:2])
    block = ggn[start : start + 12, start : start + 12]
    torch.testing.assert_close(torch.kron(b, a), block, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_kfac_converges_to_kflr(loss):
    model, loss_func, x, y = _case("mlp", loss)
    torch.manual_seed(1)
    results = compute(model, loss_func, x, y, [KFLR(), KFAC(mc_samples=20_000)])
    mc = torch.cat(
        [_factors(results["KFACMC20000"][k])[1].flatten() for k in ("0.weight", "2.weight")]
    )
    exact = torch.cat([_factors(results["KFLR"][k])[1].flatten() for k in ("0.weight", "2.weight")])
    assert (mc - exact).norm() / exact.norm() < 0.05


def _sigmoid_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def _mlp_data(loss: str, n: int):
    torch.manual_seed(4)
    model = _sigmoid_mlp()
    loss_func = LOSSES[loss]()
    x = torch.randn(n, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = make_targets(loss_func, out)
    return model, loss_func, x, y


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "ce-smooth", "bce-mean"])
def test_kfra_matches_batch_averaged_recursion(loss):
    model, loss_func, x, y = _mlp_data(loss, 5)
    ours = compute(model, loss_func, x, y, [KFRA()])["KFRA"]
    expected = reference.kfra_output_factors(model, loss_func, x, y)
    actual = torch.cat([_factors(ours[f"{k}.weight"])[1].flatten() for k in sorted(expected)])
    dense = torch.cat([expected[k].flatten() for k in sorted(expected)])
    torch.testing.assert_close(actual, dense, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse-sum", "ce-mean"])
def test_kfra_equals_kflr_for_one_sample(loss):
    """With N = 1 the batch averages are exact, so KFRA and KFLR agree on every layer."""
    model, loss_func, x, y = _mlp_data(loss, 1)
    results = compute(model, loss_func, x, y, [KFRA(), KFLR()])
    kfra = torch.cat([t.flatten() for t in _pairs(results["KFRA"])])
    kflr = torch.cat([t.flatten() for t in _pairs(results["KFLR"])])
    torch.testing.assert_close(kfra, kflr, rtol=1e-8, atol=1e-12)


def test_kfra_keys_follow_named_parameters():
    model, loss_func, x, y = _mlp_data("ce-mean", 3)
    ours = compute(model, loss_func, x, y, [KFRA()])["KFRA"]
    assert list(ours) == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum"])
def test_embedding_kronecker_order(loss):
    """One sample, one token: torch.kron(A, B) is the embedding's GGN block (row-major [V, D])."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(4, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.tensor([[2]])
    loss_func = LOSSES[loss]()
    y = torch.tensor([1]) if "ce" in loss else torch.randn(1, 2, dtype=torch.float64)
    a, b = _factors(compute(model, loss_func, x, y, [KFLR()])["KFLR"]["0.weight"])
    block = reference.ggn(model, loss_func, x, y)[:12, :12]
    torch.testing.assert_close(torch.kron(a, b), block, rtol=1e-8, atol=1e-12)


def _kfra_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.ConvTranspose2d(2, 2, 2, groups=2),
        nn.Sigmoid(),
        nn.Conv2d(2, 4, 2, groups=2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def _kfra_cnn_data(loss: str, n: int):
    torch.manual_seed(5)
    model = _kfra_cnn()
    loss_func = LOSSES[loss]()
    x = torch.randn(n, 1, 4, 4, dtype=torch.float64)
    y = make_targets(loss_func, model(x).detach())
    return model, loss_func, x, y


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_kfra_through_convolutions_and_pooling(loss):
    """B of Conv/ConvTranspose layers: positions' diagonal blocks of the batch-averaged GGN."""
    model, loss_func, x, y = _kfra_cnn_data(loss, 4)
    results = compute(model, loss_func, x, y, [KFRA(), KFLR()])
    ggns = reference.kfra_dense_ggns(model, loss_func, x, y)
    for k in (0, 3, 5, 8):
        layer = model[k]
        with torch.no_grad():
            out_shape = model[: k + 1](x[:1]).shape[1:]
        g = ggns[k]
        if isinstance(layer, nn.Linear):
            b = b_bias = g
        else:
            c, t = out_shape[0], math.prod(out_shape[1:])
            b = torch.einsum("atbt->ab", g.reshape(c, t, c, t))
            b_bias = torch.einsum("atbs->ab", g.reshape(c, t, c, t))  # every position pair
        a_kfra, b_kfra = _factors(results["KFRA"][f"{k}.weight"])
        torch.testing.assert_close(b_kfra, _grouped(b, _groups(layer)), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(a_kfra, _factors(results["KFLR"][f"{k}.weight"])[0])
        bias = _factors(results["KFRA"][f"{k}.bias"])[1]
        torch.testing.assert_close(bias, b_bias, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse-sum", "ce-mean"])
def test_kfra_equals_kflr_for_one_sample_in_a_cnn(loss):
    model, loss_func, x, y = _kfra_cnn_data(loss, 1)
    results = compute(model, loss_func, x, y, [KFRA(), KFLR()])
    for name in results["KFLR"]:
        pairs = zip(_factors(results["KFRA"][name]), _factors(results["KFLR"][name]), strict=True)
        for ours, exact in pairs:
            torch.testing.assert_close(ours, exact, rtol=1e-8, atol=1e-12, msg=name)


def test_kfra_names_too_large_activation(monkeypatch):
    from curvlab.backprop import recursions

    model, loss_func, x, y = _kfra_cnn_data("ce-mean", 2)
    monkeypatch.setattr(recursions, "KFRA_MAX_FEATURES", 16)
    with pytest.raises(UnsupportedModuleError, match=r"Conv2d \(module '5'\).*18 features"):
        compute(model, loss_func, x, y, [KFRA()])
