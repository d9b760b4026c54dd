r"""Convolutions of any number of spatial dimensions as einsum contractions (capability C9).

A convolution connects input pixel :math:`i`, output pixel :math:`o` and kernel tap :math:`k` of one
spatial axis through a binary *index pattern*

.. math::

    \Pi_{o, i, k} = [\, i = o s + k d - p_\text{left} \,] \in \{0, 1\}^{O \times I \times K},

with stride :math:`s`, dilation :math:`d` and left padding :math:`p_\text{left}` (padded pixels are
zero, so they simply have no :math:`i`). A convolution with :math:`N` spatial axes and :math:`G`
groups is then one tensor-network contraction

.. math::

    Y_{n, g, e, o_1 \dots o_N} = \sum_{c, i_\cdot, k_\cdot} X_{n, g, c, i_1 \dots i_N}
    \Pi^{(1)}_{o_1, i_1, k_1} \cdots \Pi^{(N)}_{o_N, i_N, k_N} W_{g, e, c, k_1 \dots k_N},

evaluated with an `opt_einsum <https://github.com/dgasmith/opt_einsum>`_ contraction path that is
cached per operand shapes (patterns are cached too). The same patterns give the unfolded input
(im2col), the KFAC-expand and KFAC-reduce input-side Kronecker factors, the input and weight
gradients, and randomized (tensor-dropout) sub-sampling of a summed index of the weight gradient.

Public functions (stable API; ``curvlab.backprop`` may import them):

* :func:`conv`, :func:`unfold`, :func:`index_pattern` -- forward convolution, im2col, patterns;
* :func:`kfac_expand_factor`, :func:`kfac_reduce_factor` -- input-side KFAC factors;
* :func:`conv_input_grad`, :func:`conv_weight_grad` -- VJPs (the latter with tensor dropout);
* :func:`randomized_conv` -- a differentiable convolution whose weight gradient is sub-sampled;
* :func:`conv_hyperparameters` -- the keyword arguments of an ``nn.Conv1d/2d/3d`` layer.

Conventions (see also ``docs/einconv.md``):

* ``x`` is ``[N, C_in, I_1, ..., I_D]``, ``weight`` is ``[C_out, C_in / G, K_1, ..., K_D]``, as in
  :func:`torch.nn.functional.conv2d`; ``D`` (the number of spatial axes) is any positive integer.
* The unfolded input column :math:`u_{n, o} \in \mathbb{R}^{C_\text{in} / G \cdot \prod K}` of group
  :math:`g` is ordered like ``weight.flatten(1)`` (input channel major, then kernel taps row-major),
  so that the layer is :math:`y_{n, :, o} = W_\text{mat} u_{n, o} + b` with
  ``W_mat = weight.flatten(1)`` (per group). The KFAC factors below are the input-side factor
  :math:`A` of that matrix view, in the MISSION.md convention :math:`A \otimes B` over the
  column-major ``vec`` of ``W_mat``.
* Simplifications (``simplify=True``, the default): where an axis has no padding and its kernel
  windows do not overlap (stride at least the dilated kernel extent, or a single output pixel,
  e.g. a dense or a patchify/down-sampling convolution), its pattern is replaced by a strided view
  of the input (a reshape; unused pixels are dropped): no pattern, no contraction. This is what
  the KFAC-reduce factor and the weight gradient use. The forward convolution, the unfold and the
  KFAC-expand factor, which materialize every window anyway, go one step further and evaluate
  every pattern contraction :math:`\sum_i X_i \Pi_{o, i, k} = X^\text{padded}_{o s + k d}` by
  indexing (zero padding plus strided windows, i.e. im2col) rather than by a product with the
  0/1 pattern; ``simplify=False`` contracts the dense patterns everywhere (tested equal).
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import opt_einsum
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from curvlab.linalg.gram import gram

__all__ = [
    "Padding",
    "conv",
    "conv_hyperparameters",
    "conv_input_grad",
    "conv_transpose_to_size",
    "conv_weight_grad",
    "index_pattern",
    "kfac_expand_factor",
    "kfac_reduce_factor",
    "pad_amounts",
    "pad_explicitly",
    "padding_pairs",
    "randomized_conv",
    "unfold",
]

Padding = int | str | Sequence[int | tuple[int, int]]
"""Padding as accepted here: an int (all axes, both sides), ``'valid'`` (none), ``'same'`` (output
size equals input size; stride 1 only, extra pixel on the right as in torch), or one entry per
spatial axis that is an int (both sides) or a ``(left, right)`` pair."""

IntOrSeq = int | Sequence[int]


# ------------------------------------------------------------------------------------------------
# Geometry of one spatial axis
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """Hyperparameters of one spatial axis of a convolution (validated)."""

    input_size: int
    kernel_size: int
    stride: int
    padding: tuple[int, int]
    dilation: int

    @property
    def span(self) -> int:
        """Extent of one dilated kernel window, :math:`d (K - 1) + 1`."""
        return self.dilation * (self.kernel_size - 1) + 1

    @property
    def output_size(self) -> int:
        r""":math:`O = \lfloor (I + p_l + p_r - d (K - 1) - 1) / s \rfloor + 1`."""
        return (self.input_size + sum(self.padding) - self.span) // self.stride + 1

    @property
    def is_reshape(self) -> bool:
        """Whether the pattern is a strided view of the input (no padding, no window overlap)."""
        return self.padding == (0, 0) and (self.stride >= self.span or self.output_size == 1)


def _as_tuple(value: IntOrSeq, ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` axes or check that a sequence has one entry per axis."""
    if isinstance(value, int):
        return (value,) * ndim
    values = tuple(value)
    if len(values) != ndim or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name}={value!r}: expected an int or {ndim} ints (one per spatial axis)")
    return values


