"""The loss math of ``backprop/loss.py`` against autograd in float64.

For every supported loss (mean and sum, label smoothing, outputs ``[N, C]`` and ``[N, C, T]``):
the closed-form per-sample gradient and Hessian equal ``torch.func`` derivatives of the
per-sample loss, the square-root factor reproduces the Hessian, and the batch loss is the
module's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, hessian

from curvlab.backprop.loss import LOSS_NAMES, LossSpec
from tests.backprop.problems import LOSSES, make_targets

SHAPES = [(4, 3), (3, 4, 2)]


def _case(loss: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    spec = LossSpec(LOSSES[loss]())
    output = 2.0 * torch.randn(*shape, dtype=torch.float64)
    target = make_targets(spec.loss_func, output)
    if target.is_floating_point():
        target = target.double()
    return spec, output, target


def _per_sample_reference(transform, spec: LossSpec, output, target):
    """``transform`` (``grad`` or ``hessian``) of every per-sample loss, stacked over samples."""

    def derivative(n: int):
        def loss(f):
            return spec.per_sample_loss(f[None], target[n : n + 1])[0]

        return transform(loss)(output[n])

    return torch.stack([derivative(n) for n in range(output.shape[0])])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_per_sample_gradient_is_the_autograd_gradient(loss, shape):
    spec, output, target = _case(loss, shape)
    reference = _per_sample_reference(grad, spec, output, target)
    assert torch.allclose(spec.per_sample_gradient(output, target), reference)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_hessian_is_the_autograd_hessian(loss, shape):
    spec, output, target = _case(loss, shape)
    reference = _per_sample_reference(hessian, spec, output, target)
    assert torch.allclose(spec.hessian(output, target), reference)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_sqrt_hessian_reproduces_the_hessian(loss, shape):
    spec, output, target = _case(loss, shape)
    sqrt = spec.sqrt_hessian(output, target).flatten(start_dim=2)  # [M, N, D]
    n = output.shape[0]
    dense = spec.hessian(output, target).reshape(n, sqrt.shape[-1], sqrt.shape[-1])
    assert torch.allclose(torch.einsum("mnd,mne->nde", sqrt, sqrt), dense)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_batch_factor_times_per_sample_gradient_is_the_output_gradient(loss, shape):
    spec, output, target = _case(loss, shape)
    r = spec.batch_factor(output.shape[0])
    gradient = r * spec.per_sample_gradient(output, target)
    assert torch.allclose(gradient, spec.output_gradient(output, target))


@pytest.mark.parametrize("loss", list(LOSSES))
def test_value_is_the_loss_modules_value(loss):
    spec, output, target = _case(loss, (4, 3))
    assert torch.equal(spec.value(output, target), spec.loss_func(output, target))


@pytest.mark.parametrize("name", list(LOSS_NAMES))
def test_from_name_builds_the_named_loss(name):
    spec = LossSpec.from_name(name, reduction="sum")
    assert type(spec.loss_func) is LOSS_NAMES[name] and spec.reduction == "sum"


def test_from_name_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        LossSpec.from_name("hinge")


def test_hessian_terms_log_diagonal_stays_finite_where_the_diagonal_underflows():
    spec = LossSpec(nn.CrossEntropyLoss())
    output = torch.tensor([[0.0, -800.0, 5.0]], dtype=torch.float64)
    terms = spec.hessian_terms(output)
    assert terms.diagonal[0, 1] == 0 and torch.isfinite(terms.log_diagonal).all()
