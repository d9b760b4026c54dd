r"""Input-side rules of parameter-free modules: activations, pooling, padding, reshapes, dropout.

The whole-network recursions (BL89, HesScale, KFRA in :mod:`~curvlab.backprop.recursions`) ask
every module on the way for its input-side step (:meth:`~curvlab.backprop.rules.base.Rule.
diag_backprop`, :meth:`~curvlab.backprop.rules.base.Rule.ggn_backprop`); the parametric layers
answer in their own rule files, the parameter-free modules here. :func:`input_rule` finds the
rule of any module, so the recursions know no layer class.

* Elementwise activations :math:`a = \phi(h)`: :math:`d_h = \phi'(h)^2 d_a + \phi''(h)\,
  \partial\ell/\partial a` and :math:`\bar G_h = \bar G_a \odot \frac1N\sum_n \phi'(h_n)
  \phi'(h_n)^\top` (the derivatives from :mod:`~curvlab.backprop.rules.activation`).
* Max pooling routes each output to one input, so :math:`(J \odot J)^\top = J^\top`; average
  pooling over windows of ``k`` inputs has entries :math:`1/k`, so :math:`(J\odot J)^\top d =
  J^\top d / k`; zero padding, reshapes and dropout in eval mode are :math:`J^\top`; dropout in
  training mode scales by :math:`1/(1-p)` once more (its Jacobian is :math:`m/(1-p)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)

from curvlab.backprop.rules.activation import ActivationRule, find_activation_rule
from curvlab.backprop.rules.base import Call, Rule

Vjp = Callable[[Tensor], Tensor]


class ElementwiseRule(Rule):
    """An elementwise activation, from its :class:`ActivationRule` (see the module docstring)."""

    def __init__(self, activation: ActivationRule) -> None:
        self.activation = activation

    @property
    def piecewise_linear(self) -> bool:
        r"""Whether :math:`\phi'' = 0` (no second-order term)."""
        return self.activation.piecewise_linear

    def diag_backprop(  # noqa: D102
        self, module: nn.Module, call: Call, d_out: Tensor, grad_out: Tensor | None, vjp: Vjp
    ) -> Tensor:
        first, second = self.activation.derivatives(module, call.args[0])
        d_in = first.square() * d_out
        if grad_out is not None and not self.piecewise_linear:
            d_in = d_in + second * grad_out
        return d_in

    def ggn_backprop(self, module: nn.Module, x: Tensor, g_bar: Tensor) -> Tensor:  # noqa: D102
        first = self.activation.first(module, x).flatten(start_dim=1)
        return g_bar * (first.T @ first / first.shape[0])


class MaxPoolRule(Rule):
    """Max pooling (and adaptive max pooling): each output copies one input."""

    def diag_backprop(  # noqa: D102
        self, module: nn.Module, call: Call, d_out: Tensor, grad_out: Tensor | None, vjp: Vjp
    ) -> Tensor:
        return vjp(d_out)


class AvgPoolRule(Rule):
    """Average pooling with windows of ``k`` inputs (zero padding counted, no ceil mode)."""

    linear_in_input = True

    def diag_backprop(  # noqa: D102
        self, module: nn.Module, call: Call, d_out: Tensor, grad_out: Tensor | None, vjp: Vjp
    ) -> Tensor:
        if (
            module.ceil_mode
            or not getattr(module, "count_include_pad", True)
            or getattr(module, "divisor_override", None)
        ):
            raise NotImplementedError("only ceil_mode=False, count_include_pad")
        kernel = module.kernel_size
        size = (
            math.prod(kernel) if isinstance(kernel, tuple) else kernel ** (call.args[0].dim() - 2)
        )
        return vjp(d_out) / size


class AdaptiveAvgPoolRule(Rule):
    """Adaptive average pooling whose output sizes divide the input sizes (equal windows)."""

    linear_in_input = True

    def diag_backprop(  # noqa: D102
        self, module: nn.Module, call: Call, d_out: Tensor, grad_out: Tensor | None, vjp: Vjp
    ) -> Tensor:
        in_sizes, out_sizes = call.args[0].shape[2:], d_out.shape[2:]
        if any(i % o for i, o in zip(in_sizes, out_sizes, strict=True)):
            raise NotImplementedError("output sizes must divide input sizes")
        return vjp(d_out) / math.prod(i // o for i, o in zip(in_sizes, out_sizes, strict=True))


class LinearMapRule(Rule):
    """Zero padding and reshapes (Flatten, Unflatten, Identity): :math:`J` has 0/1 entries."""

    linear_in_input = True

    def diag_backprop(  # noqa: D102
        self, module: nn.Module, call: Call, d_out: Tensor, grad_out: Tensor | None, vjp: Vjp
    ) -> Tensor:
        return vjp(d_out)


class DropoutRule(Rule):
    """Dropout: identity in eval mode, the recorded mask times :math:`1/(1-p)` in training."""

    linear_in_input = True

    def diag_backprop(  # noqa: D102
        self, module: nn.Module, call: Call, d_out: Tensor, grad_out: Tensor | None, vjp: Vjp
    ) -> Tensor:
        scale = 1.0 / (1.0 - module.p) if module.training else 1.0
        return vjp(d_out) * scale  # the VJP carries m / (1 - p) once

    def ggn_backprop(self, module: nn.Module, x: Tensor, g_bar: Tensor) -> Tensor:  # noqa: D102
        if module.training:
            raise NotImplementedError("dropout in training mode draws a new mask per call")
        return g_bar


class SampleWiseRule(Rule):
    """Any other parameter-free module that treats samples independently: per-sample Jacobians."""

    def ggn_backprop(self, module: nn.Module, x: Tensor, g_bar: Tensor) -> Tensor:  # noqa: D102
        if isinstance(module, _BatchNorm) and module.training:
            raise NotImplementedError("batch norm in training mode couples the samples")
        return super().ggn_backprop(module, x, g_bar)


PARAMETER_FREE: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], Rule], ...] = (
    ((_MaxPoolNd, _AdaptiveMaxPoolNd), MaxPoolRule()),
    (_AvgPoolNd, AvgPoolRule()),
    (_AdaptiveAvgPoolNd, AdaptiveAvgPoolRule()),
    (
        (nn.Flatten, nn.Unflatten, nn.Identity, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d),
        LinearMapRule(),
    ),
    (_DropoutNd, DropoutRule()),
)
"""Input-side rules of parameter-free module classes, first match wins."""

SAMPLE_WISE = SampleWiseRule()
"""The fallback: per-sample Jacobians (KFRA only; no diagonal rule)."""


def input_rule(module: nn.Module, parametric: Callable[[nn.Module], Rule | None]) -> Rule:
    """The rule that gives ``module``'s input-side steps.

    Args:
        module: Any module.
        parametric: The lookup of parametric layers' rules (:func:`~curvlab.backprop.rules.
            find_rule`).

    Returns:
        The parametric layer's rule, an :class:`ElementwiseRule`, a parameter-free rule, or
        :data:`SAMPLE_WISE`.
    """
    rule = parametric(module)
    if rule is not None:
        return rule
    activation = find_activation_rule(module)
    if activation is not None:
        return ElementwiseRule(activation)
    for classes, free in PARAMETER_FREE:
        if isinstance(module, classes):
            return free
    return SAMPLE_WISE