def padding_pairs(
    padding: Padding,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Resolve ``padding`` to one ``(left, right)`` pair per spatial axis.

    The one normalization of a convolution's padding (also for ``torch.nn`` modules: pass their
    ``padding``, ``kernel_size``, ``stride`` and ``dilation``). ``'same'`` pads
    :math:`d (K - 1)` in total per axis, the extra pixel on the right, as torch does.

    Args:
        padding: See :data:`Padding`.
        kernel_size: One per spatial axis.
        stride: One per spatial axis.
        dilation: One per spatial axis.

    Returns:
        ``((left, right), ...)``, one pair per spatial axis.

    Raises:
        ValueError: For a malformed ``padding``, or ``'same'`` with a stride other than 1.
    """
    ndim = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * ndim
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"padding='same' needs stride 1 on every axis, got stride={stride}"
                )
            pairs = []
            for k, d in zip(kernel_size, dilation, strict=True):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise ValueError(f"padding={padding!r}: expected an int, a sequence, 'valid' or 'same'")
    if isinstance(padding, int):
        return ((padding, padding),) * ndim
    entries = tuple(padding)
    if len(entries) != ndim:
        raise ValueError(f"padding={padding!r}: expected {ndim} entries (one per spatial axis)")
    pairs = []
    for p in entries:
        pair = (p, p) if isinstance(p, int) else tuple(p)
        if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
            raise ValueError(
                f"padding={padding!r}: each entry must be an int or a (left, right) pair"
            )
        pairs.append(pair)
    return tuple(pairs)


def _axes(
    input_size: Sequence[int],
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: Padding,
    dilation: IntOrSeq,
) -> tuple[_Axis, ...]:
    """Validate the hyperparameters and return the geometry of every spatial axis."""
    ndim = len(input_size)
    kernel = _as_tuple(kernel_size, ndim, "kernel_size")
    strides = _as_tuple(stride, ndim, "stride")
    dilations = _as_tuple(dilation, ndim, "dilation")
    pads = padding_pairs(padding, kernel, strides, dilations)
    for name, values, low in (
        ("kernel_size", kernel, 1),
        ("stride", strides, 1),
        ("dilation", dilations, 1),
    ):
        if any(v < low for v in values):
            raise ValueError(f"{name}={values}: every entry must be >= {low}")
    if any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"padding={pads}: every entry must be >= 0")
    axes = tuple(
        _Axis(int(i), k, s, p, d)
        for i, k, s, p, d in zip(input_size, kernel, strides, pads, dilations, strict=True)
    )
    for a, ax in enumerate(axes):
        if ax.output_size < 1:
            raise ValueError(
                f"spatial axis {a}: input size {ax.input_size} with padding {ax.padding} is "
                f"smaller than the dilated kernel extent {ax.span} (kernel_size={ax.kernel_size}, "
                f"dilation={ax.dilation}); the output would be empty"
            )
    return axes


# ------------------------------------------------------------------------------------------------
# Index patterns
# ------------------------------------------------------------------------------------------------


def index_pattern(
    input_size: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Return the index pattern of one spatial axis of a convolution.

    .. math::

        \Pi_{o, i, k} = 1 \iff i = o s + k d - p_\text{left}
        \quad (0 \le o < O,\ 0 \le i < I,\ 0 \le k < K),

    with :math:`O = \lfloor (I + p_\text{left} + p_\text{right} - d (K - 1) - 1) / s \rfloor + 1`.
    Taps that fall into the zero padding have no :math:`i` and hence no entry.

    Args:
        input_size: Input size :math:`I` of the axis.
        kernel_size: Kernel size :math:`K`.
        stride: Stride :math:`s`.
        padding: An int (both sides), a ``(left, right)`` pair, ``'valid'`` or ``'same'``
            (stride 1 only; the odd pixel goes to the right, as in torch).
        dilation: Dilation :math:`d`.
        dtype: Data type of the result.
        device: Device of the result.

    Returns:
        The pattern, ``[O, I, K]``.

    Raises:
        ValueError: If a hyperparameter is out of range or the output would be empty.
    """
    pad = padding if isinstance(padding, str) else [padding]
    (axis,) = _axes([input_size], kernel_size, stride, pad, dilation)
    return _build_pattern(axis, dtype, torch.device(device) if device is not None else None)


