"""The streamed path (quantities reduced inside the backward pass) against the general path.

``subsampling=range(N)`` selects every sample but forces the general path (all output
gradients first, then the rules), so the two must agree to float64 round-off.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch import Tensor, nn

from curvlab.backprop import (
    GGNMP,
    KFAC,
    KFLR,
    BatchDiagGGN,
    BatchGrad,
    BatchL2,
    DenseBlock,
    DiagGGN,
    KronFactors,
    SqrtGGN,
    SumGradSquared,
    UnsupportedModuleError,
    Variance,
    capturing,
    compute,
    general,
    streamed,
)
from curvlab.backprop.rules.conv import ConvRule
from curvlab.backprop.rules.linear import LinearRule
from tests import reference
from tests.backprop.problems import PROBLEMS, build

FIRST_ORDER = [BatchGrad, BatchL2, SumGradSquared, Variance]
MC = [
    lambda: DiagGGN(mc_samples=1),
    lambda: DiagGGN(mc_samples=3),
    lambda: BatchDiagGGN(mc_samples=1),
    lambda: SqrtGGN(mc_samples=2),
    lambda: KFAC(),
    lambda: KFAC(mc_samples=2),
]
EXACT = [DiagGGN, BatchDiagGGN, SqrtGGN, KFLR]
STREAMED = [
    ("mlp", "mse-mean"),
    ("mlp", "ce-sum"),
    ("mlp-activations", "ce-mean"),
    ("cnn2d", "ce-mean"),
    ("cnn1d-grouped", "bce-mean"),
    ("cnn3d", "mse-sum"),
    ("pooling", "ce-smooth"),
    ("residual-conv-batchnorm", "ce-mean"),
    ("layernorm-mlp", "mse-mean"),
    ("embedding-batchnorm-groupnorm", "ce-mean"),
    ("sequence", "ce-mean"),
    ("conv-transpose", "ce-mean"),
    ("conv-transpose-3d", "mse-mean"),
    ("cnn2d-grouped", "bce-sum"),
]


def _problem(name: str):
    return next(p for p in PROBLEMS if p.name == name)


class _Spy:
    """Counts passes on the streamed path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        spy = self

        class Counting(streamed.StreamedPass):
            def __init__(self, *args, **kwargs):
                spy.calls += 1
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(capturing, "StreamedPass", Counting)


def _both(model, loss_func, x, y, make, seed: int = 5):
    """Streamed and general results of the same quantity (same MC samples)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = make()
        stream = compute(model, loss_func, x, y, [q], generator=torch.Generator().manual_seed(seed))
        general_ = compute(
            model,
            loss_func,
            x,
            y,
            [make()],
            subsampling=list(range(x.shape[0])),
            generator=torch.Generator().manual_seed(seed),
        )
    return stream, general_, q


def _assert_close(a, b) -> None:
    if isinstance(a, (KronFactors, DenseBlock)):
        assert type(a) is type(b) and a.names == b.names
        torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-10, atol=1e-12)
        if isinstance(a, KronFactors):
            _assert_close((a.input_factor, a.output_factor), (b.input_factor, b.output_factor))
        return
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_close(u, v)
        return
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("problem", "loss"), STREAMED)
@pytest.mark.parametrize("make", FIRST_ORDER + MC + EXACT)
def test_streamed_equals_general_path(problem, loss, make, monkeypatch):
    spy = _Spy(monkeypatch)
    model, loss_func, x, y = build(_problem(problem), loss)
    streamed, general, q = _both(model, loss_func, x, y, make)
    assert spy.calls == 1
    torch.testing.assert_close(streamed.loss, general.loss, rtol=1e-12, atol=1e-12)
    for name in general.grad:
        torch.testing.assert_close(streamed.grad[name], general.grad[name])
    assert streamed[q.name].keys() == general[q.name].keys()
    for name, value in general[q.name].items():
        _assert_close(streamed[q.name][name], value)


def test_streamed_ggn_product_mc(monkeypatch):
    spy = _Spy(monkeypatch)
    model, loss_func, x, y = build(_problem("cnn2d"), "ce-mean")
    streamed, general, q = _both(model, loss_func, x, y, lambda: GGNMP(mc_samples=2))
    assert spy.calls == 1
    for name, p in model.named_parameters():
        v = torch.randn(3, *p.shape, dtype=p.dtype)
        torch.testing.assert_close(streamed[q.name][name](v), general[q.name][name](v))


@pytest.mark.parametrize(
    "makes",
    [
        [SumGradSquared, Variance],  # one shared partial: Variance must not overwrite it
        [Variance, SumGradSquared, BatchL2],
        [BatchGrad, Variance, SumGradSquared, BatchL2],  # the factor, not the values, rescaled
    ],
)
@pytest.mark.parametrize(("problem", "loss"), [("mlp", "ce-mean"), ("cnn2d", "mse-mean")])
def test_quantities_requested_together_equal_each_alone(makes, problem, loss, monkeypatch):
    spy = _Spy(monkeypatch)
    model, loss_func, x, y = build(_problem(problem), loss)
    together = compute(model, loss_func, x, y, [make() for make in makes])
    general = compute(
        model, loss_func, x, y, [make() for make in makes], subsampling=list(range(x.shape[0]))
    )
    assert spy.calls == 1
    for make in makes:
        alone = compute(model, loss_func, x, y, [make()])
        name = make().name
        for param, value in alone[name].items():
            _assert_close(together[name][param], value)
            _assert_close(general[name][param], value)


class _Scale(nn.Module):
    """A module without a rule (the generic path)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def _generic_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Scale(4), nn.Tanh(), nn.Linear(4, 2)).double()
    return (
        model,
        nn.CrossEntropyLoss(),
        torch.randn(5, 3, dtype=torch.float64),
        torch.randint(0, 2, (5,)),
    )


