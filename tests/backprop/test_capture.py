"""In-loop capture against compute(), and its contract with a training loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlab.backprop import (
    KFAC,
    KFLR,
    KFRA,
    BatchDiagHessian,
    BatchGrad,
    BatchL2,
    CaptureError,
    DenseBlock,
    DiagGGN,
    DiagHessian,
    HesScale,
    KronFactors,
    NonFiniteError,
    SqrtGGN,
    SumGradSquared,
    UnsupportedLossError,
    Variance,
    capture,
    compute,
)
from tests.backprop.problems import PROBLEMS, build

STREAMED = [BatchGrad, BatchL2, Variance, lambda: DiagGGN(mc_samples=2), KFLR, SqrtGGN]
GENERAL = [DiagHessian, BatchDiagHessian, lambda: KFAC(mc_samples=3)]
CASES = [
    ("mlp", "ce-mean"),
    ("mlp-activations", "mse-sum"),
    ("cnn2d", "ce-mean"),
    ("residual-conv-batchnorm", "bce-mean"),
    ("residual-shared", "ce-mean"),
    ("attention-layernorm", "mse-mean"),
    ("sequence", "ce-mean"),
    ("conv-transpose", "ce-sum"),
]


def _problem(name: str):
    return next(p for p in PROBLEMS if p.name == name)


def _same(a, b) -> None:
    if isinstance(a, (KronFactors, DenseBlock)):
        torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-12, atol=1e-14)
    elif callable(a):
        return
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _captured(model, loss_func, x, y, quantities, **kwargs):
    with capture(model, loss_func, quantities, **kwargs) as captured:
        loss = loss_func(model(x), y)
        loss.backward()
    return captured.results


@pytest.mark.parametrize(("problem", "loss"), CASES)
@pytest.mark.parametrize("make", STREAMED + GENERAL)
def test_capture_equals_compute(problem, loss, make):
    model, loss_func, x, y = build(_problem(problem), loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = compute(
            model, loss_func, x, y, [make()], generator=torch.Generator().manual_seed(3)
        )
        ours = _captured(
            model, loss_func, x, y, [make()], generator=torch.Generator().manual_seed(3)
        )
    name = make().name
    assert ours[name].keys() == expected[name].keys()
    for param, value in expected[name].items():
        _same(ours[name][param], value)
    torch.testing.assert_close(ours.loss, expected.loss)
    for param, g in expected.grad.items():
        torch.testing.assert_close(ours.grad[param], g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("quantities", [[BatchL2(), KFAC()], [DiagHessian()], [KFRA(), HesScale()]])
def test_param_grad_is_exactly_the_plain_backward(quantities):
    model, loss_func, x, y = build(_problem("mlp-activations"), "ce-mean")
    plain = model
    loss_func(plain(x), y).backward()
    expected = {n: p.grad.clone() for n, p in plain.named_parameters()}
    model.zero_grad(set_to_none=True)
    _captured(model, loss_func, x, y, quantities)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name


def test_capture_inside_an_optimizer_closure():
    model, loss_func, x, y = build(_problem("mlp"), "mse-mean")
    expected = compute(model, loss_func, x, y, [DiagGGN()])["DiagGGN"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        optimizer.zero_grad()
        loss = loss_func(model(x), y)
        loss.backward()
        return loss

    with capture(model, loss_func, [DiagGGN()]) as captured:
        optimizer.step(closure)
    for name, value in expected.items():
        _same(captured.results["DiagGGN"][name], value)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_gradient_accumulation_one_capture_per_micro_batch():
    model, loss_func, x, y = build(_problem("cnn2d"), "ce-mean")
    halves = [(x[:2], y[:2]), (x[2:], y[2:])]
    plain = [p.grad for p in model.parameters()]
    assert all(g is None for g in plain)
    for xb, yb in halves:
        loss_func(model(xb), yb).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for xb, yb in halves:
        results = _captured(model, loss_func, xb, yb, [SumGradSquared(), KFLR()])
        reference = compute(model, loss_func, xb, yb, [SumGradSquared(), KFLR()])
        for q in ("SumGradSquared", "KFLR"):
            for name, value in reference[q].items():
                _same(results[q][name], value)
        for name, g in reference.grad.items():  # this micro-batch's gradient, not the sum
            torch.testing.assert_close(results.grad[name], g, rtol=1e-12, atol=1e-14)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-14)


def test_no_grad_evaluation_inside_the_capture_is_ignored():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    expected = compute(model, loss_func, x, y, [BatchL2()])["BatchL2"]
    with capture(model, loss_func, [BatchL2()]) as captured:
        with torch.no_grad():
            loss_func(model(x[:2]), y[:2])  # an evaluation before
        loss_func(model(x), y).backward()
        with torch.no_grad():
            loss_func(model(x[1:]), y[1:])  # and after
    for name, value in expected.items():
        _same(captured.results["BatchL2"][name], value)


@pytest.mark.parametrize("make", [BatchL2, Variance, lambda: DiagGGN(mc_samples=1), DiagHessian])
def test_scaled_loss_backward(make):
    """A gradient scaler multiplies the loss: the quantities stay, the gradient is scaled."""
    model, loss_func, x, y = build(_problem("mlp-activations"), "ce-mean")
    expected = compute(model, loss_func, x, y, [make()], generator=torch.Generator().manual_seed(0))
    with capture(model, loss_func, [make()], generator=torch.Generator().manual_seed(0)) as cap:
        (loss_func(model(x), y) * 8.0).backward()
    for name, value in expected[make().name].items():
        _same(cap.results[make().name][name], value)
        torch.testing.assert_close(cap.results.grad[name], expected.grad[name])
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, 8.0 * expected.grad[name]
        )


def test_autocast():
    """Under CPU autocast (bfloat16) capture equals compute, and both track float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    loss_func = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    quantities = [DiagGGN(), BatchL2()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = compute(model, loss_func, x, y, quantities)
        with capture(model, loss_func, quantities) as captured:
            loss_func(model(x), y).backward()
    full = compute(model, loss_func, x, y, quantities)
    for q in ("DiagGGN", "BatchL2"):
        for name, value in expected[q].items():
            ours = captured.results[q][name]
            torch.testing.assert_close(ours, value)
            rel = (ours.float() - full[q][name]).norm() / full[q][name].norm()
            assert rel < 0.05, (q, name, float(rel))


def test_results_before_the_block_ends_raise():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    with capture(model, loss_func, [BatchL2()]) as captured:
        loss_func(model(x), y).backward()
        with pytest.raises(CaptureError, match="ready when the `with` block has ended"):
            captured.results  # noqa: B018


def test_loss_called_twice_raises():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    with pytest.raises(CaptureError, match="called twice inside one capture"):
        with capture(model, loss_func, [BatchL2()]):
            loss_func(model(x), y)
            loss_func(model(x), y)


def test_loss_never_called_raises():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    with pytest.raises(CaptureError, match=r"CrossEntropyLoss\) was not called"):
        with capture(model, loss_func, [BatchL2()]):
            nn.functional.cross_entropy(model(x), y).backward()


def test_loss_with_output_terms_raises():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    with pytest.raises(CaptureError, match="not a multiple of the captured loss"):
        with capture(model, loss_func, [BatchL2()]):
            output = model(x)
            (loss_func(output, y) + output.square().mean()).backward()


def test_capture_without_backward_leaves_grad_untouched():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    with capture(model, loss_func, [BatchL2()]) as captured:
        loss_func(model(x), y)
    assert all(p.grad is None for p in model.parameters())
    expected = compute(model, loss_func, x, y, [BatchL2()])["BatchL2"]
    for name, value in expected.items():
        _same(captured.results["BatchL2"][name], value)


# ------------------------------------------------------------------------------ bad input
def test_nan_in_inputs_is_named():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    x = x.clone()
    x[2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"inputs holds NaN \(first at sample 2\)"):
        compute(model, loss_func, x, y, [BatchL2()])


def test_inf_in_the_model_output_is_named():
    model, loss_func, x, y = build(_problem("mlp"), "mse-mean")
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="the model output holds"):
        compute(model, loss_func, x, y, [BatchL2()])


