r"""Memory-saving drop-in layers for selective differentiation (C8).

PyTorch's autograd decides what a node stores for the backward pass from the operation alone, not
from which of its operands need a gradient. A convolution :math:`y = w \star x + b` stores its
input :math:`x` even when the weight is frozen, although

.. math::
    \frac{\partial L}{\partial x} = w^\top \star \frac{\partial L}{\partial y}, \qquad
    \frac{\partial L}{\partial b} = \sum_{n, \text{space}} \frac{\partial L}{\partial y}

need only :math:`w` (a parameter, alive anyway) and the shape of :math:`x`. When only some layers
train (fine-tuning, norm-only tuning, adversarial or style-transfer inputs), the frozen layers'
stored inputs dominate the memory of a forward pass. The classes here subclass the torch modules
(same ``state_dict`` keys, ``isinstance`` still holds), change only ``forward``, and keep what the
backward pass needs given which operands require a gradient:

======================  ===================================  =====================================
layer                   stock torch 2.13 stores              memsave stores
======================  ===================================  =====================================
``Conv1d/2d/3d``        input :math:`x` and weight, always   the weight only, when it is frozen
                                                             (nothing when :math:`x` needs no grad)
``BatchNorm1d/2d/3d``   input :math:`x` (and statistics)     eval mode, frozen weight: the
                                                             per-channel scale ``[C]``; any mode,
                                                             frozen weight, :math:`x` without
                                                             grad: nothing; otherwise stock
``LayerNorm``           input, mean and :math:`1/\sigma`     frozen weight and :math:`x` without
                                                             grad (bias-only tuning): nothing;
                                                             otherwise stock
``ReLU``                the output (float)                   a bit mask :math:`[y \ne 0]`,
                                                             1 bit per entry
``MaxPool1d/2d/3d``     the input and ``int64`` indices      the indices only
``Dropout``             a float mask (CPU)                   a bit mask, 1 bit per entry
======================  ===================================  =====================================

Where a variant would store the same as torch (e.g. a convolution whose weight trains), its
``forward`` calls the stock ``forward``, so nothing is lost in time or memory.

Kept stock, by measurement on torch 2.13 (see ``docs/memsave.md`` and the tests):
:class:`torch.nn.Linear`. ``AddmmBackward0`` (and ``MmBackward0`` for batched inputs) already
drops the input when the weight is frozen -- there is nothing to save. The input gradients of
LayerNorm, and of BatchNorm in train mode, need the normalized input :math:`\hat x`, i.e. the
input and its statistics, whether or not the affine parameters train: torch stores exactly that,
and the variants above only differ where no input gradient is needed.

Use :func:`convert` to swap the variants into any model in place.

Under ``torch.func``: the custom autograd Functions here have vmap rules, so ``vmap``, ``grad``
and ``vjp`` work; forward mode (``jvp``, ``jacfwd``, ``hessian``) would need the tensors they do
not keep and raises, naming the layer; use :func:`revert` for it.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.utils import _ntuple

from curvlab.nn.einconv import conv_transpose_to_size, pad_explicitly, padding_pairs

__all__ = [
    "BILINEAR_FUNCTIONS",
    "KEPT_STOCK",
    "LINEAR_FUNCTIONS",
    "MEMSAVE_CLASSES",
    "MemSaveBatchNorm1d",
    "MemSaveBatchNorm2d",
    "MemSaveBatchNorm3d",
    "MemSaveConv1d",
    "MemSaveConv2d",
    "MemSaveConv3d",
    "MemSaveDropout",
    "MemSaveLayerNorm",
    "MemSaveMaxPool1d",
    "MemSaveMaxPool2d",
    "MemSaveMaxPool3d",
    "MemSaveReLU",
    "PeakMemory",
    "SavedTensorBytes",
    "convert",
    "pack_bits",
    "revert",
    "unpack_bits",
]


def _requires_grad(tensor: Tensor | None) -> bool:
    """Whether ``tensor`` exists and requires a gradient."""
    return tensor is not None and tensor.requires_grad


def _stub(like: Tensor, shape: torch.Size) -> Tensor:
    """A zero-stride stand-in of ``shape`` for an operand whose values the backward op never reads.

    It holds one element, so passing it where only the shape matters allocates nothing.
    """
    return like.new_zeros(()).expand(shape)


def _no_forward_mode(layer: str) -> Any:
    """A ``jvp`` staticmethod for the Functions here: they keep too little for forward mode.

    Forward-mode derivatives (``torch.func.jvp``, ``jacfwd``, ``hessian``) would need the very
    inputs these Functions avoid storing, so they raise instead, naming the layer and the way out.
    """

    def jvp(ctx: FunctionCtx, *tangents: Any) -> Any:
        raise NotImplementedError(
            f"{layer} (curvlab.nn.memsave) has no forward-mode derivative: it does not keep the "
            "tensors one needs. For Hessians by torch.func (method='func', or the generic "
            "fallback), run the stock model: curvlab.nn.memsave.revert(model, inplace=False)"
        )

    return staticmethod(jvp)


# --------------------------------------------------------------------------------------------------
# Bit masks
# --------------------------------------------------------------------------------------------------

_GATHER_BITS = 0x0102040810204080
"""Multiplying eight 0/1 bytes (one little-endian int64) by this puts byte j's bit at bit 56 + j."""


