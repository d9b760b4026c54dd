"""Tests of curvlab.nn.einconv: einsum convolutions, unfold, KFAC factors, tensor dropout.

References are independent of the index patterns: torch's ``F.conv{1,2,3}d`` and ``F.unfold``, and
an unfold built from ``F.pad`` + ``Tensor.unfold`` strided windows, all in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from curvlab.nn.einconv import (
    conv,
    conv_hyperparameters,
    conv_input_grad,
    conv_transpose_to_size,
    conv_weight_grad,
    index_pattern,
    kfac_expand_factor,
    kfac_reduce_factor,
    pad_explicitly,
    padding_pairs,
    randomized_conv,
    unfold,
)

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
FAST = settings(max_examples=30, deadline=None)
TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------


def pad_pairs(padding, kernel, dilation):
    """(left, right) per axis, computed here independently of the code under test."""
    D = len(kernel)
    if padding == "valid":
        return [(0, 0)] * D
    if padding == "same":
        return [
            (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
            for k, d in zip(kernel, dilation, strict=True)
        ]
    if isinstance(padding, int):
        return [(padding, padding)] * D
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def reference_unfold(x, kernel, stride, pairs, dilation):
    """[N, C * prod(K), prod(O)] from zero padding and strided windows (no index patterns)."""
    D = len(kernel)
    flat_pad = [p for pair in reversed(pairs) for p in pair]
    t = F.pad(x, flat_pad)
    for a in range(D):
        span = dilation[a] * (kernel[a] - 1) + 1
        t = t.unfold(2 + a, span, stride[a])  # appends the window axis
    t = t[(Ellipsis, *(slice(None, None, d) for d in dilation))]  # [N, C, O.., K..]
    N, C = x.shape[:2]
    perm = [0, 1, *range(2 + D, 2 + 2 * D), *range(2, 2 + D)]
    return t.permute(perm).reshape(N, C * math.prod(kernel), -1)


def reference_factors(x, kernel, stride, pairs, dilation, groups):
    """KFAC-expand and -reduce input factors from the reference unfold, [G, D, D]."""
    u = reference_unfold(x, kernel, stride, pairs, dilation)
    N, _, P = u.shape
    u = u.reshape(N, groups, -1, P)
    expand = torch.stack([sum(u[n, g] @ u[n, g].T for n in range(N)) for g in range(groups)])
    mean = u.mean(3)
    reduce = torch.stack(
        [sum(torch.outer(mean[n, g], mean[n, g]) for n in range(N)) for g in range(groups)]
    )
    return expand / (N * P), reduce / N


# ------------------------------------------------------------------------------------------------
# Hypothesis strategies
# ------------------------------------------------------------------------------------------------


@st.composite
def geometries(draw, dims=(1, 2, 3), allow_pairs=True):
    """Draw (D, input size, kernel, stride, padding, dilation) with a non-empty output."""
    D = draw(st.sampled_from(dims))
    small = 4 if D == 3 else 6
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(D))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(D))
    kinds = ["int", "tuple", "valid", "same"] + (["pairs"] if allow_pairs else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "same":
        stride, padding = (1,) * D, "same"
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(D))
        if kind == "int":
            padding = draw(st.integers(0, 2))
        elif kind == "tuple":
            padding = tuple(draw(st.integers(0, 2)) for _ in range(D))
        elif kind == "pairs":
            padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(D))
        else:
            padding = "valid"
    pairs = pad_pairs(padding, kernel, dilation)
    size = tuple(
        max(1, d * (k - 1) + 1 - sum(p)) + draw(st.integers(0, small))
        for k, d, p in zip(kernel, dilation, pairs, strict=True)
    )
    return D, size, kernel, stride, padding, dilation


# ------------------------------------------------------------------------------------------------
# Index pattern
# ------------------------------------------------------------------------------------------------


@FAST
@given(
    I=st.integers(1, 9),
    K=st.integers(1, 4),
    s=st.integers(1, 3),
    p=st.integers(0, 2),
    d=st.integers(1, 3),
)
def test_index_pattern_matches_definition(I, K, s, p, d):
    if I + 2 * p < d * (K - 1) + 1:
        with pytest.raises(ValueError, match="input size"):
            index_pattern(I, K, s, p, d)
        return
    pattern = index_pattern(I, K, stride=s, padding=p, dilation=d)
    O = (I + 2 * p - d * (K - 1) - 1) // s + 1
    expected = torch.zeros(O, I, K)
    for o in range(O):
        for i in range(I):
            for k in range(K):
                expected[o, i, k] = float(i == o * s + k * d - p)
    assert torch.equal(pattern, expected)


# ------------------------------------------------------------------------------------------------
# Convolution
# ------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    geometry=geometries(),
    groups=st.integers(1, 2),
    c_in=st.integers(1, 2),
    c_out=st.integers(1, 2),
    batch=st.integers(1, 2),
    use_bias=st.booleans(),
    simplify=st.booleans(),
)
def test_conv_equals_torch(geometry, groups, c_in, c_out, batch, use_bias, simplify):
    D, size, kernel, stride, padding, dilation = geometry
    x = torch.randn(batch, groups * c_in, *size, dtype=DTYPE)
    weight = torch.randn(groups * c_out, c_in, *kernel, dtype=DTYPE)
    bias = torch.randn(groups * c_out, dtype=DTYPE) if use_bias else None
    ours = conv(x, weight, bias, stride, padding, dilation, groups, simplify=simplify)
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):  # torch has no pairs
        x = F.pad(x, [p for pair in reversed(padding) for p in pair])
        padding = 0
    expected = TORCH_CONV[D](x, weight, bias, stride, padding, dilation, groups)
    torch.testing.assert_close(ours, expected, **TOL)


def test_conv_four_spatial_axes_matches_unfold_reference():
    x = torch.randn(2, 4, 5, 4, 6, 3, dtype=DTYPE)
    weight = torch.randn(6, 2, 2, 3, 1, 2, dtype=DTYPE)
    kernel, stride, dilation, pairs = (
        (2, 3, 1, 2),
        (1, 2, 1, 3),
        (2, 1, 1, 1),
        [(1, 0), (1, 1), (0, 0), (0, 2)],
    )
    ours = conv(x, weight, None, stride, pairs, dilation, groups=2)
    u = reference_unfold(x, kernel, stride, pairs, dilation).reshape(2, 2, 2 * 12, -1)
    y = torch.einsum("gej,ngjp->ngep", weight.reshape(2, 3, -1), u).reshape(2, 6, *ours.shape[2:])
    torch.testing.assert_close(ours, y, **TOL)


def test_conv_gradients_match_torch():
    x = torch.randn(2, 4, 7, 6, dtype=DTYPE, requires_grad=True)
    weight = torch.randn(4, 2, 3, 2, dtype=DTYPE, requires_grad=True)
    kwargs = dict(stride=2, padding=1, dilation=(1, 2), groups=2)
    grad_out = torch.randn_like(F.conv2d(x, weight, **kwargs))
    ours = torch.autograd.grad(conv(x, weight, **kwargs), (x, weight), grad_out)
    expected = torch.autograd.grad(F.conv2d(x, weight, **kwargs), (x, weight), grad_out)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize(
    "size, kernel, stride",
    [
        ((8, 8), 2, 2),
        ((9, 7), (3, 2), (3, 2)),
        ((7, 7), 1, 3),
        ((5, 6), (5, 6), 1),
        ((10, 9), 2, 4),
    ],
    ids=["patchify", "patchify-remainder", "downsample-1x1", "dense", "downsample-gap"],
)
def test_simplified_paths_equal_pattern_paths(size, kernel, stride):
    x = torch.randn(3, 4, *size, dtype=DTYPE)
    weight = torch.randn(5, 4, *((kernel,) * 2 if isinstance(kernel, int) else kernel), dtype=DTYPE)
    expected = F.conv2d(x, weight, stride=stride)
    torch.testing.assert_close(conv(x, weight, stride=stride, simplify=True), expected, **TOL)
    for fn in (unfold, kfac_expand_factor, kfac_reduce_factor):
        torch.testing.assert_close(
            fn(x, weight.shape[2:], stride, simplify=True),
            fn(x, weight.shape[2:], stride, simplify=False),
            **TOL,
        )


# ------------------------------------------------------------------------------------------------
# Unfold
# ------------------------------------------------------------------------------------------------


@FAST
@given(geometry=geometries(dims=(2,), allow_pairs=False), channels=st.integers(1, 3))
def test_unfold_equals_torch_unfold(geometry, channels):
    _, size, kernel, stride, padding, dilation = geometry
    pairs = pad_pairs(padding, kernel, dilation)
    if any(left != right for left, right in pairs):
        return  # F.unfold pads symmetrically only; covered by the reference-unfold test
    torch_padding = tuple(left for left, _ in pairs)
    x = torch.randn(2, channels, *size, dtype=DTYPE)
    expected = F.unfold(x, kernel, dilation, torch_padding, stride)
    torch.testing.assert_close(unfold(x, kernel, stride, padding, dilation), expected, **TOL)


@FAST
@given(geometry=geometries(), channels=st.integers(1, 3))
def test_unfold_equals_reference_any_dims(geometry, channels):
    _, size, kernel, stride, padding, dilation = geometry
    x = torch.randn(2, channels, *size, dtype=DTYPE)
    pairs = pad_pairs(padding, kernel, dilation)
    expected = reference_unfold(x, kernel, stride, pairs, dilation)
    torch.testing.assert_close(unfold(x, kernel, stride, padding, dilation), expected, **TOL)


# ------------------------------------------------------------------------------------------------
# KFAC factors
# ------------------------------------------------------------------------------------------------


@FAST
@given(
    geometry=geometries(), groups=st.integers(1, 2), c_in=st.integers(1, 2), simplify=st.booleans()
)
def test_kfac_factors_equal_unfold_definition(geometry, groups, c_in, simplify):
    _, size, kernel, stride, padding, dilation = geometry
    x = torch.randn(3, groups * c_in, *size, dtype=DTYPE)
    pairs = pad_pairs(padding, kernel, dilation)
    expand, reduce = reference_factors(x, kernel, stride, pairs, dilation, groups)
    args = (x, kernel, stride, padding, dilation, groups)
    ours_expand = kfac_expand_factor(*args, simplify=simplify)
    ours_reduce = kfac_reduce_factor(*args, simplify=simplify)
    if groups == 1:
        expand, reduce = expand[0], reduce[0]
    torch.testing.assert_close(ours_expand, expand, **TOL)
    torch.testing.assert_close(ours_reduce, reduce, **TOL)


def test_kfac_factors_with_torch_unfold_3c3d_layer():
    x = torch.randn(4, 3, 12, 12, dtype=DTYPE)
    u = F.unfold(x, 5, padding=2)  # [N, 75, 144]
    expand = torch.einsum("ndp,nep->de", u, u) / (4 * 144)
    reduce = u.mean(2).T @ u.mean(2) / 4
    torch.testing.assert_close(kfac_expand_factor(x, 5, padding=2), expand, **TOL)
    torch.testing.assert_close(kfac_reduce_factor(x, 5, padding=2), reduce, **TOL)
    expand_sum = kfac_expand_factor(x, 5, padding=2, reduction="sum")
    torch.testing.assert_close(expand_sum, expand * 4 * 144, **TOL)
    torch.testing.assert_close(
        kfac_reduce_factor(x, 5, padding=2, reduction="sum"), reduce * 4, **TOL
    )


def test_kfac_expand_is_linear_layer_factor_of_weight_matrix():
    """A conv is a linear layer W_mat = weight.flatten(1) applied to every unfolded column."""
    x = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    weight = torch.randn(4, 3, 3, 2, dtype=DTYPE)
    u = unfold(x, (3, 2), padding=1)
    y = conv(x, weight, padding=1)
    torch.testing.assert_close(y.flatten(2), weight.flatten(1) @ u, **TOL)


# ------------------------------------------------------------------------------------------------
# Weight gradient and tensor dropout
# ------------------------------------------------------------------------------------------------


def _weight_grad_problem(D=2):
    torch.manual_seed(0)
    size = (6, 5, 4)[:D]
    x = torch.randn(4, 4, *size, dtype=DTYPE)
    weight = torch.randn(6, 2, *([2] * D), dtype=DTYPE, requires_grad=True)
    kwargs = dict(stride=1, padding=1, dilation=1, groups=2)
    y = TORCH_CONV[D](x, weight, **kwargs)
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, weight, grad_out)
    return x, grad_out, weight.shape[2:], kwargs, grad


@pytest.mark.parametrize("D", [1, 2, 3])
def test_conv_weight_grad_exact(D):
    x, grad_out, kernel, kwargs, expected = _weight_grad_problem(D)
    torch.testing.assert_close(conv_weight_grad(x, grad_out, kernel, **kwargs), expected, **TOL)


@pytest.fixture
def one_thread():
    """Tiny ops in a long loop: intra-op threads only add synchronization cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dropout", ["spatial", "batch"])
