r"""The KFAC-expand input factor of a stride-1 convolution from shifted channel products.

With zero padding, stride 1 and dilation :math:`d`, the unfolded input row :math:`(c, k)` of
sample :math:`n` at output position :math:`t` is :math:`x_{n, c, t + d k - p}` (``p`` the left
padding; zero outside the input). The factor's block of kernel offsets :math:`(k, k')`,

.. math::
    A_{(c, k), (c', k')} = \sum_{n, t} x_{n, c, t + dk - p}\, x_{n, c', t + dk' - p}
        = \sum_{s \in W_k} Z^{(\delta)}_{s, c, c'},\qquad
    Z^{(\delta)}_{s} = \sum_n x_{n, :, s}\, x_{n, :, s + \delta}^\top,

depends on the pair only through the shift :math:`\delta = d (k' - k)` and the window
:math:`W_k = [dk - p, dk - p + O)` of output size :math:`O` (per axis, clipped to the input).
So the :math:`K^2` pairs of a :math:`K`-offset kernel need only the
:math:`((2K_1 - 1) \cdots (2K_D - 1) + 1) / 2` shifts with :math:`\delta \ge 0`
lexicographically (the others are transposes): one batched product over the ``S`` input
positions per shift (``[C, N] @ [N, C]`` each), then window sums (small products with 0/1
window matrices). For ``K = 3 x 3`` that is 13 shifts, :math:`13\,S\,C^2 N` multiply-adds
against :math:`81\,T\,C^2 N` (times 5/8 with :func:`curvlab.linalg.gram`'s block triangle) for
the Gram matrix of the unfolded ``[C K, N T]`` input, and the unfolded input is never formed.

The shifted operand is a slice of one flat copy of the input, laid out ``[S', N, C]`` with every
axis but the first padded on the right by its largest shift, so that a shift is a flat offset
and positions pushed past an edge read zeros.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

MIN_CHANNELS = 16
"""Fewest input channels (per group) for which the shifted products beat the Gram matrix (the
``[C, N] @ [N, C]`` products of a 3-channel input are too small to run at speed)."""


def shifted_products_apply(
    in_channels: int, groups: int, stride: Sequence[int], kernel_size: Sequence[int]
) -> bool:
    """Whether :func:`expand_input_sum` applies and is expected to be the faster route."""
    return (
        groups == 1
        and all(s == 1 for s in stride)
        and in_channels >= MIN_CHANNELS
        and math.prod(kernel_size) > 1
    )


def _shifts(kernel_size: Sequence[int]) -> list[tuple[int, ...]]:
    r"""Offset differences :math:`j = k' - k` with :math:`j \ge 0` lexicographically."""
    ranges = [range(-(k - 1), k) for k in kernel_size]
    return [j for j in itertools.product(*ranges) if j >= (0,) * len(j)]


def _windows(size: int, kernel: int, dilation: int, left: int, output: int, like: Tensor) -> Tensor:
    """0/1 window matrix ``[K, I]`` of one axis.

    Row ``k`` marks the input positions :math:`[dk - p, dk - p + O)`, clipped to ``[0, I)``.
    """
    positions = torch.arange(size, device=like.device)
    starts = torch.arange(kernel, device=like.device) * dilation - left
    inside = (positions[None] >= starts[:, None]) & (positions[None] < starts[:, None] + output)
    return inside.to(like.dtype)


def _cells(windows: Tensor) -> tuple[list[tuple[int, int]], Tensor]:
    """The coarsest intervals on which every window ``[K, I]`` is constant, and ``[K, cells]``."""
    size = windows.shape[1]
    edges = [0, *[i for i in range(1, size) if not torch.equal(windows[:, i], windows[:, i - 1])]]
    cells = list(zip(edges, [*edges[1:], size], strict=True))
    return cells, windows[:, [a for a, _ in cells]]


def expand_input_sum(
    x: Tensor,
    kernel_size: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int],
) -> Tensor:
    r""":math:`\sum_{n,t} u_{nt} u_{nt}^\top` of a stride-1, zero-padded, ungrouped convolution.

    Per shift, one batched product per interval ("cell") of the last axis on which every window
    is constant, batched over the other axes' positions: ``[C, R N] @ [R N, C]`` for a cell of
    ``R`` positions; then window sums over the cells and the other axes.

    Args:
        x: Input ``[N, C, I_1, ..., I_D]``.
        kernel_size: :math:`K_a` per spatial axis.
        padding: ``(left, right)`` zero padding per axis (:func:`curvlab.nn.einconv.padding_pairs`).
        dilation: :math:`d_a` per axis.

    Returns:
        ``[C K, C K]`` with ``K = prod(kernel_size)``, row index ``c * K + k`` (the order of
        ``weight.flatten(1)``), equal to the Gram matrix of the unfolded input.

    Raises:
        ValueError: If the padded input is smaller than the kernel.
    """
    n, c, *spatial = x.shape
    ndim = len(spatial)
    outputs = [
        spatial[a] + sum(padding[a]) - dilation[a] * (kernel_size[a] - 1) for a in range(ndim)
    ]
    if any(o <= 0 for o in outputs):
        raise ValueError(f"expand_input_sum: input {tuple(x.shape)} smaller than the kernel")
    reach = [dilation[a] * (kernel_size[a] - 1) for a in range(ndim)]
    # one zeroed buffer: a margin, the input as [I_1, I_2 + r_2, ..., N, C] (every axis but the
    # first padded on the right by its reach), a margin
    padded = [spatial[0], *[spatial[a] + reach[a] for a in range(1, ndim)]]
    flat_strides = [math.prod(padded[a + 1 :]) for a in range(ndim)]
    margin = sum(r * s for r, s in zip(reach, flat_strides, strict=True))
    flat = x.new_zeros((2 * margin + math.prod(padded)) * n * c)
    interior = flat[margin * n * c : (margin + math.prod(padded)) * n * c].view(*padded, n, c)
    for a in range(1, ndim):
        interior = interior.narrow(a, 0, spatial[a])
    interior.copy_(x.permute(*range(2, 2 + ndim), 0, 1))
    rows = math.prod(padded[:-1])  # every position of the leading axes (padding included)
    windows = [
        _windows(spatial[a], kernel_size[a], dilation[a], padding[a][0], outputs[a], x)
        for a in range(ndim)
    ]
    cells, cell_windows = _cells(windows[-1])
    lead_windows = x.new_ones(1, 1)  # [K_1 ... K_{D-1}, rows]: Kronecker product of windows
    for a in range(ndim - 1):
        wide = windows[a].new_zeros(kernel_size[a], padded[a])
        wide[:, : spatial[a]] = windows[a]
        lead_windows = torch.kron(lead_windows, wide)
    row_stride = padded[-1] * n * c

    def operand(position: int, length: int) -> Tensor:  # [rows, length * N, C]
        return flat.as_strided((rows, length * n, c), (row_stride, c, 1), position * n * c)

    per_cell = x.new_empty(len(cells), rows, c, c)
    kernel = math.prod(kernel_size)
    blocks = x.new_zeros(*kernel_size, *kernel_size, c, c)
    offsets = list(itertools.product(*[range(k) for k in kernel_size]))
    for shift in _shifts(kernel_size):
        step = sum(j * d * s for j, d, s in zip(shift, dilation, flat_strides, strict=True))
        for i, (lo, hi) in enumerate(cells):
            first = operand(margin + lo, hi - lo).transpose(1, 2)
            torch.bmm(first, operand(margin + lo + step, hi - lo), out=per_cell[i])
        lead = torch.matmul(lead_windows, per_cell.view(len(cells), rows, c * c))
        summed = torch.tensordot(cell_windows, lead, dims=([1], [0]))  # [K_D, K_lead, C C]
        summed = summed.view(kernel_size[-1], *kernel_size[:-1], c, c).movedim(0, ndim - 1)
        for k in offsets:
            k2 = tuple(ki + ji for ki, ji in zip(k, shift, strict=True))
            if not all(0 <= v < size for v, size in zip(k2, kernel_size, strict=True)):
                continue
            blocks[(*k, *k2)] = summed[k]
            if k2 != k:
                blocks[(*k2, *k)] = summed[k].T
    blocks = blocks.reshape(kernel, kernel, c, c)
    return blocks.permute(2, 0, 3, 1).reshape(c * kernel, c * kernel)
