r"""Rule for ``nn.ConvTranspose1d/2d/3d`` (any stride, padding, output padding, dilation, groups).

A transposed convolution ``y = conv_transpose(x, W)`` with weight ``[in, out / G, *K]`` sends
input pixel ``j`` to output pixels :math:`q = j s - p + k d`. Two linear views follow.

* *Output side* (derivatives): the weight gradient of one sample is
  :math:`\partial_{W_{c o k}} = \sum_j x_{c j}\, v_{(o, k), j}` with :math:`v` the output gradient
  *unfolded* by the forward convolution's hyperparameters ``(K, s, p, d)``: ``[out * K, J]``
  for the ``J`` input pixels. Per-sample gradients, squares and norms are those of a linear
  layer with inputs ``x`` and "output gradients" ``v`` per pixel ``j``.
* *Input side* (Kronecker factors): :math:`y_{o q} = \sum_{c, k} W_{c o k}\, \tilde x_{(c, k), q}`
  with :math:`\tilde x` the input spread onto the output grid by a transposed convolution with
  one-hot kernels, ``[in * K, Q]``. With the weight of group ``g`` viewed as the matrix
  ``[out / G, in / G * K]`` (``W.unflatten(0, (G, -1)).transpose(1, 2).flatten(2)``), KFAC
  factors are those of a linear layer with inputs :math:`\tilde x` at the ``Q`` output pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.backprop.rules.base import Call, KronSums, Rule
from curvlab.backprop.rules.conv import (
    CHUNK_ELEMENTS,
    channel_gram,
    chunked_sq_norms,
    chunked_squares,
    grouped_output_sum,
)
from curvlab.linalg.gram import gram
from curvlab.nn import einconv

ConvT = nn.modules.conv._ConvTransposeNd


def unfold_output_grad(module: ConvT, factor: Tensor, in_size: tuple[int, ...]) -> Tensor:
    """The output-side patches :math:`v`: ``[B, out, *out_size]`` -> ``[B, out * K, J]``.

    The gradient is padded by ``p`` in front and padded or cropped at the end to the
    ``(J - 1) s + (K - 1) d + 1`` pixels that input pixels ``0..J-1`` reach, then unfolded
    without padding, so output padding (extra pixels at the end) is handled exactly.
    """
    pad = []
    for dim in reversed(range(len(in_size))):
        stride, dilation = module.stride[dim], module.dilation[dim]
        needed = (in_size[dim] - 1) * stride + (module.kernel_size[dim] - 1) * dilation + 1
        front = module.padding[dim]
        pad += [front, needed - front - factor.shape[2 + dim]]
    padded = F.pad(factor, pad)
    return einconv.unfold(
        padded, module.kernel_size, stride=module.stride, padding=0, dilation=module.dilation
    )


def spread_input(module: ConvT, x: Tensor, out_size: tuple[int, ...]) -> Tensor:
    r"""The input-side patches :math:`\tilde x`: ``[N, in, *in_size]`` -> ``[N, in * K, Q]``."""
    d = len(module.kernel_size)
    k = math.prod(module.kernel_size)
    c_in = x.shape[1]
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *module.kernel_size)
    one_hot = eye.transpose(0, 1).repeat(c_in, *[1] * (d + 1))  # [in, K, *kernel_size]
    spread = einconv.conv_transpose_to_size(
        x, one_hot, out_size, module.stride, module.padding, module.dilation, groups=c_in
    )
    return spread.flatten(start_dim=2)


def _inputs(module: ConvT, call: Call) -> Tensor:
    """Input as ``[N, G, in / G, J]``."""
    x = call.args[0]
    return x.reshape(x.shape[0], module.groups, -1, math.prod(x.shape[2:]))


def _patches(module: ConvT, call: Call, factor: Tensor) -> Tensor:
    """Output-side patches of factor ``[M, n, out, *out_size]`` as ``[M, n, G, out / G * K, J]``."""
    m, n = factor.shape[:2]
    v = unfold_output_grad(module, factor.flatten(end_dim=1), tuple(call.args[0].shape[2:]))
    return v.reshape(m, n, module.groups, -1, v.shape[-1])


def _sample_chunks(
    module: ConvT, call: Call, factor: Tensor, extra: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Inputs ``[n, G, in/G, J]`` and patches ``[M, n, G, out/G * K, J]`` by chunks of samples."""
    x = _inputs(module, call)
    m, n = factor.shape[:2]
    per_sample = m * module.out_channels * math.prod(module.kernel_size) * x.shape[-1] + extra
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    for s in range(0, n, step):
        chunk = Call(args=(call.args[0][s : s + step],))
        yield x[s : s + step], _patches(module, chunk, factor[:, s : s + step])


