"""Models converted by ``curvlab.nn.memsave`` keep the fast per-layer rules and every result.

The memory-saving layers override ``forward`` (same function, different autograd graph), which the
rule lookup accepts because they are declared in ``rules.SAME_FORWARD``. For models with frozen
parameters (fine-tuning), every quantity of the converted model must equal the stock model's to
float64 round-off, and no ``GenericPathWarning`` may be raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from curvlab.backprop import (
    BL89,
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGN,
    BatchGrad,
    BatchL2,
    DiagGGN,
    DiagHessian,
    HesScale,
    SumGradSquared,
    Variance,
    compute,
)
from curvlab.backprop.errors import GenericPathWarning, UnsupportedModuleError
from curvlab.backprop.hessian import FUNCTION_KINDS, graph_obstacle
from curvlab.backprop.kron import DenseBlock, KronFactors
from curvlab.backprop.recording import _WARNED
from curvlab.backprop.rules import RULES, SAME_FORWARD, Call, find_rule
from curvlab.backprop.rules.activation import ACTIVATION_RULES, AUTOGRAD, find_activation_rule
from curvlab.nn import memsave
from tests.backprop.problems import LOSSES, make_targets


class NormNet(nn.Module):
    """BitFit-style LayerNorm on the input, frozen conv stem, BatchNorm2d (eval), residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm([4, 4])
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(self.norm(x))
        h = h + self.conv(self.relu(self.bn(h)))
        return self.head(self.pool(h).flatten(1))


def _norm_net() -> tuple[nn.Module, tuple[int, ...]]:
    model = NormNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    for p in (model.norm.weight, model.stem.weight, model.bn.weight):
        p.requires_grad_(False)
    return model, (2, 4, 4)


def _cnn2d() -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),  # weight frozen, bias trains
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 3, 2),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(12, 4),  # frozen
        nn.ReLU(),
        nn.Linear(4, 3),
    )
    model[0].weight.requires_grad_(False)
    model[7].requires_grad_(False)
    return model, (1, 6, 6)


def _cnn1d() -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(3, 4, 2, stride=2),  # frozen, between trainable layers
        nn.ReLU(),
        nn.MaxPool1d(2, stride=1),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    model[2].requires_grad_(False)
    return model, (2, 6)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "norm-net": _norm_net,
    "cnn2d": _cnn2d,
    "cnn1d": _cnn1d,
}

# (builder, dropout in training mode)
CASES = {
    "norm-net": ("norm-net", False),
    "cnn2d": ("cnn2d", False),
    "cnn2d-dropout-train": ("cnn2d", True),
    "cnn1d": ("cnn1d", False),
    "cnn1d-dropout-train": ("cnn1d", True),
}

COMMON = [
    BatchGrad(),
    BatchL2(),
    SumGradSquared(),
    Variance(),
    DiagGGN(),
    DiagGGN(mc_samples=2),
    BatchDiagGGN(),
    KFAC(),
    KFLR(),
    KFLR(separate_weight_and_bias=False),
    DiagHessian(),
]
RECURSIONS = [BL89(), HesScale(), KFRA()]


def _quantity_cases() -> list:
    params = []
    for case, (builder, train) in CASES.items():
        quantities = list(COMMON)
        if builder != "norm-net":  # an nn.Sequential with Linear and Conv parameters only
            quantities += [q for q in RECURSIONS if not (train and isinstance(q, KFRA))]
        params += [pytest.param(case, q, id=f"{case}-{q.name}") for q in quantities]
    return params


def _models(case: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor, nn.Module]:
    """Stock model, its memsave conversion (a deep copy), inputs, targets, loss."""
    builder, train = CASES[case]
    torch.manual_seed(0)
    model, shape = BUILDERS[builder]()
    model = model.double().train(train)
    for module in model.modules():  # batch norm always in eval mode
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    x = torch.randn(4, *shape, dtype=torch.float64)
    loss_func = LOSSES["ce-mean"]()
    with torch.no_grad():
        y = make_targets(loss_func, model(x))
    converted = memsave.convert(model, inplace=False)
    return model, converted, x, y, loss_func


def _flat(value: object) -> Tensor:
    if isinstance(value, (KronFactors, DenseBlock)):
        return value.dense().flatten()
    assert isinstance(value, Tensor)
    return value.flatten()