def _build_pattern(axis: _Axis, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    r"""Materialize :math:`\Pi` of one axis, ``[O, I, K]``."""
    O, I, K = axis.output_size, axis.input_size, axis.kernel_size
    o = torch.arange(O, device=device).unsqueeze(1)
    k = torch.arange(K, device=device).unsqueeze(0)
    i = o * axis.stride + k * axis.dilation - axis.padding[0]
    valid = (i >= 0) & (i < I)
    o, k = o.expand(O, K), k.expand(O, K)
    pattern = torch.zeros(O, I, K, dtype=dtype, device=device)
    pattern[o[valid], i[valid], k[valid]] = 1
    return pattern


@functools.lru_cache(maxsize=256)
def _cached_pattern(axis: _Axis, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""Cached :math:`\Pi` of one axis, ``[O, I, K]`` (read-only: never modify the result)."""
    return _build_pattern(axis, dtype, device)


@functools.lru_cache(maxsize=256)
def _cached_pattern_sum(axis: _Axis, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""Cached :math:`\sum_o \Pi_{o, i, k}` of one axis, ``[I, K]`` (read-only)."""
    return _build_pattern(axis, dtype, device).sum(0)


# ------------------------------------------------------------------------------------------------
# Einsum plumbing
# ------------------------------------------------------------------------------------------------


class _Symbols:
    """Hands out distinct einsum index letters."""

    def __init__(self) -> None:
        self._letters = iter(string.ascii_letters)

    def __call__(self) -> str:
        try:
            return next(self._letters)
        except StopIteration:
            raise ValueError(
                "too many spatial axes for einsum (at most 16 are supported)"
            ) from None


@functools.lru_cache(maxsize=1024)
def _expression(equation: str, *shapes: tuple[int, ...]) -> opt_einsum.contract.ContractExpression:
    """Cached opt_einsum contraction expression for ``equation`` on operands of ``shapes``."""
    return opt_einsum.contract_expression(equation, *shapes, optimize="auto", use_blas=False)


@functools.lru_cache(maxsize=1024)
def _path(equation: str, *shapes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Cached opt_einsum contraction path (pairs of operand positions) for ``shapes``."""
    path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="auto")
    return path


def _contract(
    equation: str, *operands: Tensor, path_shapes: Sequence[tuple[int, ...]] | None = None
) -> Tensor:
    """Evaluate ``equation`` on ``operands`` along an opt_einsum path.

    By default the whole contraction expression is cached per operand shapes. With
    ``path_shapes``, the path is planned (and cached) for operands of those shapes and reused for
    the actual operands, whose sizes may differ (e.g. randomly sub-sampled indices).
    """
    if path_shapes is None:
        expression = _expression(equation, *(tuple(op.shape) for op in operands))
        return expression(*operands, backend="torch")
    path = _path(equation, *(tuple(s) for s in path_shapes))
    return opt_einsum.contract(equation, *operands, optimize=path, backend="torch", use_blas=False)


@dataclass
class _Network:
    """The input side of a convolution's tensor network.

    ``operands[0]`` is the (possibly reshaped) input; its index string is ``subscripts[0]``. For an
    axis with a pattern, the input carries ``i`` and a pattern ``[O, I, K]`` with indices ``o i k``
    follows; for a reshaped axis the input carries ``o k`` directly.
    """

    operands: list[Tensor]
    subscripts: list[str]
    out_letters: list[str]
    kernel_letters: list[str]


def _window_view(x: Tensor, dim: int, axis: _Axis) -> Tensor:
    """Replace axis ``dim`` of ``x`` (size I) by ``[O, K]`` windows, a strided view (no padding)."""
    windows = x.unfold(dim, axis.span, axis.stride)  # [..., O, ..., span]
    windows = windows.narrow(dim, 0, axis.output_size).movedim(-1, dim + 1)
    if axis.dilation > 1:
        index = (slice(None),) * (dim + 1) + (slice(None, None, axis.dilation),)
        windows = windows[index]
    return windows


def _input_network(
    x: Tensor,
    axes: tuple[_Axis, ...],
    lead: str,
    symbols: _Symbols,
    simplify: bool,
    summed: bool = False,
    gather: bool = False,
) -> _Network:
    r"""Build the input side of the network for ``x`` of shape ``[*lead, I_1, ..., I_D]``.

    Args:
        x: Input whose leading ``len(lead)`` axes are non-spatial.
        axes: Geometry of the spatial axes.
        lead: Index letters of the leading axes.
        symbols: Letter source for the spatial indices.
        simplify: Whether to replace patterns of non-overlapping axes by strided views.
        summed: If ``True``, patterns are summed over the output index (``[I, K]``) and reshaped
            axes are summed over their output axis, so the network carries no output index.
        gather: If ``True`` (and not ``summed``), contract every pattern by indexing instead of
            multiplying: zero-pad ``x`` and take its windows as a strided view ``[O, K]`` per
            axis, since :math:`\sum_i X_i \Pi_{o, i, k} = X^\text{padded}_{o s + k d}`. The
            contraction then copies each input entry once per window (im2col) instead of
            multiplying by a 0/1 matrix.
    """
    if gather and not summed:
        if any(a.padding != (0, 0) for a in axes):
            x = F.pad(x, pad_amounts([a.padding for a in axes]))
            axes = tuple(
                _Axis(a.input_size + sum(a.padding), a.kernel_size, a.stride, (0, 0), a.dilation)
                for a in axes
            )
    subscript, operands, sub_ops, outs, kernels = lead, [], [], [], []
    dim = len(lead)
    for axis in axes:
        o, k = symbols(), symbols()
        outs.append(o)
        kernels.append(k)
        if (simplify and axis.is_reshape) or (gather and not summed):
            x = _window_view(x, dim, axis)
            if summed:
                x = x.sum(dim)
                subscript += k
                dim += 1
            else:
                subscript += o + k
                dim += 2
        else:
            i = symbols()
            subscript += i
            dim += 1
            if summed:
                operands.append(_cached_pattern_sum(axis, x.dtype, x.device))
                sub_ops.append(i + k)
            else:
                operands.append(_cached_pattern(axis, x.dtype, x.device))
                sub_ops.append(o + i + k)
    return _Network([x, *operands], [subscript, *sub_ops], outs, kernels)


# ------------------------------------------------------------------------------------------------
# Validation helpers
# ------------------------------------------------------------------------------------------------


def _check_input(x: Tensor, name: str = "x") -> None:
    if x.ndim < 3:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: expected [N, C, I_1, ..., I_D] with D >= 1 "
            "spatial axes"
        )


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    return reduction


def _check_groups(x: Tensor, groups: int) -> None:
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups != 0:
        raise ValueError(
            f"x has shape {tuple(x.shape)}: its {x.shape[1]} channels are not divisible by "
            f"groups={groups}"
        )


# ------------------------------------------------------------------------------------------------
# Public operations
# ------------------------------------------------------------------------------------------------


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    simplify: bool = True,
) -> Tensor:
    r"""Convolve ``x`` with ``weight`` as one einsum; equals ``torch.nn.functional.conv{D}d``.

    .. math::

        Y_{n, (g, e), o_1 \dots o_D} = b_{(g, e)} + \sum_{c, i_\cdot, k_\cdot}
        X_{n, (g, c), i_1 \dots i_D} \prod_{a=1}^{D} \Pi^{(a)}_{o_a, i_a, k_a}
        W_{(g, e), c, k_1 \dots k_D}.

    Args:
        x: Input, ``[N, C_in, I_1, ..., I_D]`` with any ``D >= 1`` (at most 16).
        weight: Kernel, ``[C_out, C_in / groups, K_1, ..., K_D]``.
        bias: Optional bias, ``[C_out]``.
        stride: Stride, an int or one per axis.
        padding: Zero padding (see :data:`Padding`): int, per-axis ints or ``(left, right)`` pairs,
            ``'valid'`` or ``'same'``.
        dilation: Dilation, an int or one per axis.
        groups: Number of groups :math:`G`; divides ``C_in`` and ``C_out``.
        simplify: Evaluate each pattern contraction by indexing: zero-pad ``x`` and take its
            windows as a strided view (im2col), instead of a product with the 0/1 pattern;
            ``False`` contracts the dense patterns (same result).

    Returns:
        Output, ``[N, C_out, O_1, ..., O_D]``.

    Raises:
        ValueError: If a shape or hyperparameter is inconsistent (the message names it).
    """
    _check_input(x)
    _check_groups(x, groups)
    if weight.ndim != x.ndim:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}: expected {x.ndim} axes "
            f"[C_out, C_in / groups, K_1, ..., K_{x.ndim - 2}] to match x of shape {tuple(x.shape)}"
        )
    C_out, C_in = weight.shape[0], x.shape[1]
    if weight.shape[1] * groups != C_in or C_out % groups != 0:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}: expected [C_out, {C_in // groups}, ...] with "
            f"C_out divisible by groups={groups} for x with {C_in} channels"
        )
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}: expected ({C_out},)")
    axes = _axes(x.shape[2:], tuple(weight.shape[2:]), stride, padding, dilation)

    symbols = _Symbols()
    n, g, c, e = symbols(), symbols(), symbols(), symbols()
    grouped = x.unflatten(1, (groups, C_in // groups))
    net = _input_network(grouped, axes, n + g + c, symbols, simplify, gather=simplify)
    w = weight.unflatten(0, (groups, C_out // groups))
    w_sub = g + e + c + "".join(net.kernel_letters)
    out_sub = n + g + e + "".join(net.out_letters)
    equation = ",".join([*net.subscripts, w_sub]) + "->" + out_sub
    y = _contract(equation, *net.operands, w).flatten(1, 2)
    if bias is not None:
        y = y + bias.reshape(C_out, *([1] * len(axes)))
    return y


def unfold(
    x: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    *,
    simplify: bool = True,
) -> Tensor:
    r"""Unfold (im2col) ``x`` by einsum; equals :func:`torch.nn.functional.unfold` for ``D = 2``.

    .. math::

        U_{n, (c, k_1 \dots k_D), (o_1 \dots o_D)} = \sum_{i_\cdot} X_{n, c, i_1 \dots i_D}
        \prod_{a=1}^{D} \Pi^{(a)}_{o_a, i_a, k_a}.

    Args:
        x: Input, ``[N, C, I_1, ..., I_D]`` with any ``D >= 1``.
        kernel_size: Kernel size, an int or one per axis.
        stride: Stride, an int or one per axis.
        padding: Zero padding (see :data:`Padding`).
        dilation: Dilation, an int or one per axis.
        simplify: Evaluate each pattern contraction by indexing: zero-pad ``x`` and take its
            windows as a strided view (im2col), instead of a product with the 0/1 pattern;
            ``False`` contracts the dense patterns (same result).

    Returns:
        Unfolded input, ``[N, C * K_1 * ... * K_D, O_1 * ... * O_D]`` (channel major, then kernel
        taps row-major; output pixels row-major), the layout of ``F.unfold``.
    """
    _check_input(x)
    axes = _axes(x.shape[2:], kernel_size, stride, padding, dilation)
    return _unfold_grouped(x, axes, 1, simplify).squeeze(1)


def _unfold_grouped(x: Tensor, axes: tuple[_Axis, ...], groups: int, simplify: bool) -> Tensor:
    """Unfolded input per group, ``[N, G, C_in / G * prod(K), prod(O)]``."""
    symbols = _Symbols()
    n, g, c = symbols(), symbols(), symbols()
    grouped = x.unflatten(1, (groups, x.shape[1] // groups))
    net = _input_network(grouped, axes, n + g + c, symbols, simplify, gather=simplify)
    out_sub = n + g + c + "".join(net.kernel_letters) + "".join(net.out_letters)
    equation = ",".join(net.subscripts) + "->" + out_sub
    u = _contract(equation, *net.operands)
    ndim = len(axes)
    # u is [N, G, C, K_1..K_D, O_1..O_D]
    return u.flatten(3 + ndim, 2 + 2 * ndim).flatten(2, 2 + ndim)


def kfac_expand_factor(
    x: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    simplify: bool = True,
) -> Tensor:
    r"""KFAC-expand (KFC) input-side Kronecker factor of a convolution's weight, by einsum.

    With :math:`u_{n, o}` the unfolded input column of sample :math:`n` at output pixel :math:`o`
    (of one group; see the module docstring for its order), :math:`P = \prod_a O_a` output pixels:

    .. math::

        A = \frac{1}{N P} \sum_{n=1}^{N} \sum_{o=1}^{P} u_{n, o} u_{n, o}^\top,

    i.e. :math:`A = \mathbb{E}[u u^\top]` over the :math:`N P` rows that the weight sees, the
    input-side factor of ``weight.flatten(1)`` treated as a linear layer with output pixels
    expanded into the batch. The unfolded input is contracted once from the patterns (never by
    ``F.unfold``), then its Gram matrix is formed.

    Args:
        x: Layer input, ``[N, C_in, I_1, ..., I_D]``.
        kernel_size: Kernel size, an int or one per axis.
        stride: Stride, an int or one per axis.
        padding: Zero padding (see :data:`Padding`).
        dilation: Dilation, an int or one per axis.
        groups: Number of groups :math:`G` (one factor per group).
        reduction: ``"mean"`` for :math:`A` as above, ``"sum"`` for the unnormalized sum
            (times :math:`N P` for KFAC-expand, :math:`N` for KFAC-reduce).
        simplify: Evaluate each pattern contraction by indexing: zero-pad ``x`` and take its
            windows as a strided view (im2col), instead of a product with the 0/1 pattern;
            ``False`` contracts the dense patterns (same result).

    Returns:
        ``[C_in * prod(K), C_in * prod(K)]`` if ``groups == 1``, else one factor per group,
        ``[G, C_in / G * prod(K), C_in / G * prod(K)]``.
    """
    _check_input(x)
    _check_groups(x, groups)
    axes = _axes(x.shape[2:], kernel_size, stride, padding, dilation)
    # Unfold straight into the layout [G, D, N * P] that the Gram matrix needs (no copy).
    symbols = _Symbols()
    n, g, c = symbols(), symbols(), symbols()
    grouped = x.unflatten(1, (groups, x.shape[1] // groups))
    net = _input_network(grouped, axes, n + g + c, symbols, simplify, gather=simplify)
    out_sub = g + c + "".join(net.kernel_letters) + n + "".join(net.out_letters)
    u = _contract(",".join(net.subscripts) + "->" + out_sub, *net.operands)
    u = u.reshape(groups, -1, x.shape[0] * math.prod(a.output_size for a in axes))
    factor = gram(u)
    if _check_reduction(reduction) == "mean":
        factor = factor / u.shape[2]
    return factor[0] if groups == 1 else factor


def kfac_reduce_factor(
    x: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    simplify: bool = True,
) -> Tensor:
    r"""KFAC-reduce input-side Kronecker factor of a convolution's weight, by einsum.

    KFAC-reduce (Eschenhagen et al., 2023) averages the unfolded input over the :math:`P =
    \prod_a O_a` output pixels before the outer product:

    .. math::

        \bar u_n = \frac{1}{P} \sum_{o=1}^{P} u_{n, o}, \qquad
        A = \frac{1}{N} \sum_{n=1}^{N} \bar u_n \bar u_n^\top
          = \frac{1}{N P^2} \sum_n \Big(\sum_o u_{n, o}\Big)\Big(\sum_o u_{n, o}\Big)^\top.

    The sum over output pixels is moved onto the patterns,
    :math:`\sum_o u_{n, (c, k), o} = \sum_{i} X_{n, c, i} \prod_a (\sum_{o_a} \Pi^{(a)}_{o_a, i_a,
    k_a})`, so the unfolded input ``[N, C_in * prod(K), P]`` is never built: the cost is that of
    contracting ``x`` with one ``[I_a, K_a]`` matrix per axis.

    Args:
        x: Layer input, ``[N, C_in, I_1, ..., I_D]``.
        kernel_size: Kernel size, an int or one per axis.
        stride: Stride, an int or one per axis.
        padding: Zero padding (see :data:`Padding`).
        dilation: Dilation, an int or one per axis.
        groups: Number of groups :math:`G` (one factor per group).
        reduction: ``"mean"`` for :math:`A` as above, ``"sum"`` for
            :math:`\sum_n \bar u_n \bar u_n^\top` (times :math:`N`; the pixel mean stays).
        simplify: Replace the patterns of non-overlapping, unpadded axes by strided views.

    Returns:
        ``[C_in * prod(K), C_in * prod(K)]`` if ``groups == 1``, else one factor per group,
        ``[G, C_in / G * prod(K), C_in / G * prod(K)]``.
    """
    _check_input(x)
    _check_groups(x, groups)
    axes = _axes(x.shape[2:], kernel_size, stride, padding, dilation)
    ubar = _mean_unfolded(x, axes, groups, simplify)  # [N, G, D]
    factor = torch.einsum("ngd,nge->gde", ubar, ubar)
    if _check_reduction(reduction) == "mean":
        factor = factor / ubar.shape[0]
    return factor[0] if groups == 1 else factor


def _mean_unfolded(x: Tensor, axes: tuple[_Axis, ...], groups: int, simplify: bool) -> Tensor:
    """Output-pixel average of the unfolded input per group, ``[N, G, C_in / G * prod(K)]``."""
    symbols = _Symbols()
    n, g, c = symbols(), symbols(), symbols()
    grouped = x.unflatten(1, (groups, x.shape[1] // groups))
    net = _input_network(grouped, axes, n + g + c, symbols, simplify, summed=True)
    equation = ",".join(net.subscripts) + "->" + n + g + c + "".join(net.kernel_letters)
    summed = _contract(equation, *net.operands)
    return summed.flatten(2) / math.prod(a.output_size for a in axes)


def conv_weight_grad(
    x: Tensor,
    grad_output: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    keep_prob: float = 1.0,
    dropout: Literal["spatial", "batch"] = "spatial",
    generator: torch.Generator | None = None,
    simplify: bool = True,
) -> Tensor:
    r"""Weight gradient (weight VJP) of a convolution by einsum, optionally with tensor dropout.

    Exact (``keep_prob == 1``):

    .. math::

        \frac{\partial L}{\partial W_{(g, e), c, k_\cdot}} = \sum_{n, o_\cdot, i_\cdot}
        \frac{\partial L}{\partial Y_{n, (g, e), o_\cdot}} X_{n, (g, c), i_\cdot}
        \prod_{a} \Pi^{(a)}_{o_a, i_a, k_a}.

    Tensor dropout (``keep_prob = p < 1``) keeps a random subset of one summed index and rescales
    by :math:`1/p` per sub-sampled index, an unbiased estimate whose cost shrinks with the kept
    fraction because dropped slices are removed (``index_select``), not masked:

    * ``dropout="spatial"``: every output pixel of every spatial axis :math:`a` is kept
      independently with probability :math:`p` (rows of :math:`\Pi^{(a)}` and slices of the output
      gradient; column-row sampling), scale :math:`p^{-D}`, so a fraction :math:`p^D` of the output
      grid is kept in expectation.
    * ``dropout="batch"``: every sample is kept with probability :math:`p`, scale :math:`1/p`.

    Args:
        x: Layer input, ``[N, C_in, I_1, ..., I_D]``.
        grad_output: Gradient w.r.t. the layer output, ``[N, C_out, O_1, ..., O_D]``.
        kernel_size: Kernel size, an int or one per axis.
        stride: Stride, an int or one per axis.
        padding: Zero padding (see :data:`Padding`).
        dilation: Dilation, an int or one per axis.
        groups: Number of groups.
        keep_prob: Keep probability :math:`p \in (0, 1]`; 1 gives the exact gradient.
        dropout: Which summed index to sub-sample, ``"spatial"`` or ``"batch"``.
        generator: Random generator for the Bernoulli draws (on ``x``'s device).
        simplify: Replace the patterns of non-overlapping, unpadded axes by strided views.

    Returns:
        The (estimated) weight gradient, ``[C_out, C_in / groups, K_1, ..., K_D]``.

    Raises:
        ValueError: If a shape or hyperparameter is inconsistent (the message names it).
    """
    _check_input(x)
    _check_groups(x, groups)
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob}: expected a probability in (0, 1]")
    if dropout not in ("spatial", "batch"):
        raise ValueError(f"dropout={dropout!r}: expected 'spatial' or 'batch'")
    axes = _axes(x.shape[2:], kernel_size, stride, padding, dilation)
    expected = (x.shape[0], -1, *(a.output_size for a in axes))
    if (
        grad_output.ndim != x.ndim
        or grad_output.shape[0] != x.shape[0]
        or grad_output.shape[1] % groups != 0
        or tuple(grad_output.shape[2:]) != expected[2:]
    ):
        raise ValueError(
            f"grad_output has shape {tuple(grad_output.shape)}: expected "
            f"[{x.shape[0]}, C_out, {', '.join(str(s) for s in expected[2:])}] with C_out "
            f"divisible by groups={groups} for x of shape {tuple(x.shape)}"
        )
    C_in, C_out = x.shape[1], grad_output.shape[1]

    symbols = _Symbols()
    n, g, c, e = symbols(), symbols(), symbols(), symbols()
    net = _input_network(
        x.unflatten(1, (groups, C_in // groups)), axes, n + g + c, symbols, simplify
    )
    gy = grad_output.unflatten(1, (groups, C_out // groups))
    operands, scale, sampled = list(net.operands), 1.0, keep_prob < 1.0
    full_shapes = [tuple(op.shape) for op in (*operands, gy)]

    def keep(size: int) -> Tensor:
        mask = torch.rand(size, generator=generator, device=x.device) < keep_prob
        return mask.nonzero().squeeze(1)

    if sampled and dropout == "batch":
        kept = keep(x.shape[0])
        operands[0] = operands[0].index_select(0, kept)
        gy = gy.index_select(0, kept)
        scale = 1.0 / keep_prob
    elif sampled:
        for a, o in enumerate(net.out_letters):
            kept = keep(axes[a].output_size)
            gy = gy.index_select(3 + a, kept)
            for j, sub in enumerate(net.subscripts):
                if o in sub:
                    operands[j] = operands[j].index_select(sub.index(o), kept)
            scale /= keep_prob

    gy_sub = n + g + e + "".join(net.out_letters)
    out_sub = g + e + c + "".join(net.kernel_letters)
    equation = ",".join([*net.subscripts, gy_sub]) + "->" + out_sub
    grad = _contract(equation, *operands, gy, path_shapes=full_shapes).flatten(0, 1)
    return grad * scale if sampled else grad


def conv_input_grad(
    grad_output: Tensor,
    weight: Tensor,
    input_size: Sequence[int],
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> Tensor:
    r"""Input gradient (input VJP) of a convolution by einsum over the index patterns.

    .. math::

        \frac{\partial L}{\partial X_{n, (g, c), i_\cdot}} = \sum_{e, o_\cdot, k_\cdot}
        \frac{\partial L}{\partial Y_{n, (g, e), o_\cdot}} \prod_{a} \Pi^{(a)}_{o_a, i_a, k_a}
        W_{(g, e), c, k_\cdot}.

    Args:
        grad_output: Gradient w.r.t. the output, ``[N, C_out, O_1, ..., O_D]``.
        weight: Kernel, ``[C_out, C_in / groups, K_1, ..., K_D]``.
        input_size: Spatial input size ``(I_1, ..., I_D)``.
        stride: Stride, an int or one per axis.
        padding: Zero padding (see :data:`Padding`).
        dilation: Dilation, an int or one per axis.
        groups: Number of groups.

    Returns:
        The input gradient, ``[N, C_in, I_1, ..., I_D]``.

    Raises:
        ValueError: If ``grad_output`` does not have the output shape of this convolution.
    """
    axes = _axes(tuple(input_size), tuple(weight.shape[2:]), stride, padding, dilation)
    N, C_out = grad_output.shape[:2]
    expected = (N, weight.shape[0], *(a.output_size for a in axes))
    if tuple(grad_output.shape) != expected or C_out % groups != 0:
        raise ValueError(
            f"grad_output has shape {tuple(grad_output.shape)}: expected {expected} for weight "
            f"of shape {tuple(weight.shape)}, input size {tuple(input_size)}, groups={groups}"
        )
    symbols = _Symbols()
    n, g, c, e = symbols(), symbols(), symbols(), symbols()
    outs, ins, kernels, patterns, pattern_subs = "", "", "", [], []
    for axis in axes:
        o, i, k = symbols(), symbols(), symbols()
        outs, ins, kernels = outs + o, ins + i, kernels + k
        patterns.append(_cached_pattern(axis, grad_output.dtype, grad_output.device))
        pattern_subs.append(o + i + k)
    gy = grad_output.unflatten(1, (groups, C_out // groups))
    w = weight.unflatten(0, (groups, C_out // groups))
    equation = ",".join([n + g + e + outs, *pattern_subs, g + e + c + kernels]) + "->"
    equation += n + g + c + ins
    return _contract(equation, gy, *patterns, w).flatten(1, 2)


def pad_amounts(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """``(left, right)`` pairs per spatial axis as :func:`torch.nn.functional.pad` amounts.

    ``F.pad`` takes the last axis first: ``[left_D, right_D, left_{D-1}, right_{D-1}, ...]``.
    """
    return [p for pair in reversed(pairs) for p in pair]


def pad_explicitly(
    x: Tensor, pairs: Sequence[tuple[int, int]], mode: str = "zeros"
) -> tuple[Tensor, tuple[int, ...]]:
    """Pad ``x`` where torch's convolution kernels cannot; return it and the padding left to them.

    Torch's kernels pad with zeros, symmetrically. Asymmetric pairs, or a ``padding_mode`` other
    than ``'zeros'`` (``'reflect'``, ``'replicate'``, ``'circular'``), are applied here.

    Args:
        x: Input ``[N, C, I_1, ..., I_D]``.
        pairs: ``(left, right)`` per spatial axis (:func:`padding_pairs`).
        mode: A convolution's ``padding_mode``.

    Returns:
        The (possibly padded) input and the symmetric zero padding per axis for the kernel.
    """
    if mode == "zeros" and all(left == right for left, right in pairs):
        return x, tuple(left for left, _ in pairs)
    padded = F.pad(x, pad_amounts(pairs), mode="constant" if mode == "zeros" else mode)
    return padded, (0,) * len(pairs)


def conv_transpose_to_size(
    x: Tensor,
    weight: Tensor,
    output_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    r"""Transposed convolution of ``x`` onto the spatial ``output_size`` (torch's kernel, 1-3 axes).

    It is the input gradient (VJP) of the convolution with ``weight`` and these hyperparameters
    at an input of spatial size ``output_size``,
    :math:`\partial L/\partial x = w^\top \star \partial L/\partial y`, and the forward pass of a
    transposed convolution. The output padding
    :math:`I - ((O - 1) s - 2 p + d (K - 1) + 1)` per axis picks the size among those that
    convolve to ``O`` pixels. Unlike ``convolution_backward``, which materializes a stand-in for
    the missing input, it needs no input.

    Args:
        x: ``[N, C_out, O_1, ..., O_D]`` (e.g. the convolution's output gradient).
        weight: ``[C_out, C_in / groups, K_1, ..., K_D]``.
        output_size: ``(I_1, ..., I_D)``.
        stride: One per spatial axis.
        padding: One per spatial axis (both sides; pad asymmetric padding explicitly and crop).
        dilation: One per spatial axis.
        groups: Number of groups.

    Returns:
        ``[N, C_in, I_1, ..., I_D]``.
    """
    sizes = zip(output_size, x.shape[2:], weight.shape[2:], strict=True)
    output_padding = [
        i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for (i, o, k), s, p, d in zip(sizes, stride, padding, dilation, strict=True)
    ]
    return torch.ops.aten.convolution(
        x, weight, None, list(stride), list(padding), list(dilation), True, output_padding, groups
    )


class _RandomizedConv(torch.autograd.Function):
    """Exact convolution whose weight gradient is a tensor-dropout estimate.

    It stores the input only when the weight needs a gradient and the weight only when the input
    does (as :mod:`curvlab.nn.memsave` does for stock convolutions).
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        axes: tuple[_Axis, ...],
        groups: int,
        sampling: tuple[float, str, torch.Generator | None],
    ) -> Tensor:
        if len(axes) > 3:
            pairs = [a.padding for a in axes]
            strides = [a.stride for a in axes]
            dilations = [a.dilation for a in axes]
            return conv(x, weight, bias, strides, pairs, dilations, groups)
        x, padding = pad_explicitly(x, [a.padding for a in axes])
        return torch.ops.aten.convolution(
            x,
            weight,
            bias,
            [a.stride for a in axes],
            padding,
            [a.dilation for a in axes],
            False,
            [0] * len(axes),
            groups,
        )

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, ctx.axes, ctx.groups, ctx.sampling = inputs
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if needs_weight else None, weight if needs_x else None)
        ctx.x_shape = x.shape

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        axes, groups = ctx.axes, ctx.groups
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        if needs_x:
            grad_x = _input_vjp(grad_output, weight, ctx.x_shape, axes, groups)
        if needs_weight:
            keep_prob, dropout, generator = ctx.sampling
            grad_weight = conv_weight_grad(
                x,
                grad_output,
                tuple(weight.shape[2:]) if weight is not None else _kernel(axes),
                [a.stride for a in axes],
                [a.padding for a in axes],
                [a.dilation for a in axes],
                groups,
                keep_prob=keep_prob,
                dropout=dropout,
                generator=generator,
            )
        if needs_bias:
            grad_bias = grad_output.sum((0, *range(2, grad_output.dim())))
        return grad_x, grad_weight, grad_bias, None, None, None


def _kernel(axes: tuple[_Axis, ...]) -> tuple[int, ...]:
    return tuple(a.kernel_size for a in axes)


def _input_vjp(
    grad_output: Tensor, weight: Tensor, x_shape: torch.Size, axes: tuple[_Axis, ...], groups: int
) -> Tensor:
    """Exact input gradient: torch's convolution backward for 1 to 3 axes, else einsum."""
    D = len(axes)
    if D > 3:
        pairs = [a.padding for a in axes]
        return conv_input_grad(
            grad_output,
            weight,
            x_shape[2:],
            [a.stride for a in axes],
            pairs,
            [a.dilation for a in axes],
            groups,
        )
    # The transposed convolution of the output gradient (torch's input-gradient kernel), onto the
    # explicitly padded input where the padding is asymmetric, then cropped.
    symmetric = all(a.padding[0] == a.padding[1] for a in axes)
    padding = [a.padding[0] if symmetric else 0 for a in axes]
    padded = [
        size + (0 if symmetric else sum(a.padding))
        for size, a in zip(x_shape[2:], axes, strict=True)
    ]
    strides, dilations = [a.stride for a in axes], [a.dilation for a in axes]
    grad_x = conv_transpose_to_size(
        grad_output, weight, padded, strides, padding, dilations, groups
    )
    if not symmetric:
        for dim, (a, size) in enumerate(zip(axes, x_shape[2:], strict=True), start=2):
            grad_x = grad_x.narrow(dim, a.padding[0], size)
    return grad_x


def randomized_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    keep_prob: float,
    dropout: Literal["spatial", "batch"] = "spatial",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Convolution with randomized approximate backpropagation (tensor dropout) for the weight.

    The output, the input gradient and the bias gradient are exact; the weight gradient is the
    unbiased tensor-dropout estimate of :func:`conv_weight_grad` with keep probability
    :math:`p`, whose cost shrinks with :math:`p`: ``dropout="spatial"`` keeps every output pixel
    of every axis with probability :math:`p` (scale :math:`p^{-D}`), ``"batch"`` every sample
    (scale :math:`p^{-1}`). Forward and input gradient use torch's kernels for 1 to 3 spatial axes
    and einsum beyond.

    Args:
        x: Input, ``[N, C_in, I_1, ..., I_D]``.
        weight: Kernel, ``[C_out, C_in / groups, K_1, ..., K_D]``.
        bias: Optional bias, ``[C_out]``.
        stride: Stride, an int or one per axis.
        padding: Zero padding (see :data:`Padding`).
        dilation: Dilation, an int or one per axis.
        groups: Number of groups.
        keep_prob: Keep probability :math:`p \in (0, 1]`; 1 gives the exact gradient.
        dropout: Which summed index of the weight gradient to sub-sample.
        generator: Random generator for the Bernoulli draws (on ``x``'s device).

    Returns:
        Output, ``[N, C_out, O_1, ..., O_D]``.

    Raises:
        ValueError: If a shape or hyperparameter is inconsistent (the message names it).
    """
    _check_input(x)
    _check_groups(x, groups)
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob}: expected a probability in (0, 1]")
    if dropout not in ("spatial", "batch"):
        raise ValueError(f"dropout={dropout!r}: expected 'spatial' or 'batch'")
    if weight.ndim != x.ndim or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}: expected [C_out, {x.shape[1] // groups}, "
            f"K_1, ..., K_{x.ndim - 2}] for x of shape {tuple(x.shape)} and groups={groups}"
        )
    axes = _axes(x.shape[2:], tuple(weight.shape[2:]), stride, padding, dilation)
    return _RandomizedConv.apply(x, weight, bias, axes, groups, (keep_prob, dropout, generator))


def conv_hyperparameters(module: nn.Module) -> dict[str, Any]:
    """Keyword arguments of this module's functions for a ``torch.nn.Conv1d/2d/3d`` layer.

    ``kfac_reduce_factor(x, **conv_hyperparameters(layer))`` gives the layer's factor.

    Args:
        module: A (non-transposed) convolution with ``padding_mode='zeros'``.

    Returns:
        ``kernel_size``, ``stride``, ``padding`` (tuple, ``'same'`` or ``'valid'``), ``dilation``
        and ``groups``.

    Raises:
        ValueError: For transposed convolutions or padding modes other than zeros (for those,
            pad the input with :func:`torch.nn.functional.pad` first and pass ``padding=0``).
    """
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
        raise ValueError(
            f"conv_hyperparameters: {type(module).__name__} is not a Conv1d/2d/3d layer"
        )
    if module.padding_mode != "zeros":
        raise ValueError(
            f"{type(module).__name__} has padding_mode={module.padding_mode!r}: only zero padding "
            "is an index pattern; pad the input with F.pad(x, module._reversed_padding_repeated"
            "_twice, mode=...) and pass padding=0"
        )
    return {
        "kernel_size": tuple(module.kernel_size),
        "stride": tuple(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
        "dilation": tuple(module.dilation),
        "groups": module.groups,
    }