class ConvTransposeRule(Rule):
    """Derivatives of ``nn.ConvTranspose1d/2d/3d`` (see the module docstring)."""

    linear_in_input = True
    kronecker = True
    kron_kind = "transposed"

    @staticmethod
    def _check(module: ConvT, call: Call) -> None:
        if module.padding_mode != "zeros":  # torch allows only zeros; guard subclasses
            raise NotImplementedError(f"padding_mode={module.padding_mode!r}")

    def jac_t(  # noqa: D102
        self, module: ConvT, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        self._check(module, call)
        f = factors[0]
        m, n = f.shape[:2]
        out = {}
        if "weight" in names:
            w = torch.einsum("ngij,mngaj->mngia", _inputs(module, call), _patches(module, call, f))
            out["weight"] = w.reshape(m, n, *module.weight.shape)
        if "bias" in names:
            out["bias"] = f.flatten(start_dim=3).sum(-1)
        return out

    def sum_jac_t(  # noqa: D102
        self, module: ConvT, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        self._check(module, call)
        f = factors[0]
        m = f.shape[0]
        out = {}
        if "weight" in names:
            w = torch.einsum("ngij,mngaj->mgia", _inputs(module, call), _patches(module, call, f))
            out["weight"] = w.reshape(m, *module.weight.shape)
        if "bias" in names:
            out["bias"] = f.flatten(start_dim=3).sum((1, -1))
        return out

    def sum_sq_jac_t(  # noqa: D102
        self,
        module: ConvT,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        per_sample: bool,
    ) -> dict[str, Tensor]:
        self._check(module, call)
        f = factors[0]
        m = f.shape[0]
        out = {}
        if "weight" in names:
            chunks = _sample_chunks(module, call, f, m * module.weight.numel())
            out["weight"] = chunked_squares(chunks, module.weight.shape, per_sample, True)
        if "bias" in names:
            sq = f.flatten(start_dim=3).sum(-1).square().sum(0)
            out["bias"] = sq if per_sample else sq.sum(0)
        return out

    def sq_norm_jac_t(  # noqa: D102
        self, module: ConvT, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        self._check(module, call)
        f = factors[0]
        m = f.shape[0]
        out = {}
        if "weight" in names:
            g = module.groups
            i = module.in_channels // g
            a = module.out_channels // g * math.prod(module.kernel_size)
            j = math.prod(call.args[0].shape[2:])  # positions: input pixels
            out["weight"] = chunked_sq_norms(
                lambda extra: _sample_chunks(module, call, f, extra), m, g, i, a, j
            )
        if "bias" in names:
            out["bias"] = f.flatten(start_dim=3).sum(-1).square().sum(-1)
        return out

    def kron_sums(  # noqa: D102
        self,
        module: ConvT,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        approx: str = "expand",
    ) -> dict[str, KronSums]:
        self._check(module, call)
        x, f = call.args[0], factors[0]
        m, n = f.shape[:2]
        out_size = tuple(f.shape[3:])
        g, t = module.groups, math.prod(out_size)
        flat = f.reshape(m * n, module.out_channels, t)
        summed = None  # position-summed output factor: reduce, and the bias's exact block
        if approx == "reduce" or "bias" in names:
            summed = gram(flat.sum(-1).T)
        out = {}
        if "weight" in names:
            input_sum, total = 0, 0
            step = max(
                1, CHUNK_ELEMENTS // max(1, module.in_channels * module.weight[0, 0].numel() * t)
            )
            for start in range(0, n, step):
                u = spread_input(module, x[start : start + step], out_size)  # [n, in * K, Q]
                if approx == "reduce":
                    u = u.mean(-1, keepdim=True)
                u = u.reshape(u.shape[0], g, -1, u.shape[-1]).permute(1, 2, 0, 3).flatten(2)
                input_sum = input_sum + gram(u)  # [G, in/G * K, in/G * K]
                total = total + u.sum(-1)
            count = n if approx == "reduce" else n * t
            output_sum = summed if approx == "reduce" else channel_gram(flat)  # [out, out]
            if g == 1:
                weight = KronSums(input_sum[0], count, output_sum, total[0])
            else:
                weight = KronSums(input_sum, count, grouped_output_sum(output_sum, g), total)
            out["weight"] = weight
        if "bias" in names:
            out["bias"] = KronSums(None, n if approx == "reduce" else n * t, summed)
        return out
