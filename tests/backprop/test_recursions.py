"""BL89, HesScale and KFRA (C3): the recursions against dense definitions, and their errors.

Dense float64 references from per-sample Jacobians (``tests/reference.py``); dropout in training
mode with the masks of the recorded call, adaptive average pooling, and KFRA's input factor from
the layers' weight Jacobians.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.backprop import BL89, KFRA, DiagHessian, HesScale, UnsupportedModuleError, compute
from tests import reference
from tests.backprop.problems import LOSSES, make_targets


def _mlp(act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)
    )


def _cnn(act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 3, 2, stride=1),
        act(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


MODELS = {"mlp": (_mlp, (2, 3)), "cnn": (_cnn, (1, 6, 6))}


def _case(model_name: str, act: type[nn.Module], loss: str, seed: int = 0, n: int = 3):
    torch.manual_seed(seed)
    build, shape = MODELS[model_name]
    model = build(act).double()
    loss_func = LOSSES[loss]()
    x = torch.randn(n, *shape, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = make_targets(loss_func, out)
    return model, loss_func, x, y


@pytest.mark.parametrize("quantity", [BL89(), HesScale()])
@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_recursion_reproduced_exactly(model_name, act, loss, quantity):
    model, loss_func, x, y = _case(model_name, act, loss)
    ours = compute(model, loss_func, x, y, [quantity])[quantity.name]
    expected = reference.diagonal_recursion(
        model, loss_func, x, y, exact_last_layer=isinstance(quantity, HesScale)
    )
    actual = torch.cat([v.flatten() for v in ours.values()])
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("quantity", [BL89(), HesScale()])
def test_last_layer_is_exact(quantity):
    model, loss_func, x, y = _case("mlp", nn.Tanh, "ce-mean")
    results = compute(model, loss_func, x, y, [quantity, DiagHessian()])
    torch.testing.assert_close(results[quantity]["5.weight"], results["DiagHessian"]["5.weight"])


def _l1_error(approx: dict, exact: dict) -> float:
    a = torch.cat([v.flatten() for v in approx.values()])
    e = torch.cat([v.flatten() for v in exact.values()])
    return ((a - e).abs().sum() / e.abs().sum()).item()


def test_hesscale_error_report(record_property):
    """Normalized L1 error vs the exact diagonal (HesScale paper, Fig. 2), over 8 seeds.

    HesScale keeps the off-diagonal loss-Hessian terms at the last layer, so on softmax
    cross-entropy it should be more accurate than BL89 on average.
    """
    errors = {"BL89": [], "HesScale": []}
    for seed in range(8):
        model, loss_func, x, y = _case("mlp", nn.Tanh, "ce-mean", seed=seed, n=8)
        results = compute(model, loss_func, x, y, [BL89(), HesScale(), DiagHessian()])
        for name in errors:
            errors[name].append(_l1_error(results[name], results["DiagHessian"]))
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    record_property("normalized_l1_error", mean)
    print(f"normalized L1 error vs exact Hessian diagonal (tanh MLP, CE): {mean}")
    assert mean["HesScale"] < mean["BL89"] < 1.0


# ----------------------------------------------------------------- Dropout in training mode
class _FixedScale(nn.Module):
    """One sample's dropout as the linear map it is: ``x ↦ x ⊙ m / (1 - p)`` for a fixed mask."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _dropout_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(5, 4),
        nn.Sigmoid(),
        nn.Dropout(0.5),
        nn.Linear(4, 3),
        nn.Dropout(0.2),  # above the last layer: HesScale's exact part passes through it
    )


def _record_dropout_scales(model: nn.Sequential) -> dict[int, list[torch.Tensor]]:
    """Hooks that read each dropout call's ``m / (1 - p)`` off its output (zero where dropped)."""
    scales: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Dropout):
            p = layer.p

            def hook(module, args, output, i=i, p=p):
                kept = (output != 0).to(output.dtype)
                scales.setdefault(i, []).append((kept / (1.0 - p)).detach())

            layer.register_forward_hook(hook)
    return scales