def test_tensor_dropout_is_unbiased(dropout, one_thread):
    x, grad_out, kernel, kwargs, expected = _weight_grad_problem()
    generator = torch.Generator().manual_seed(1)
    samples = torch.stack(
        [
            conv_weight_grad(
                x, grad_out, kernel, **kwargs, keep_prob=0.5, dropout=dropout, generator=generator
            )
            for _ in range(800)
        ]
    )
    stderr = samples.std(0) / math.sqrt(len(samples))
    error = (samples.mean(0) - expected).abs()
    assert (error <= 5 * stderr + 1e-12).all(), (error / stderr).max()


def test_tensor_dropout_actually_samples():
    x, grad_out, kernel, kwargs, expected = _weight_grad_problem()
    generator = torch.Generator().manual_seed(2)
    estimate = conv_weight_grad(x, grad_out, kernel, **kwargs, keep_prob=0.5, generator=generator)
    assert not torch.allclose(estimate, expected)


# ------------------------------------------------------------------------------------------------
# Errors name the culprit
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: conv(torch.randn(2, 3), torch.randn(4, 3, 2)), r"x has shape \(2, 3\)"),
        (
            lambda: conv(torch.randn(1, 3, 8), torch.randn(4, 3, 2, 2)),
            r"weight has shape \(4, 3, 2, 2\)",
        ),
        (
            lambda: conv(torch.randn(1, 4, 8), torch.randn(4, 3, 2), groups=2),
            r"weight has shape \(4, 3, 2\)",
        ),
        (
            lambda: conv(torch.randn(1, 3, 8), torch.randn(4, 3, 2), groups=2),
            r"x has shape \(1, 3, 8\)",
        ),
        (
            lambda: conv(torch.randn(1, 3, 8), torch.randn(4, 3, 2), torch.randn(3)),
            r"bias has shape \(3,\)",
        ),
        (lambda: conv(torch.randn(1, 3, 2), torch.randn(4, 3, 5)), "input size 2"),
        (
            lambda: conv(torch.randn(1, 3, 8), torch.randn(4, 3, 3), stride=2, padding="same"),
            "stride 1",
        ),
        (lambda: unfold(torch.randn(1, 3, 8, 8), (2, 2, 2)), "kernel_size"),
        (lambda: unfold(torch.randn(1, 3, 8), 2, padding="full"), "padding='full'"),
        (
            lambda: conv_weight_grad(torch.randn(2, 3, 8), torch.randn(2, 4, 6), 2),
            r"grad_output has shape \(2, 4, 6\)",
        ),
        (
            lambda: conv_weight_grad(torch.randn(2, 3, 8), torch.randn(2, 4, 7), 2, keep_prob=0.0),
            "keep_prob",
        ),
        (lambda: kfac_reduce_factor(torch.randn(2, 3, 8), 2, reduction="none"), "reduction"),
        (
            lambda: randomized_conv(torch.randn(2, 3, 8), torch.randn(4, 3, 2), keep_prob=1.5),
            "keep_prob",
        ),
    ],
)
def test_errors_name_the_culprit(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------
# Input gradient, randomized convolution, module hyperparameters
# ------------------------------------------------------------------------------------------------


def _torch_padded(x, padding):
    """x and a padding torch accepts (explicit F.pad for (left, right) pairs)."""
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):
        return F.pad(x, [p for pair in reversed(padding) for p in pair]), 0
    return x, padding