def test_shared_and_generic_modules_use_the_general_path(monkeypatch):
    spy = _Spy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, loss_func, x, y = build(_problem("residual-shared"), "ce-mean")
        compute(model, loss_func, x, y, [BatchL2()])
        compute(*_generic_problem(), [BatchL2()])
    assert spy.calls == 0


def test_attention_has_a_rule_and_streams(monkeypatch):
    spy = _Spy(monkeypatch)
    model, loss_func, x, y = build(_problem("attention-layernorm"), "ce-mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute(model, loss_func, x, y, [BatchL2(), KFAC()][:1])
    assert spy.calls == 1


class _Branches(nn.Module):
    """Two parallel input branches (two sinks), modules that the loss does not see."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Conv1d(1, 2, 3)
        self.unused = nn.Linear(5, 2)
        self.head = nn.Linear(4 + 2 * 3, 3)
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        self.unused(x)  # called, but the loss does not depend on it
        h = torch.cat([torch.tanh(self.a(x)), self.b(x[:, None, :5]).flatten(1)], dim=1)
        return self.head(h)


@pytest.mark.parametrize("make", FIRST_ORDER + MC + EXACT)
def test_streamed_branches_and_unreached_modules(make, monkeypatch):
    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    model = _Branches().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    streamed, general, q = _both(model, nn.CrossEntropyLoss(), x, y, make)
    assert spy.calls == 1
    assert streamed[q.name].keys() == general[q.name].keys()
    for name, value in general[q.name].items():
        _assert_close(streamed[q.name][name], value)
    value = streamed[q.name]["unused.weight"]
    if isinstance(value, KronFactors):
        value = value.output_factor
    assert not value.any()


def test_sinks_are_the_earliest_outputs():
    torch.manual_seed(0)
    a, b, c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
    x = torch.randn(2, 3)
    za = a(x)
    zb = b(torch.relu(za))
    zc = c(x)  # a second branch from the input
    sinks = streamed.sinks([za, zb, zc])
    assert [id(s) for s in sinks] == [id(za), id(zc)]


def _track_factors(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Per evaluation, how many factors of *earlier* modules are still alive."""
    seen: list[weakref.ref] = []
    alive: list[int] = []
    original = streamed.ParamDerivatives

    class Tracking(original):
        def __init__(self, name, uses, factors, *args, **kwargs):
            super().__init__(name, uses, factors, *args, **kwargs)
            mine = {call for owner, _ in uses for call in owner.calls}
            current = [
                t for per in factors.values() for k, fs in per.items() if k in mine for t in fs
            ]
            others = [w() for w in seen]
            alive.append(
                sum(1 for t in others if t is not None and all(t is not c for c in current))
            )
            for t in current:
                if all(w() is not t for w in seen):
                    seen.append(weakref.ref(t))

    monkeypatch.setattr(streamed, "ParamDerivatives", Tracking)
    monkeypatch.setattr(general, "ParamDerivatives", Tracking)
    return alive


def _deep_mlp():
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    for _ in range(4):
        layers += [nn.ReLU(), nn.Linear(8, 8)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(8, 3)).double()
    return model, torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))


@pytest.mark.parametrize(
    "make", [BatchL2, SumGradSquared, Variance, lambda: DiagGGN(mc_samples=1), KFAC]
)
def test_streamed_path_frees_each_factor(make, monkeypatch):
    """No list of output gradients: a module's factor is gone when the next one arrives."""
    monkeypatch.setattr(streamed, "BATCHED_COLUMNS_ELEMENTS", 0)  # the per-column loop
    alive = _track_factors(monkeypatch)
    model, x, y = _deep_mlp()
    compute(model, nn.CrossEntropyLoss(), x, y, [make()])
    assert len(alive) >= 6
    assert max(alive) == 0