def _dense_with_masks(model, scales, loss_func, x, y, exact_last_layer):
    """The recursion's dense definition per sample, each dropout replaced by its fixed mask."""
    r = 1.0 / x.shape[0] if loss_func.reduction == "mean" else 1.0
    total = 0.0
    for n in range(x.shape[0]):
        layers = [
            _FixedScale(scales[i][n]) if isinstance(m, nn.Dropout) else m
            for i, m in enumerate(model)
        ]
        total = total + reference.diagonal_recursion(
            nn.Sequential(*layers), loss_func, x[n : n + 1], y[n : n + 1], exact_last_layer
        )
    return r * total  # one sample: the reference's r is 1


@pytest.mark.parametrize("quantity", [BL89(), HesScale()])
@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_recursion_through_dropout_in_training_mode(loss, quantity):
    """Dropout is the linear map ``diag(m / (1 - p))``: its squared Jacobian scales by 1/(1-p)²."""
    torch.manual_seed(1)
    model = _dropout_mlp().double().train()
    loss_func = LOSSES[loss]()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        y = make_targets(loss_func, model(x))
    scales = _record_dropout_scales(model)
    ours = compute(model, loss_func, x, y, [quantity])[quantity.name]
    assert all(len(calls) == 1 for calls in scales.values())  # the call compute() recorded
    scales = {i: calls[0] for i, calls in scales.items()}
    assert all(0 < (s == 0).sum() < s.numel() for s in scales.values())  # some entries dropped
    expected = _dense_with_masks(
        model, scales, loss_func, x, y, exact_last_layer=isinstance(quantity, HesScale)
    )
    actual = torch.cat([v.flatten() for v in ours.values()])
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------ AdaptiveAvgPool
def _adaptive_1d() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool1d(3), nn.Flatten(), nn.Linear(9, 3)
    )


def _adaptive_2d(output_size: tuple[int, int]) -> nn.Sequential:
    h, w = output_size
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(output_size),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * h * w, 3),
    )


ADAPTIVE = {
    "1d-8to3": (_adaptive_1d, (2, 8)),  # input 6 -> 3: windows of 2
    "2d-4x6to2x3": (lambda: _adaptive_2d((2, 3)), (1, 4, 6)),
    "2d-4x6to1x2": (lambda: _adaptive_2d((1, 2)), (1, 4, 6)),
}
ADAPTIVE_UNEVEN = {  # output sizes that do not divide the input: overlapping windows
    "1d-7to3": (_adaptive_1d, (2, 7)),  # input 5 -> 3
    "2d-4x6to3x4": (lambda: _adaptive_2d((3, 4)), (1, 4, 6)),
}


def _adaptive_case(table: dict, name: str, loss: str, n: int = 3):
    torch.manual_seed(2)
    build, shape = table[name]
    model = build().double()
    loss_func = LOSSES[loss]()
    x = torch.randn(n, *shape, dtype=torch.float64)
    with torch.no_grad():
        y = make_targets(loss_func, model(x))
    return model, loss_func, x, y