@FAST
@given(geometry=geometries(), groups=st.integers(1, 2), c_in=st.integers(1, 2))
def test_conv_input_grad_equals_torch_autograd(geometry, groups, c_in):
    D, size, kernel, stride, padding, dilation = geometry
    x = torch.randn(2, groups * c_in, *size, dtype=DTYPE, requires_grad=True)
    weight = torch.randn(groups * 2, c_in, *kernel, dtype=DTYPE)
    xp, torch_padding = _torch_padded(x, padding)
    y = TORCH_CONV[D](xp, weight, None, stride, torch_padding, dilation, groups)
    grad_out = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, grad_out)
    ours = conv_input_grad(grad_out, weight, size, stride, padding, dilation, groups)
    torch.testing.assert_close(ours, expected, **TOL)


@FAST
@given(geometry=geometries())
def test_padding_pairs_equal_the_independent_reference(geometry):
    D, size, kernel, stride, padding, dilation = geometry
    assert list(padding_pairs(padding, kernel, stride, dilation)) == pad_pairs(
        padding, kernel, dilation
    )


@FAST
@given(geometry=geometries(), groups=st.integers(1, 2))
def test_pad_explicitly_leaves_torch_the_padding_it_can_do(geometry, groups):
    D, size, kernel, stride, padding, dilation = geometry
    x = torch.randn(2, groups, *size, dtype=DTYPE)
    weight = torch.randn(groups * 2, 1, *kernel, dtype=DTYPE)
    padded, rest = pad_explicitly(x, padding_pairs(padding, kernel, stride, dilation))
    ours = TORCH_CONV[D](padded, weight, None, stride, rest, dilation, groups)
    flat = [p for pair in reversed(pad_pairs(padding, kernel, dilation)) for p in pair]
    expected = TORCH_CONV[D](F.pad(x, flat), weight, None, stride, 0, dilation, groups)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "layer",
    [
        lambda mode: nn.Conv1d(2, 3, 4, padding="same", dilation=2, padding_mode=mode),
        lambda mode: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode=mode),
        lambda mode: nn.Conv2d(2, 3, 3, stride=2, padding=(2, 1), padding_mode=mode),
        lambda mode: nn.Conv3d(2, 3, 2, padding=1, padding_mode=mode),
    ],
)
def test_pad_explicitly_reproduces_the_modules_padding(layer, mode):
    module = layer(mode).double()
    x = torch.randn(2, 2, *[7] * (module.weight.dim() - 2), dtype=DTYPE)
    pairs = padding_pairs(module.padding, module.kernel_size, module.stride, module.dilation)
    padded, rest = pad_explicitly(x, pairs, mode)
    d = module.weight.dim() - 2
    ours = TORCH_CONV[d](padded, module.weight, module.bias, module.stride, rest, module.dilation)
    torch.testing.assert_close(ours, module(x), **TOL)


