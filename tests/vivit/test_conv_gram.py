"""The convolutions' Gram primitive: both of its forms against the default and the dense GGN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.backprop.rules import conv
from curvlab.backprop.rules.base import Call, Rule
from curvlab.backprop.rules.conv import ConvRule
from curvlab.vivit import ggn_eigh
from tests.vivit.helpers import assert_eigenpairs, dense_ggn, mc_factor, problem, rank

CNNS = ["cnn2d", "cnn1d-grouped", "cnn3d", "cnn2d-grouped"]
LAYERS = {
    "conv1d-dilated-grouped": (nn.Conv1d(4, 6, 3, dilation=2, groups=2, padding=1), (5, 4, 9)),
    "conv2d-strided-padded": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (5, 2, 6, 5)),
    "conv2d-grouped": (nn.Conv2d(4, 6, 2, groups=2, padding="same"), (5, 4, 4, 4)),
    "conv3d": (nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), (5, 1, 3, 4, 3)),
}


@pytest.fixture(params=["factored", "materialised"])
def form(request, monkeypatch):
    """Force the factored or the materialised weight Gram (and small factored chunks)."""
    factored = request.param == "factored"
    monkeypatch.setattr(conv, "factored_gram_cost", lambda *a: (0, 1) if factored else (1, 0))
    monkeypatch.setattr(conv, "GRAM_ELEMENTS", 64)
    return request.param


@pytest.mark.parametrize("other_columns", [None, 1, 3])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_conv_gram_equals_default(layer, other_columns, form):
    torch.manual_seed(0)
    module, shape = LAYERS[layer]
    module = module.double()
    x = torch.randn(*shape, dtype=torch.float64)
    out = module(x)
    factors = (torch.randn(4, *out.shape, dtype=torch.float64),)
    other = None
    if other_columns is not None:
        other = (torch.randn(other_columns, *out.shape, dtype=torch.float64),)
    call, names = Call((x,)), ["weight", "bias"]
    ours = ConvRule().gram(module, call, factors, names, other)
    default = Rule.gram(ConvRule(), module, call, factors, names, other)
    assert ours.keys() == default.keys()
    for name in names:
        torch.testing.assert_close(ours[name], default[name])


def test_cost_rule_picks_the_cheaper_form():
    # few positions, wide patches: factored; many positions: the per-sample VJPs
    factored, materialised = conv.factored_gram_cost(10, 10, 128, 1, 576, 128, 4)
    assert factored < materialised
    factored, materialised = conv.factored_gram_cost(10, 10, 128, 1, 75, 64, 784)
    assert factored > materialised


@pytest.mark.parametrize("name", CNNS)
def test_exact_cnn_eigenpairs_equal_dense(name, form):
    model, loss_func, x, y = problem(name, "ce-mean")
    ggn = dense_ggn(model, loss_func, x, y)
    values, vectors = ggn_eigh(model, loss_func, x, y, k=rank(ggn))
    assert_eigenpairs(values, vectors, ggn)


@pytest.mark.parametrize("name", ["cnn2d", "cnn1d-grouped"])
def test_mc_subsampled_cnn_eigenpairs_equal_the_sampled_factor(name, form):
    model, loss_func, x, y = problem(name, "ce-mean")
    subsampling = [2, 0]
    factor = mc_factor(model, loss_func, x, y, seed=5, subsampling=subsampling)
    ggn = factor.T @ factor
    values, vectors = ggn_eigh(
        model,
        loss_func,
        x,
        y,
        k=rank(ggn),
        mc_samples=1,
        subsampling=subsampling,
        generator=torch.Generator().manual_seed(5),
    )
    assert_eigenpairs(values, vectors, ggn)


@pytest.mark.parametrize("name", ["cnn2d", "cnn2d-grouped"])
def test_per_group_cnn_eigenpairs_equal_dense_blocks(name, form):
    model, loss_func, x, y = problem(name, "mse-sum")
    ggn = dense_ggn(model, loss_func, x, y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    groups = [names[:2], names[2:]]
    values, vectors = ggn_eigh(model, loss_func, x, y, k=1, per_parameter=groups)
    offsets = [0, sum(sizes[:2]), sum(sizes)]
    for b, group in enumerate(groups):
        block = ggn[offsets[b] : offsets[b + 1], offsets[b] : offsets[b + 1]]
        k = rank(block)
        values, vectors = ggn_eigh(model, loss_func, x, y, k=k, per_parameter=groups)
        assert_eigenpairs(values[tuple(group)], vectors[tuple(group)], block)


def test_conv_weights_never_form_per_sample_vjps_when_factored(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the factored Gram formed per-sample VJPs")

    monkeypatch.setattr(conv, "factored_gram_cost", lambda *a: (0, 1))
    monkeypatch.setattr(ConvRule, "jac_t", forbidden)
    model, loss_func, x, y = problem("cnn2d", "ce-mean")
    ggn = dense_ggn(model, loss_func, x, y)
    values, _ = ggn_eigh(model, loss_func, x, y, k=3)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(ggn).flip(0)[:3])