@pytest.mark.parametrize("quantity", [BL89(), HesScale()])
@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum"])
@pytest.mark.parametrize("case", list(ADAPTIVE))
def test_recursion_through_adaptive_avg_pool(case, loss, quantity):
    model, loss_func, x, y = _adaptive_case(ADAPTIVE, case, loss)
    ours = compute(model, loss_func, x, y, [quantity])[quantity.name]
    expected = reference.diagonal_recursion(
        model, loss_func, x, y, exact_last_layer=isinstance(quantity, HesScale)
    )
    actual = torch.cat([v.flatten() for v in ours.values()])
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", list(ADAPTIVE_UNEVEN))
def test_recursion_names_uneven_adaptive_avg_pool(case):
    """Uneven windows have no per-output size 1/k; the recursion says so instead of guessing."""
    model, loss_func, x, y = _adaptive_case(ADAPTIVE_UNEVEN, case, "ce-mean")
    name = type(model[2]).__name__
    with pytest.raises(UnsupportedModuleError, match=rf"BL89 .*{name} \(module '2'\).*divide"):
        compute(model, loss_func, x, y, [BL89()])


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum"])
@pytest.mark.parametrize("case", list(ADAPTIVE) + list(ADAPTIVE_UNEVEN))
def test_kfra_through_adaptive_avg_pool(case, loss):
    """KFRA's ``B`` of the conv below the pooling: positions' diagonal blocks of ``Ḡ``."""
    table = ADAPTIVE if case in ADAPTIVE else ADAPTIVE_UNEVEN
    model, loss_func, x, y = _adaptive_case(table, case, loss)
    ours = compute(model, loss_func, x, y, [KFRA()])["KFRA"]
    g = reference.kfra_dense_ggns(model, loss_func, x, y)[0]
    with torch.no_grad():
        c, *positions = model[0](x[:1]).shape[1:]
    t = math.prod(positions)
    expected = torch.einsum("atbt->ab", g.reshape(c, t, c, t))
    torch.testing.assert_close(ours["0.weight"].output_factor[0], expected, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------ KFRA's input factor A
def _weight_rows(layer: nn.Module) -> list[tuple[int, tuple]]:
    """Per group: an output channel of the group and the weight entries that produce it."""
    groups = getattr(layer, "groups", 1)
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return [(0, (0,))]
    if getattr(layer, "transposed", False):  # weight [in, out/G, *k]
        per_in, per_out = weight.shape[0] // groups, weight.shape[1]
        return [(g * per_out, (slice(g * per_in, (g + 1) * per_in), 0)) for g in range(groups)]
    per_out = weight.shape[0] // groups  # weight [out, in/G, *k]
    return [(g * per_out, (g * per_out,)) for g in range(groups)]


def _jacobian_input_factor(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """KFAC-expand's input factor ``[G, a, a]`` read off the weight Jacobian by autograd.

    ``A = (1/(N T)) Σ_{n,t} u uᵀ`` with ``u`` the derivative of one output channel of each group
    at position ``t`` w.r.t. the weight entries that produce that channel (the unfolded input).
    """

    def out(w: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(layer, {"weight": w, "bias": layer.bias}, (x,))
        return y.movedim(-1, 1) if isinstance(layer, nn.Linear) else y  # channels at dim 1

    jac = torch.func.jacrev(out)(layer.weight.detach())  # [N, C, *T, *w]
    n, c = jac.shape[:2]
    jac = jac.reshape(n, c, -1, *layer.weight.shape)
    factors = []
    for channel, rows in _weight_rows(layer):
        u = jac[:, channel][(slice(None), slice(None), *rows)]  # [N, T, *row]
        u = u.reshape(-1, u[0, 0].numel())
        factors.append(u.T @ u / u.shape[0])
    return torch.stack(factors)


def _kfra_models() -> dict[str, tuple[nn.Sequential, tuple[int, ...]]]:
    sequence = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2),
        nn.Sigmoid(),
        nn.Conv2d(2, 3, 2, stride=2),
        nn.Flatten(),
        nn.Linear(12, 3),
    )
    return {"sequence": (sequence, (2, 3)), "cnn": (cnn, (2, 4, 4))}


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("model_name", ["sequence", "cnn"])
def test_kfra_input_factor_from_weight_jacobian(model_name, loss):
    torch.manual_seed(3)
    model, shape = _kfra_models()[model_name]
    model = model.double()
    loss_func = LOSSES[loss]()
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        y = make_targets(loss_func, model(x))
    ours = compute(model, loss_func, x, y, [KFRA()])["KFRA"]
    layers = [i for i, m in enumerate(model) if any(True for _ in m.parameters())]
    actual, expected = [], []
    for i in layers:
        with torch.no_grad():
            inputs = model[:i](x)
        actual.append(ours[f"{i}.weight"].input_factor.flatten())
        expected.append(_jacobian_input_factor(model[i], inputs).flatten())
    torch.testing.assert_close(torch.cat(actual), torch.cat(expected), rtol=1e-8, atol=1e-12)