@FAST
@given(geometry=geometries(allow_pairs=False), groups=st.integers(1, 2), c_in=st.integers(1, 2))
def test_conv_transpose_to_size_is_the_conv_input_gradient(geometry, groups, c_in):
    D, size, kernel, stride, padding, dilation = geometry
    pairs = padding_pairs(padding, kernel, stride, dilation)
    assume(all(left == right for left, right in pairs))
    symmetric = [left for left, _ in pairs]
    x = torch.randn(2, groups * c_in, *size, dtype=DTYPE, requires_grad=True)
    weight = torch.randn(groups * 2, c_in, *kernel, dtype=DTYPE)
    y = TORCH_CONV[D](x, weight, None, stride, symmetric, dilation, groups)
    grad_out = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, grad_out)
    ours = conv_transpose_to_size(grad_out, weight, size, stride, symmetric, dilation, groups)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1),
        lambda: nn.ConvTranspose2d(4, 2, (2, 3), stride=(2, 3), dilation=(1, 2), groups=2),
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1, output_padding=(1, 0, 1)),
    ],
)
def test_conv_transpose_to_size_is_the_transposed_convolution(layer):
    module = layer().double()
    x = torch.randn(2, module.in_channels, *[4] * (module.weight.dim() - 2), dtype=DTYPE)
    expected = module(x)
    ours = conv_transpose_to_size(
        x,
        module.weight,
        expected.shape[2:],
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
    )
    torch.testing.assert_close(ours, expected - module.bias.reshape(-1, *[1] * (x.dim() - 2)))