def _run(model: nn.Module, loss_func: nn.Module, x: Tensor, y: Tensor, quantity, **kwargs):
    torch.manual_seed(1)  # the same dropout masks and MC samples in both runs
    return compute(model, loss_func, x, y, [quantity], **kwargs)[quantity.name]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Generic-path warnings are one-time per class: forget earlier ones so they are seen here."""
    saved = set(_WARNED)
    _WARNED.clear()
    yield
    _WARNED.clear()
    _WARNED.update(saved)


def test_cases_are_converted():
    """Every case contains memsave layers of each kind it uses (convert did swap them)."""
    for case in CASES:
        _, converted, _, _, _ = _models(case)
        kinds = {type(m) for m in converted.modules()}
        stock_kinds = {SAME_FORWARD[k] for k in kinds if k in SAME_FORWARD}
        assert stock_kinds & {nn.Conv1d, nn.Conv2d} and nn.ReLU in stock_kinds, case


@pytest.mark.parametrize(("case", "quantity"), _quantity_cases())
def test_converted_model_equals_stock(case, quantity):
    model, converted, x, y, loss_func = _models(case)
    expected = _run(model, loss_func, x, y, quantity)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)
        actual = _run(converted, loss_func, x, y, quantity)
    assert list(actual) == list(expected)
    torch.testing.assert_close(
        torch.cat([_flat(v) for v in actual.values()]),
        torch.cat([_flat(v) for v in expected.values()]),
        rtol=1e-10,
        atol=1e-13,
    )


@pytest.mark.parametrize("case", ["norm-net", "cnn2d-dropout-train"])
def test_converted_model_equals_stock_on_the_general_path(case):
    """Subsampling takes the general path (one batched backward through memsave's nodes)."""
    model, converted, x, y, loss_func = _models(case)
    quantity = DiagGGN()
    expected = _run(model, loss_func, x, y, quantity, subsampling=[0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)
        actual = _run(converted, loss_func, x, y, quantity, subsampling=[0, 2])
    torch.testing.assert_close(
        torch.cat([v.flatten() for v in actual.values()]),
        torch.cat([v.flatten() for v in expected.values()]),
        rtol=1e-10,
        atol=1e-13,
    )


def _stock_layer(cls: type[nn.Module]) -> nn.Module:
    if issubclass(cls, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd)):
        return cls(1, 1, 1) if issubclass(cls, nn.modules.conv._ConvNd) else cls(1)
    if issubclass(cls, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
        return cls(1)
    return cls()


@pytest.mark.parametrize("stock_cls", list(memsave.MEMSAVE_CLASSES), ids=lambda c: c.__name__)
def test_memsave_layer_gets_the_stock_rule(stock_cls):
    stock = _stock_layer(stock_cls)
    converted = memsave.convert(stock, inplace=False)
    assert type(converted) is memsave.MEMSAVE_CLASSES[stock_cls]
    assert find_rule(converted) is find_rule(stock)


class _OwnForward(nn.Conv2d):
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input).square()


class _OwnMemSaveForward(memsave.MemSaveConv2d):
    def forward(self, input: Tensor) -> Tensor:
        return 2.0 * super().forward(input)


class _InheritsMemSave(memsave.MemSaveConv2d):
    pass


@pytest.mark.parametrize(
    ("cls", "has_rule"),
    [(_OwnForward, False), (_OwnMemSaveForward, False), (_InheritsMemSave, True)],
    ids=["conv-subclass-forward", "memsave-subclass-forward", "memsave-subclass-inherits"],
)
def test_only_declared_forwards_keep_the_rule(cls, has_rule):
    """A subclass overriding ``forward`` may compute anything: generic, unless declared."""
    assert (find_rule(cls(1, 1, 1)) is RULES[nn.Conv2d]) is has_rule


def test_user_subclass_overriding_forward_still_warns():
    torch.manual_seed(0)
    model = nn.Sequential(_OwnMemSaveForward(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)).double()
    x, y = torch.randn(3, 1, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    with pytest.warns(GenericPathWarning, match="_OwnMemSaveForward"):
        compute(model, nn.CrossEntropyLoss(), x, y, [DiagGGN()])


def test_declaring_a_non_subclass_is_rejected(monkeypatch):
    monkeypatch.setitem(SAME_FORWARD, _OwnForward, nn.Linear)
    with pytest.raises(TypeError, match="_OwnForward must subclass Linear"):
        find_rule(_OwnForward(1, 1, 1))


def test_every_memsave_function_has_a_hessian_kind():
    """A new memsave autograd Function must be declared linear or bilinear for DiagHessian."""
    functions = [
        obj
        for obj in vars(memsave).values()
        if isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
    ]
    assert functions and all(f in FUNCTION_KINDS for f in functions)


class AddSquare(torch.autograd.Function):
    """A custom Function with a nonzero second derivative, named like a linear op ("Add...")."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2.0 * x * grad_output


def test_unregistered_custom_function_is_a_hessian_obstacle():
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    hidden = linear(x)
    output = AddSquare.apply(hidden)
    call = Call(args=(x,), outputs=(hidden,), input_nodes=[None])
    obstacle = graph_obstacle(output, [("lin", linear, call, True)], [])
    assert obstacle is not None and "AddSquareBackward" in obstacle


@pytest.mark.parametrize("case", ["norm-net", "cnn2d", "cnn1d-dropout-train"])
@pytest.mark.parametrize("quantity", [BatchGrad(), DiagGGN()], ids=lambda q: q.name)
def test_func_method_on_converted_model_equals_stock(case, quantity):
    """memsave's autograd Functions vmap (``generate_vmap_rule``): the torch.func path runs."""
    model, converted, x, y, loss_func = _models(case)
    expected = _run(model, loss_func, x, y, quantity, method="func")
    actual = _run(converted, loss_func, x, y, quantity, method="func")
    torch.testing.assert_close(
        torch.cat([v.flatten() for v in actual.values()]),
        torch.cat([v.flatten() for v in expected.values()]),
        rtol=1e-10,
        atol=1e-13,
    )


def test_func_hessian_on_converted_model_names_the_layer_and_the_way_out():
    """Hessians by torch.func need forward mode, which memsave's Functions cannot provide."""
    _, converted, x, y, loss_func = _models("cnn2d")
    with pytest.raises(UnsupportedModuleError, match=r"MemSaveConv.*memsave\.revert\(model"):
        _run(converted, loss_func, x, y, DiagHessian(), method="func")


class _OwnReLU(nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * 2.0


@pytest.mark.parametrize(
    ("module", "registered"),
    [
        (memsave.MemSaveReLU(), nn.ReLU),  # a declared equivalent forward
        (nn.ReLU6(), nn.ReLU6),  # inherits Hardtanh.forward, registered itself
        (_OwnReLU(), None),  # overrides forward: derivatives by autograd
    ],
    ids=["memsave-relu", "relu6", "relu-subclass-forward"],
)
def test_activation_lookup_shares_the_same_forward_check(module, registered):
    expected = AUTOGRAD if registered is None else ACTIVATION_RULES[registered]
    assert find_activation_rule(module) is expected