def test_labels_out_of_range_are_named():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    y = y.clone()
    y[1] = 7
    with pytest.raises(
        UnsupportedLossError, match=r"must lie in \[0, 2\].*\[7\] \(first at sample 1\)"
    ):
        compute(model, loss_func, x, y, [BatchL2()])


def test_empty_batch_is_rejected():
    model, loss_func, x, y = build(_problem("mlp"), "mse-mean")
    with pytest.raises(ValueError, match=r"the batch is empty \(N = 0\)"):
        compute(model, loss_func, x[:0], y[:0], [BatchL2()])


def test_subsampling_out_of_range_is_named():
    model, loss_func, x, y = build(_problem("mlp"), "mse-mean")
    with pytest.raises(
        IndexError, match=r"subsampling indices \[9\] are out of range for a batch of"
    ):
        compute(model, loss_func, x, y, [BatchL2()], subsampling=[0, 9])


def test_model_without_trainable_parameters_is_rejected():
    model, loss_func, x, y = build(_problem("mlp"), "mse-mean")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        compute(model, loss_func, x, y, [BatchL2()])


def test_quantities_by_name():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    results = compute(model, loss_func, x, y, ["DiagGGN", "DiagGGNMC", "KFAC"])
    assert set(results) == {"DiagGGN", "DiagGGNMC", "KFAC"}
    with pytest.raises(ValueError, match=r"unknown quantity 'DiagGN'; valid names: .*DiagGGN"):
        compute(model, loss_func, x, y, ["DiagGN"])


@pytest.mark.parametrize(
    "quantities", [[BatchL2(), KFLR()], [DiagHessian()], [KFRA(), HesScale()], ["DiagGGNMC"]]
)
def test_params_restrict_the_quantities(quantities):
    model, loss_func, x, y = build(_problem("mlp-activations"), "ce-mean")
    everything = compute(
        model, loss_func, x, y, quantities, generator=torch.Generator().manual_seed(2)
    )
    names = [n for n, _ in model.named_parameters()]
    chosen = [names[-2], dict(model.named_parameters())[names[0]]]  # by name and by tensor
    part = compute(
        model,
        loss_func,
        x,
        y,
        quantities,
        params=chosen,
        generator=torch.Generator().manual_seed(2),
    )
    for q in everything:
        assert list(part[q]) == [names[0], names[-2]]
        for name in part[q]:
            _same(part[q][name], everything[q][name])
    assert list(part.grad) == [names[0], names[-2]]


def test_unknown_params_are_named():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    with pytest.raises(ValueError, match=r"params: 'nope' is not a trainable parameter"):
        compute(model, loss_func, x, y, [BatchL2()], params=["nope"])


def test_cancel_drops_the_capture():
    model, loss_func, x, y = build(_problem("mlp"), "ce-mean")
    with capture(model, loss_func, [BatchL2()]) as captured:
        captured.cancel()
        loss_func(model(x), y).backward()  # a plain backward, nothing captured
    with pytest.raises(CaptureError):
        captured.results  # noqa: B018
    assert all(p.grad is not None for p in model.parameters())