@FAST
@given(geometry=geometries(), groups=st.integers(1, 2), use_bias=st.booleans())
def test_randomized_conv_with_keep_prob_one_equals_torch(geometry, groups, use_bias):
    D, size, kernel, stride, padding, dilation = geometry
    x = torch.randn(2, groups * 2, *size, dtype=DTYPE, requires_grad=True)
    weight = torch.randn(groups * 3, 2, *kernel, dtype=DTYPE, requires_grad=True)
    bias = torch.randn(groups * 3, dtype=DTYPE, requires_grad=True) if use_bias else None
    inputs = [t for t in (x, weight, bias) if t is not None]
    ours = randomized_conv(x, weight, bias, stride, padding, dilation, groups, keep_prob=1.0)
    xp, torch_padding = _torch_padded(x, padding)
    expected = TORCH_CONV[D](xp, weight, bias, stride, torch_padding, dilation, groups)
    torch.testing.assert_close(ours, expected, **TOL)
    grad_out = torch.randn_like(expected)
    torch.testing.assert_close(
        torch.autograd.grad(ours, inputs, grad_out),
        torch.autograd.grad(expected, inputs, grad_out),
        **TOL,
    )


@pytest.mark.parametrize("dropout", ["spatial", "batch"])
def test_randomized_conv_weight_grad_is_the_tensor_dropout_estimate(dropout):
    x, grad_out, kernel, kwargs, _ = _weight_grad_problem()
    x = x.clone().requires_grad_(True)
    weight = torch.randn(6, 2, *kernel, dtype=DTYPE, requires_grad=True)
    bias = torch.randn(6, dtype=DTYPE, requires_grad=True)
    generator = torch.Generator().manual_seed(3)
    y = randomized_conv(
        x, weight, bias, **kwargs, keep_prob=0.5, dropout=dropout, generator=generator
    )
    grads = torch.autograd.grad(y, (x, weight, bias), grad_out)
    expected_weight = conv_weight_grad(
        x.detach(),
        grad_out,
        kernel,
        **kwargs,
        keep_prob=0.5,
        dropout=dropout,
        generator=torch.Generator().manual_seed(3),
    )
    y_ref = F.conv2d(x, weight, bias, **kwargs)
    exact = torch.autograd.grad(y_ref, (x, weight, bias), grad_out)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(grads[0], exact[0], **TOL)  # input gradient exact
    torch.testing.assert_close(grads[2], exact[2], **TOL)  # bias gradient exact
    torch.testing.assert_close(grads[1], expected_weight, **TOL)
    assert not torch.allclose(grads[1], exact[1])