def test_general_path_keeps_factors(monkeypatch):
    """The check above detects kept factors (the general path holds them all)."""
    alive = _track_factors(monkeypatch)
    model, x, y = _deep_mlp()
    compute(model, nn.CrossEntropyLoss(), x, y, [BatchL2()], subsampling=list(range(16)))
    assert max(alive) > 0


@pytest.mark.parametrize(
    "make", [BatchL2, SumGradSquared, Variance, lambda: DiagGGN(mc_samples=1), KFAC]
)
def test_reductions_never_form_per_sample_gradients(make, monkeypatch):
    """Linear and Conv reductions use factored forms, never the ``[N, P]`` ``jac_t``."""

    def forbidden(*args, **kwargs):
        raise AssertionError("per-sample gradients formed")

    monkeypatch.setattr(LinearRule, "jac_t", forbidden)
    monkeypatch.setattr(ConvRule, "jac_t", forbidden)
    model, loss_func, x, y = build(_problem("cnn2d"), "ce-mean")
    compute(model, loss_func, x, y, [make()])


def _max_norm_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2))
    return model.double(), torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,))


def _inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    return model.double(), torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))


def _training_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    return model, torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))


REJECTIONS = [
    (
        _max_norm_embedding,
        BatchL2,
        r"BatchL2 is not available for parameter '0.weight' of Embedding",
    ),
    (
        _max_norm_embedding,
        KFLR,
        r"KFLR is not available for parameter '0.weight' of Embedding.*max_norm",
    ),
    (_inplace_relu, SumGradSquared, r"Linear \(module '0'\) was modified in place"),
    (_training_batchnorm, lambda: DiagGGN(mc_samples=1), r"BatchNorm1d \(module '1'\).*model.eval"),
]


@pytest.mark.parametrize(("make_model", "make", "message"), REJECTIONS)
@pytest.mark.parametrize("path", ["streamed", "general"])
def test_both_paths_reject_with_the_named_reason(make_model, make, message, path):
    model, x, y = make_model()
    subsampling = list(range(x.shape[0])) if path == "general" else None
    with pytest.raises(UnsupportedModuleError, match=message):
        compute(model, nn.CrossEntropyLoss(), x, y, [make()], subsampling=subsampling)


@pytest.mark.parametrize("make", [lambda: DiagGGN(mc_samples=2), DiagGGN, KFLR, SqrtGGN])
def test_batched_columns_equal_the_loop(make, monkeypatch):
    """Small Linear models back-propagate all columns in one vmapped backward: same numbers."""
    model, x, y = _deep_mlp()
    calls = []
    original = streamed.StreamedPass._batched

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(streamed.StreamedPass, "_batched", spy)
    loss_func = nn.CrossEntropyLoss()
    batched = compute(model, loss_func, x, y, [make()], generator=torch.Generator().manual_seed(1))
    assert calls
    monkeypatch.setattr(streamed, "BATCHED_COLUMNS_ELEMENTS", 0)
    loop = compute(model, loss_func, x, y, [make()], generator=torch.Generator().manual_seed(1))
    assert len(calls) == 1
    name = make().name
    for param, value in loop[name].items():
        _assert_close(batched[name][param], value)


@pytest.mark.parametrize("together", [False, True])
def test_loop_sums_squared_columns_for_ggn_diagonals(together, monkeypatch):
    """The per-column loop sums squares as columns arrive (GGN diagonals alone): still exact."""
    monkeypatch.setattr(streamed, "BATCHED_COLUMNS_ELEMENTS", 0)
    squared = []
    original = streamed.StreamedPass._squared_owners

    def spy(self, source):
        owners = original(self, source)
        squared.append(len(owners))
        return owners

    monkeypatch.setattr(streamed.StreamedPass, "_squared_owners", spy)
    model, x, y = _deep_mlp()
    loss_func = nn.CrossEntropyLoss()
    quantities = [DiagGGN(), BatchDiagGGN()] + ([KFLR()] if together else [])
    results = compute(model, loss_func, x, y, quantities)
    assert squared == [0 if together else 6]
    diag = torch.cat([v.flatten() for v in results["DiagGGN"].values()])
    torch.testing.assert_close(diag, reference.ggn(model, loss_func, x, y).diagonal())
    batch = torch.cat([v.flatten(1) for v in results["BatchDiagGGN"].values()], 1)
    expected = reference.per_sample_ggn(model, loss_func, x, y).diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(batch, expected)