def pack_bits(mask: Tensor) -> Tensor:
    r"""Pack a ``bool`` tensor into bits, 8 entries per byte (1/8 of the ``bool`` tensor's memory).

    Entry :math:`8 b + j` of ``mask.flatten()`` becomes bit :math:`j` of byte :math:`b`. Eight
    ``bool`` bytes are read as one int64 :math:`w = \sum_j m_j 2^{8 j}`; the product
    :math:`w \cdot \sum_k 2^{7 k + 7}` carries :math:`m_j` to bit :math:`56 + j` without
    collisions (products beyond bit 63 wrap away), so one multiply and keeping the top byte pack
    eight entries.

    Args:
        mask: Any shape; padded with ``False`` to a multiple of 8 entries.

    Returns:
        ``[ceil(numel / 8)]``, ``uint8``.
    """
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    flat = flat.view(torch.uint8).view(-1, 8)
    if sys.byteorder != "little":  # the multiply trick reads the bytes as a little-endian int64
        return (flat << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(
            1, dtype=torch.uint8
        )
    words = flat.view(torch.int64).squeeze(1)
    return (words * _GATHER_BITS).view(torch.uint8)[7::8].clone()  # the top byte of each word


_UNPACK_TABLES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def unpack_bits(packed: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack_bits`: the mask as 0/1 values of ``dtype`` and ``shape``.

    One table lookup (an embedding of the bytes into rows of eight 0/1 values) per byte.

    Args:
        packed: ``[ceil(numel / 8)]``, ``uint8``, from :func:`pack_bits`.
        shape: Shape of the packed mask.
        dtype: Floating dtype of the result.

    Returns:
        ``[*shape]``, ``dtype``: 1 where the mask was ``True``, else 0.
    """
    key = (dtype, packed.device)
    table = _UNPACK_TABLES.get(key)
    if table is None:
        bits = torch.arange(256).unsqueeze(1) >> torch.arange(8)
        table = _UNPACK_TABLES.setdefault(key, (bits & 1).to(dtype=dtype, device=packed.device))
    values = nn.functional.embedding(packed.long(), table).reshape(-1)
    return values[: math.prod(shape)].view(shape)


# --------------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------------


class _Convolution(torch.autograd.Function):
    """Convolution that stores the input and the weight only for the gradients that need them.

    :math:`x` is kept only for the weight gradient, :math:`w` only for the input gradient; the bias
    gradient needs neither.
    """

    generate_vmap_rule = True
    jvp = _no_forward_mode("MemSaveConv1d/2d/3d")

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Tensor:
        output_padding = (0,) * len(stride)
        return torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, False, output_padding, groups
        )

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, stride, padding, dilation, groups = inputs
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if needs_weight else None, weight if needs_x else None)
        ctx.x_shape, ctx.weight_shape = x.shape, weight.shape
        ctx.conv_args = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        stride, padding, dilation, groups = ctx.conv_args
        grad_x = grad_weight = grad_bias = None
        if needs_x:
            grad_x = conv_transpose_to_size(grad_output, weight, ctx.x_shape[2:], *ctx.conv_args)
        if needs_weight:
            # The bias gradient is left out of this call: on CPU, asking convolution_backward for
            # it computes the weight gradient as well.
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_output,
                x,
                _stub(grad_output, ctx.weight_shape),
                None,
                stride,
                padding,
                dilation,
                False,
                (0,) * len(stride),
                groups,
                (False, True, False),
            )
        if needs_bias:
            grad_bias = grad_output.sum(dim=(0, *range(2, grad_output.dim())))
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _conv_saves_memory(conv: nn.modules.conv._ConvNd, x: Tensor) -> bool:
    """Whether stock autograd would store ``x`` although no weight gradient is needed."""
    return (
        torch.is_grad_enabled()
        and not conv.weight.requires_grad
        and (x.requires_grad or _requires_grad(conv.bias))
    )


def _conv_forward(conv: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Memory-saving forward pass of ``conv`` for a frozen weight."""
    dims = len(conv.kernel_size)
    unbatched = x.dim() == dims + 1
    if unbatched:
        x = x.unsqueeze(0)
    # padding_mode and asymmetric 'same' padding by F.pad, the symmetric rest by the kernel
    pairs = padding_pairs(conv.padding, conv.kernel_size, conv.stride, conv.dilation)
    x, padding = pad_explicitly(x, pairs, conv.padding_mode)
    y = _Convolution.apply(
        x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups
    )
    return y.squeeze(0) if unbatched else y


class MemSaveConv1d(nn.Conv1d):
    """:class:`torch.nn.Conv1d` that stores no input ``[N, C, L]`` when the weight is frozen.

    Outputs and gradients equal the stock layer's to round-off; with a trainable weight the stock
    ``forward`` runs unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``input`` ``[N, C_in, L]`` (or unbatched ``[C_in, L]``)."""
        if not _conv_saves_memory(self, input):
            return super().forward(input)
        return _conv_forward(self, input)


class MemSaveConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` that stores no input ``[N, C, H, W]`` when the weight is frozen.

    Outputs and gradients equal the stock layer's to round-off; with a trainable weight the stock
    ``forward`` runs unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``input`` ``[N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``)."""
        if not _conv_saves_memory(self, input):
            return super().forward(input)
        return _conv_forward(self, input)


class MemSaveConv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` that stores no input ``[N, C, D, H, W]`` when the weight is frozen.

    Outputs and gradients equal the stock layer's to round-off; with a trainable weight the stock
    ``forward`` runs unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``input`` ``[N, C_in, D, H, W]`` (or unbatched ``[C_in, D, H, W]``)."""
        if not _conv_saves_memory(self, input):
            return super().forward(input)
        return _conv_forward(self, input)


# --------------------------------------------------------------------------------------------------
# Batch normalization
# --------------------------------------------------------------------------------------------------


def _with_bias_gradient(
    forward: Any, x: Tensor, bias: Tensor, bias_view: tuple[int, ...]
) -> Tensor:
    r"""Run a layer without a graph and attach only the gradient of its additive bias.

    For :math:`y = z(x) + \beta` (broadcast) where neither :math:`x` nor anything in :math:`z`
    needs a gradient, :math:`\partial L/\partial \beta = \sum_{\text{broadcast dims}}
    \partial L/\partial y`. ``forward(x)`` computes the whole output (:math:`\beta` included)
    with the stock layer and no graph, so values and side effects (running statistics) are the
    stock ones; adding :math:`\beta - \operatorname{sg}(\beta) = 0` (``sg``: detached) attaches
    the bias gradient with a subtraction, a view and an addition, which store nothing. Being plain
    torch operations, they also work under ``torch.func`` transforms.

    Args:
        forward: The stock forward of the layer.
        x: Its input (needs no gradient).
        bias: Its bias (needs a gradient).
        bias_view: Shape that broadcasts ``bias`` against the output.

    Returns:
        The stock output, attached to ``bias`` only.
    """
    with torch.no_grad():
        output = forward(x)
    return output.detach() + (bias - bias.detach()).view(bias_view)


def _bias_only(module: nn.Module, x: Tensor) -> bool:
    """Whether a graph is built only for ``module``'s bias: frozen weight, no input gradient."""
    return (
        torch.is_grad_enabled()
        and not x.requires_grad
        and not _requires_grad(getattr(module, "weight", None))
        and _requires_grad(getattr(module, "bias", None))
    )


def _bn_uses_running_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` normalizes with its running statistics (eval mode with tracked stats)."""
    return not (bn.training or (bn.running_mean is None and bn.running_var is None))


def _bn_affine_forward(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    r"""Eval-mode batch norm as the per-channel affine map it is.

    .. math::
        y = s \odot x + t, \qquad s = \gamma / \sqrt{\hat\sigma^2 + \epsilon}, \qquad
        t = \beta - \hat\mu\, s,

    with running statistics :math:`\hat\mu, \hat\sigma^2` ``[C]`` broadcast over the channel
    dimension 1 of ``x`` ``[N, C, *]``. ``torch.addcmul`` stores only :math:`s` ``[C]`` for the
    input gradient (and nothing when :math:`x` needs no gradient); the gradient of :math:`\beta`
    flows through :math:`t` without any stored tensor.
    """
    bn._check_input_dim(x)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (-1,) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


def _bn_forward(bn: nn.modules.batchnorm._BatchNorm, stock_forward: Any, x: Tensor) -> Tensor:
    r"""Memory-saving batch norm: affine map in eval mode, bias-only graph, or the stock forward.

    * Running statistics and a frozen weight: :func:`_bn_affine_forward` (stores ``[C]``).
    * Batch statistics, frozen weight, input without gradient: the stock forward without a graph
      (same output, same running-statistics update) plus the bias gradient, stores nothing.
    * Otherwise the input gradient or the weight gradient needs :math:`\hat x`: stock.
    """
    if not (torch.is_grad_enabled() and not _requires_grad(bn.weight)):
        return stock_forward(x)
    if _bn_uses_running_stats(bn) and (x.requires_grad or _requires_grad(bn.bias)):
        return _bn_affine_forward(bn, x)
    if _bias_only(bn, x):
        return _with_bias_gradient(stock_forward, x, bn.bias, (-1,) + (1,) * (x.dim() - 2))
    return stock_forward(x)


class MemSaveBatchNorm1d(nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` that stores no input where no gradient needs it.

    That is when the weight is frozen and either the running statistics are used (eval mode) or
    the input needs no gradient; otherwise the stock ``forward`` runs.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` ``[N, C]`` or ``[N, C, L]``."""
        return _bn_forward(self, super().forward, input)


class MemSaveBatchNorm2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` that stores no input where no gradient needs it.

    That is when the weight is frozen and either the running statistics are used (eval mode) or
    the input needs no gradient; otherwise the stock ``forward`` runs.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` ``[N, C, H, W]``."""
        return _bn_forward(self, super().forward, input)


class MemSaveBatchNorm3d(nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` that stores no input where no gradient needs it.

    That is when the weight is frozen and either the running statistics are used (eval mode) or
    the input needs no gradient; otherwise the stock ``forward`` runs.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` ``[N, C, D, H, W]``."""
        return _bn_forward(self, super().forward, input)


class MemSaveLayerNorm(nn.LayerNorm):
    r""":class:`torch.nn.LayerNorm` that stores nothing when only its bias needs a gradient.

    With a frozen weight and an input that needs no gradient (bias-only tuning such as BitFit, at
    the first trainable layer), :math:`y = \gamma \odot \hat x + \beta` needs nothing stored for
    :math:`\partial L/\partial \beta = \sum \partial L/\partial y`; the stock layer stores the
    input and its statistics. In every other case the gradients need :math:`\hat x`, so the stock
    ``forward`` runs.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` ``[*, *normalized_shape]`` over its last dimensions."""
        if not _bias_only(self, input):
            return super().forward(input)
        return _with_bias_gradient(super().forward, input, self.bias, self.bias.shape)


# --------------------------------------------------------------------------------------------------
# ReLU
# --------------------------------------------------------------------------------------------------


class _ReLU(torch.autograd.Function):
    r"""ReLU that stores a bit mask :math:`[y \ne 0]` (1 bit per entry) instead of its output.

    :math:`\partial L/\partial x = [y \ne 0] \odot \partial L/\partial y` with
    :math:`y = \max(x, 0)`, as torch's ``threshold_backward(grad, y, 0)``: :math:`y \ne 0` exactly
    where :math:`x > 0`, and a NaN input passes the gradient in both.
    """

    generate_vmap_rule = True
    jvp = _no_forward_mode("MemSaveReLU")

    @staticmethod
    def forward(x: Tensor, inplace: bool) -> Tensor:
        return torch.relu_(x) if inplace else torch.relu(x)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, inplace = inputs
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(pack_bits(output.bool()))
        ctx.shape = output.shape

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor, None]:
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape, grad_output.dtype)
        # Written into the (fresh) mask: one allocation fewer than the out-of-place kernel.
        grad_x = torch.ops.aten.threshold_backward.grad_input(grad_output, mask, 0, grad_input=mask)
        return grad_x, None


class MemSaveReLU(nn.ReLU):
    """:class:`torch.nn.ReLU` that stores a bit mask instead of its output (also in place).

    The mask takes 1 bit per entry (1/32 of a float32 output). It pays off when no other layer
    keeps the output alive, e.g. before a frozen convolution or a BatchNorm in eval mode; when the
    next layer stores the output anyway (a trainable convolution) the mask is 1/32 extra.
    """

    def forward(self, input: Tensor) -> Tensor:
        r"""Apply :math:`\max(x, 0)` elementwise."""
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return _ReLU.apply(input, self.inplace)


# --------------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------------


_MAX_POOL = {
    2: (torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool2d_with_indices_backward),
    3: (torch.ops.aten.max_pool3d_with_indices, torch.ops.aten.max_pool3d_with_indices_backward),
}


class _MaxPool(torch.autograd.Function):
    """Max pooling that stores the argmax indices and the input's shape, not the input."""

    generate_vmap_rule = True
    jvp = _no_forward_mode("MemSaveMaxPool1d/2d/3d")

    @staticmethod
    def forward(
        x: Tensor,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        ceil_mode: bool,
    ) -> tuple[Tensor, Tensor]:
        pool, _ = _MAX_POOL[len(kernel_size)]
        return pool(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(
        ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]
    ) -> None:
        x, *ctx.pool_args = inputs
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_output: Tensor | None, _grad_indices: None
    ) -> tuple[Tensor | None, ...]:
        if grad_output is None:
            return (None,) * 6
        (indices,) = ctx.saved_tensors
        _, pool_backward = _MAX_POOL[len(ctx.pool_args[0])]
        # The backward kernels read only the shape of ``self``; the indices locate each maximum.
        grad_x = pool_backward(
            grad_output, _stub(grad_output, ctx.x_shape), *ctx.pool_args, indices
        )
        return grad_x, None, None, None, None, None


def _max_pool_forward(pool: nn.modules.pooling._MaxPoolNd, x: Tensor, dims: int) -> Any:
    """Memory-saving forward of a ``dims``-dimensional max pooling; 1d runs as 2d with height 1."""
    as_tuple = _ntuple(dims)
    kernel_size = as_tuple(pool.kernel_size)
    stride = kernel_size if pool.stride is None else as_tuple(pool.stride)
    args = (kernel_size, stride, as_tuple(pool.padding), as_tuple(pool.dilation))
    if dims == 1:
        args = tuple((1, *arg) if i != 2 else (0, *arg) for i, arg in enumerate(args))
        x = x.unsqueeze(-2)
    output, indices = _MaxPool.apply(x, *args, pool.ceil_mode)
    if dims == 1:
        output, indices = output.squeeze(-2), indices.squeeze(-2)
    return (output, indices) if pool.return_indices else output


class MemSaveMaxPool1d(nn.MaxPool1d):
    """:class:`torch.nn.MaxPool1d` that stores only the argmax indices, not its input."""

    def forward(self, input: Tensor) -> Any:
        """Pool ``input`` ``[N, C, L]`` (or ``[C, L]``)."""
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return _max_pool_forward(self, input, 1)


class MemSaveMaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` that stores only the argmax indices, not its input."""

    def forward(self, input: Tensor) -> Any:
        """Pool ``input`` ``[N, C, H, W]`` (or ``[C, H, W]``)."""
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return _max_pool_forward(self, input, 2)


class MemSaveMaxPool3d(nn.MaxPool3d):
    """:class:`torch.nn.MaxPool3d` that stores only the argmax indices, not its input."""

    def forward(self, input: Tensor) -> Any:
        """Pool ``input`` ``[N, C, D, H, W]`` (or ``[C, D, H, W]``)."""
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return _max_pool_forward(self, input, 3)


# --------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------


class _Dropout(torch.autograd.Function):
    r"""Dropout that stores its mask as bits.

    On CPU the mask is drawn as torch's CPU dropout draws it, ``empty_like(x).bernoulli_(1 - p)``
    (same random stream, hence the same mask as :func:`torch.nn.functional.dropout` for the same
    seed), and :math:`y = x \odot m / (1 - p)`. On other devices ``torch.native_dropout`` draws
    it, as the stock layer does there. Backward:
    :math:`\partial L/\partial x = \partial L/\partial y \odot m / (1 - p)`.
    """

    generate_vmap_rule = True
    jvp = _no_forward_mode("MemSaveDropout")

    @staticmethod
    def forward(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
        if x.device.type == "cpu":
            noise = torch.empty_like(x).bernoulli_(1 - p)
            mask = noise.bool()
            return x * noise.div_(1 - p), mask
        output, mask = torch.native_dropout(x, p, True)
        return output, mask

    @staticmethod
    def setup_context(
        ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]
    ) -> None:
        _, ctx.p = inputs
        _, mask = output
        ctx.mark_non_differentiable(mask)
        ctx.save_for_backward(pack_bits(mask))
        ctx.shape = mask.shape

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Tensor, _grad_mask: None) -> tuple[Tensor, None]:
        (packed,) = ctx.saved_tensors
        noise = unpack_bits(packed, ctx.shape, grad_output.dtype).div_(1 - ctx.p)
        return noise.mul_(grad_output), None


class MemSaveDropout(nn.Dropout):
    r""":class:`torch.nn.Dropout` that stores a bit mask (1 bit per entry) for the backward pass.

    The stock CPU layer multiplies by a float mask and keeps it (4 bytes per entry in float32, 8 in
    float64); on CUDA it keeps a ``bool`` mask (1 byte). On CPU the mask is the stock layer's for
    the same seed. In eval mode, in place, with ``p`` 0 or 1, or without a graph, the stock
    ``forward`` runs.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Zero each entry of ``input`` with probability ``p``, scale the rest by ``1/(1-p)``."""
        if not (
            self.training
            and 0.0 < self.p < 1.0
            and not self.inplace
            and torch.is_grad_enabled()
            and input.requires_grad
            and input.numel() > 0
        ):
            return super().forward(input)
        return _Dropout.apply(input, self.p)[0]


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------

MEMSAVE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: MemSaveConv1d,
    nn.Conv2d: MemSaveConv2d,
    nn.Conv3d: MemSaveConv3d,
    nn.BatchNorm1d: MemSaveBatchNorm1d,
    nn.BatchNorm2d: MemSaveBatchNorm2d,
    nn.BatchNorm3d: MemSaveBatchNorm3d,
    nn.LayerNorm: MemSaveLayerNorm,
    nn.ReLU: MemSaveReLU,
    nn.MaxPool1d: MemSaveMaxPool1d,
    nn.MaxPool2d: MemSaveMaxPool2d,
    nn.MaxPool3d: MemSaveMaxPool3d,
    nn.Dropout: MemSaveDropout,
}
"""The torch layers :func:`convert` replaces, and their memory-saving variants."""

_STOCK_CLASSES = {memsave: stock for stock, memsave in MEMSAVE_CLASSES.items()}

LINEAR_FUNCTIONS: tuple[type[torch.autograd.Function], ...] = (_ReLU, _MaxPool, _Dropout)
r"""The autograd Functions here that are (piecewise) linear in their differentiable tensor input,
with a zero second derivative almost everywhere: ReLU and max pooling (a fixed selection once the
argmax is known) and dropout (a fixed mask). Graph checks that need second derivatives (the exact
Hessian diagonal) read this instead of the autograd node names."""

BILINEAR_FUNCTIONS: tuple[type[torch.autograd.Function], ...] = (_Convolution,)
r"""The autograd Functions here that are linear in each tensor operand separately (the convolution
:math:`w \star x + b`): second derivatives only mix two operands."""

KEPT_STOCK: tuple[type[nn.Module], ...] = (nn.Linear,)
"""Layers :func:`convert` leaves alone because torch already stores only what they need."""


def _swap_classes(model: nn.Module, table: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    for module in model.modules():
        new_class = table.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
    return model


def convert(
    model: nn.Module, inplace: bool = True, layers: Iterable[type[nn.Module]] | None = None
) -> nn.Module:
    """Swap the memory-saving variants into ``model``, anywhere in its module tree.

    Every module whose type is exactly one of the keys of :data:`MEMSAVE_CLASSES`
    (``Conv1d/2d/3d``, ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``ReLU``, ``MaxPool1d/2d/3d``,
    ``Dropout``) becomes its ``MemSave*`` subclass. The swap changes the module's class and nothing
    else: it stays the same object at the same dotted name, with the same ``Parameter`` objects,
    buffers and hooks, so optimizers built before the call, the ``state_dict`` (keys and values)
    and ``isinstance`` checks are unaffected. Subclasses of the torch layers (which may override
    ``forward``) and the layers in :data:`KEPT_STOCK` are left alone. A bare layer works as well.

    Args:
        model: The model (or a single layer) to convert.
        inplace: If ``False``, convert a deep copy and leave ``model`` untouched.
        layers: Convert only these torch classes (e.g. ``[nn.Conv2d, nn.BatchNorm2d]`` to keep
            stock ReLUs when every layer trains); default: all keys of :data:`MEMSAVE_CLASSES`.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Raises:
        ValueError: If ``layers`` names a class that has no memory-saving variant.
    """
    table = MEMSAVE_CLASSES
    if layers is not None:
        layers = list(layers)
        unknown = [cls.__name__ for cls in layers if cls not in MEMSAVE_CLASSES]
        if unknown:
            raise ValueError(
                f"layers={unknown}: no memory-saving variant; supported: "
                f"{', '.join(cls.__name__ for cls in MEMSAVE_CLASSES)}"
            )
        table = {cls: MEMSAVE_CLASSES[cls] for cls in layers}
    if not inplace:
        model = copy.deepcopy(model)
    return _swap_classes(model, table)


def revert(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Undo :func:`convert`: turn every ``MemSave*`` module back into its torch class.

    Args:
        model: The model (or a single layer) to revert.
        inplace: If ``False``, revert a deep copy and leave ``model`` untouched.

    Returns:
        The reverted model (``model`` itself when ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    return _swap_classes(model, _STOCK_CLASSES)


# --------------------------------------------------------------------------------------------------
# Measuring what autograd stores
# --------------------------------------------------------------------------------------------------


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Context manager that counts the bytes autograd stores for the backward pass inside it.

    Each stored tensor's storage is counted once (views of one storage, e.g. an in-place ReLU's
    output, share it). Storages of the tensors in ``exclude`` (typically the parameters, buffers and
    the input batch, which are alive anyway) are not counted.

    Args:
        exclude: Tensors whose storages do not count.

    Example:
        >>> with SavedTensorBytes(exclude=model.parameters()) as saved:
        ...     loss = model(x).sum()
        >>> saved.nbytes  # bytes the graph holds on to beyond the excluded tensors
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: set[tuple[torch.device, int]] = set()
        self.nbytes = 0
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.nbytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        super().__enter__()
        return self


def _storage_key(tensor: Tensor) -> tuple[torch.device, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


class PeakMemory:
    """Context manager that measures the peak of tensor memory allocated inside it.

    ``nbytes`` is the highest level of allocated bytes reached inside the block, relative to the
    level at entry (so tensors freed inside the block can make the final level negative, but not
    the peak). On CUDA it reads ``torch.cuda.max_memory_allocated``; on the CPU it replays the
    allocation and free events of torch's profiler (``profile_memory=True``) in time order, which
    counts every tensor allocation, including transient ones in the backward pass, and is
    deterministic. The profiler slows the block down: time it separately.

    Args:
        device: The device whose allocations count.

    Example:
        >>> with PeakMemory() as peak:
        ...     model(x).sum().backward()
        >>> peak.nbytes
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.nbytes = 0
        self._start = 0
        self._profiler: torch.profiler.profile | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.nbytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        assert self._profiler is not None
        self._profiler.__exit__(*exc_info)
        events = [
            event
            for event in self._profiler.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        ]
        level = peak = 0
        for event in sorted(events, key=lambda event: event.start_ns()):
            level += event.nbytes()
            peak = max(peak, level)
        self.nbytes = peak