def test_randomized_conv_four_spatial_axes():
    x = torch.randn(2, 2, 4, 3, 5, 3, dtype=DTYPE, requires_grad=True)
    weight = torch.randn(3, 2, 2, 1, 3, 2, dtype=DTYPE, requires_grad=True)
    kwargs = dict(stride=(1, 2, 1, 1), padding=[(1, 0), 0, 1, (0, 1)], dilation=(1, 1, 2, 1))
    y = randomized_conv(x, weight, **kwargs, keep_prob=1.0)
    y_ref = conv(x, weight, **kwargs, simplify=False)
    torch.testing.assert_close(y, y_ref, **TOL)
    grad_out = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, (x, weight), grad_out),
        torch.autograd.grad(y_ref, (x, weight), grad_out),
        **TOL,
    )


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Conv1d(2, 3, 4, padding="same", dilation=2),
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        torch.nn.Conv3d(2, 2, (1, 2, 3), padding="valid"),
    ],
    ids=["conv1d-same", "conv2d-groups", "conv3d-valid"],
)
def test_conv_hyperparameters_reproduce_module(layer):
    layer = layer.to(DTYPE)
    D = layer.weight.ndim - 2
    x = torch.randn(2, layer.in_channels, *([7] * D), dtype=DTYPE)
    hyper = conv_hyperparameters(layer)
    kernel = hyper.pop("kernel_size")
    torch.testing.assert_close(conv(x, layer.weight, layer.bias, **hyper), layer(x), **TOL)
    hyper["kernel_size"] = kernel
    pairs = pad_pairs(hyper["padding"], kernel, hyper["dilation"])
    _, expected = reference_factors(
        x, kernel, hyper["stride"], pairs, hyper["dilation"], layer.groups
    )
    ours = kfac_reduce_factor(x, **hyper)
    torch.testing.assert_close(ours, expected[0] if layer.groups == 1 else expected, **TOL)


@pytest.mark.parametrize(
    "layer, message",
    [
        (torch.nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (torch.nn.ConvTranspose2d(1, 1, 3), "ConvTranspose2d"),
        (torch.nn.Linear(2, 2), "Linear"),
    ],
)
def test_conv_hyperparameters_errors(layer, message):
    with pytest.raises(ValueError, match=message):
        conv_hyperparameters(layer)
