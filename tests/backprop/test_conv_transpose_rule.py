"""ConvTransposeRule's primitives against per-sample VJPs by torch.func, in float64.

Covers strides, padding with output padding, dilation, groups, 1-3 spatial dimensions, both
branches of the norm (Gram matrices or direct) and chunking over samples.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vjp

from curvlab.backprop.rules import conv as conv_rules
from curvlab.backprop.rules.base import Call
from curvlab.backprop.rules.conv_transpose import ConvTransposeRule

CONFIGS = [
    # (class, in, out, kernel, stride, padding, output_padding, dilation, groups, input size)
    (nn.ConvTranspose1d, 2, 3, 3, 2, 1, 1, 1, 1, (4,)),
    (nn.ConvTranspose1d, 4, 2, 2, 1, 0, 0, 3, 2, (3,)),
    (nn.ConvTranspose2d, 2, 4, (2, 3), (2, 1), (0, 1), (1, 0), (1, 2), 2, (2, 3)),
    (nn.ConvTranspose2d, 16, 16, 3, 2, 1, 1, 1, 1, (2, 2)),  # norm by Gram matrices
    (nn.ConvTranspose3d, 1, 2, (2, 1, 2), (1, 2, 2), (1, 0, 0), (0, 1, 1), 1, 1, (2, 2, 1)),
]


def _setup(config, m=2, n=3):
    torch.manual_seed(0)
    cls, c_in, c_out, k, s, p, op, d, g, size = config
    module = cls(c_in, c_out, k, stride=s, padding=p, output_padding=op, dilation=d, groups=g)
    module = module.double()
    x = torch.randn(n, c_in, *size, dtype=torch.float64)
    out = module(x)
    factor = torch.randn(m, *out.shape, dtype=torch.float64)
    return module, x, factor


def _per_sample_vjps(module, x, factor):
    """``{name: [M, N, *p]}`` by one torch.func VJP per column and sample."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    result = {k: torch.zeros(*factor.shape[:2], *v.shape, dtype=v.dtype) for k, v in params.items()}
    for i in range(factor.shape[1]):

        def out(p, i=i):
            return functional_call(module, p, (x[i : i + 1],))[0]

        _, pullback = vjp(out, params)
        for mcol in range(factor.shape[0]):
            for k, v in pullback(factor[mcol, i])[0].items():
                result[k][mcol, i] = v
    return result


@pytest.mark.parametrize("chunk", [conv_rules.CHUNK_ELEMENTS, 1])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0].__name__}-{c[1:]}")
def test_primitives_match_per_sample_vjps(config, chunk, monkeypatch):
    from curvlab.backprop.rules import conv_transpose

    monkeypatch.setattr(conv_transpose, "CHUNK_ELEMENTS", chunk)
    module, x, factor = _setup(config)
    rule, call, names = ConvTransposeRule(), Call(args=(x,)), ["weight", "bias"]
    expected = _per_sample_vjps(module, x, factor)
    close = {"rtol": 1e-10, "atol": 1e-12}
    jac_t = rule.jac_t(module, call, (factor,), names)
    sums = rule.sum_jac_t(module, call, (factor,), names)
    sq = rule.sum_sq_jac_t(module, call, (factor,), names, per_sample=True)
    sq_total = rule.sum_sq_jac_t(module, call, (factor,), names, per_sample=False)
    norms = rule.sq_norm_jac_t(module, call, (factor,), names)
    for name in names:
        v = expected[name]
        torch.testing.assert_close(jac_t[name], v, **close)
        torch.testing.assert_close(sums[name], v.sum(1), **close)
        torch.testing.assert_close(sq[name], v.square().sum(0), **close)
        torch.testing.assert_close(sq_total[name], v.square().sum((0, 1)), **close)
        torch.testing.assert_close(norms[name], v.flatten(start_dim=2).square().sum(-1), **close)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0].__name__}-{c[1:]}")
def test_kron_sums_match_weight_jacobian(config):
    """Input side: Gram of the Jacobian rows of the first output channel of each group."""
    module, x, factor = _setup(config)
    sums = ConvTransposeRule().kron_sums(module, Call(args=(x,)), (factor,), ["weight", "bias"])
    weight = module.weight.detach()
    jac = jacrev(lambda w: functional_call(module, {"weight": w}, (x,)))(weight)
    n, o = jac.shape[:2]
    g = module.groups
    jac = jac.reshape(n, o, -1, *weight.shape)
    rows = weight.shape[0] // g
    expected = []
    for group in range(g):
        u = jac[:, group * (o // g), :, group * rows : (group + 1) * rows, 0]
        u = u.reshape(-1, u[0, 0].numel())
        expected.append(u.T @ u)
    expected = expected[0] if g == 1 else torch.stack(expected)
    torch.testing.assert_close(sums["weight"].input_sum, expected, rtol=1e-10, atol=1e-12)
    assert sums["weight"].input_count == x.shape[0] * factor[0, 0, 0].numel()
    s = factor.movedim(2, -1).reshape(-1, o)
    expand = s.T @ s  # the weight: sum over positions of s s^T
    if g > 1:
        expand = conv_rules.grouped_output_sum(expand, g)
    torch.testing.assert_close(sums["weight"].output_sum, expand, rtol=1e-10, atol=1e-12)
    summed = factor.flatten(start_dim=3).sum(-1).reshape(-1, o)  # the bias: its exact block
    torch.testing.assert_close(sums["bias"].output_sum, summed.T @ summed, rtol=1e-10, atol=1e-12)
    total = sums["weight"].input_total  # the rows' sum (joint weight-and-bias blocks)
    rows_sum = torch.stack(
        [
            jac[:, gr * (o // g), :, gr * rows : (gr + 1) * rows, 0].sum((0, 1)).flatten()
            for gr in range(g)
        ]
    )
    torch.testing.assert_close(total, rows_sum[0] if g == 1 else rows_sum, rtol=1e-10, atol=1e-12)
