r"""Derivatives of elementwise activations: :math:`\phi'(h)` and :math:`\phi''(h)`, written once.

An elementwise activation :math:`a = \phi(h)` has the diagonal input Jacobian
:math:`\mathrm{diag}(\phi'(h))` and the diagonal second derivative :math:`\phi''(h)`; every
consumer (the signed Hessian factors of :mod:`curvlab.backprop.hessian`, the BL89 / HesScale /
KFRA recursions, the exact Gauss-Newton optimizer's branch slopes) takes them from here.

Each registered module class has an :class:`ActivationRule` with closed forms (using the module's
own hyperparameters: slopes, ``alpha``, ``beta``, ``threshold``, ``approximate``); an unknown
elementwise module, or a subclass whose ``forward`` may compute something else, gets the same
derivatives by double backward through the module (:data:`AUTOGRAD`). At the kinks of
piecewise-defined activations the closed forms take the value torch's autograd takes there
(e.g. :math:`\mathrm{ReLU}'(0) = 0`, :math:`\mathrm{LeakyReLU}'(0) = \text{slope}`), so both
paths agree everywhere. Shapes: ``h``, :math:`\phi'(h)` and :math:`\phi''(h)` are all
``[N, *D]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.backprop.rules.same_forward import computes_forward_of

Derivative = Callable[[nn.Module, Tensor], Tensor]
r"""A closed form :math:`(\text{module}, h) \mapsto \phi^{(k)}(h)`."""


class ActivationRule:
    r""":math:`\phi'` and :math:`\phi''` of one elementwise activation.

    Args:
        first: Closed form of :math:`\phi'(h)`; ``None`` computes both derivatives by double
            backward through the module.
        second: Closed form of :math:`\phi''(h)`; ``None`` with ``first`` given means
            :math:`\phi'' = 0` (a piecewise-linear activation).
    """

    def __init__(self, first: Derivative | None = None, second: Derivative | None = None) -> None:
        self._first = first
        self._second = second

    @property
    def closed_form(self) -> bool:
        """Whether the derivatives are closed forms (not autograd)."""
        return self._first is not None

    @property
    def piecewise_linear(self) -> bool:
        r"""Whether :math:`\phi'' = 0` almost everywhere."""
        return self.closed_form and self._second is None

    def first(self, module: nn.Module, h: Tensor) -> Tensor:
        r""":math:`\phi'(h)`, ``[N, *D]``."""
        if self._first is None:
            return _autograd_derivatives(module, h)[0]
        return self._first(module, h)

    def second(self, module: nn.Module, h: Tensor) -> Tensor:
        r""":math:`\phi''(h)`, ``[N, *D]``."""
        if self._first is None:
            return _autograd_derivatives(module, h)[1]
        return torch.zeros_like(h) if self._second is None else self._second(module, h)

    def derivatives(self, module: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\phi'(h), \phi''(h))`, each ``[N, *D]`` (one double backward without a closed form)."""
        if self._first is None:
            return _autograd_derivatives(module, h)
        return self.first(module, h), self.second(module, h)


def _autograd_derivatives(module: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\phi'(h)` and :math:`\phi''(h)` of an elementwise ``module`` by double backward.

    For an elementwise function the gradient of :math:`\sum_j \phi(h_j)` is :math:`\phi'(h)` and
    that of :math:`\sum_j \phi'(h_j)` is :math:`\phi''(h)`.
    """
    with torch.enable_grad():
        x = h.detach().requires_grad_(True)
        (first,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
        if first.grad_fn is None:
            return first.detach(), torch.zeros_like(h)
        (second,) = torch.autograd.grad(first.sum(), x, allow_unused=True)
    return first.detach(), torch.zeros_like(h) if second is None else second


AUTOGRAD = ActivationRule()
"""The rule for elementwise modules without a closed form: derivatives by double backward."""


# ------------------------------------------------------------------------------ closed forms
def _mask(condition: Tensor, like: Tensor) -> Tensor:
    return condition.to(like.dtype)


def _sigmoid_terms(h: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\sigma(h)` and :math:`\sigma'(h) = \sigma (1 - \sigma)`."""
    s = torch.sigmoid(h)
    return s, s * (1.0 - s)


def _tanh_terms(h: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\tanh(h)` and :math:`\tanh'(h) = 1 - \tanh^2`."""
    t = torch.tanh(h)
    return t, 1.0 - t * t


def _exponential_first(h: Tensor, scale: float, alpha: float, input_scale: float) -> Tensor:
    r"""ELU family :math:`\phi(h) = s\,h` (:math:`h > 0`), :math:`s\,\alpha (e^{c h} - 1)` else."""
    curve = scale * alpha * input_scale * torch.exp(h * input_scale)
    return torch.where(h > 0, scale, curve)


def _exponential_second(h: Tensor, scale: float, alpha: float, input_scale: float) -> Tensor:
    curve = scale * alpha * input_scale**2 * torch.exp(h * input_scale)
    return torch.where(h < 0, curve, 0.0)


SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


def _hardtanh_first(module: nn.Module, h: Tensor) -> Tensor:
    return _mask((h > module.min_val) & (h < module.max_val), h)


def _softplus_first(module: nn.Module, h: Tensor) -> Tensor:
    beta_h = h * module.beta
    return torch.where(beta_h > module.threshold, 1.0, torch.sigmoid(beta_h))


def _softplus_second(module: nn.Module, h: Tensor) -> Tensor:
    beta_h = h * module.beta
    return torch.where(beta_h >= module.threshold, 0.0, module.beta * _sigmoid_terms(beta_h)[1])


_GELU_TANH_K = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def _gelu_first(module: nn.Module, h: Tensor) -> Tensor:
    r"""Exact: :math:`\Phi(h) + h\varphi(h)`; tanh: :math:`\frac12(1 + t) + \frac12 h (1 - t^2) u'`."""
    if module.approximate == "tanh":
        u_prime = _GELU_TANH_K * (1.0 + 3.0 * _GELU_TANH_C * h * h)
        t, dt = _tanh_terms(_GELU_TANH_K * (h + _GELU_TANH_C * h**3))
        return 0.5 * (1.0 + t) + 0.5 * h * dt * u_prime
    cdf = 0.5 * (1.0 + torch.erf(h * math.sqrt(0.5)))
    return cdf + h * _normal_pdf(h)


def _gelu_second(module: nn.Module, h: Tensor) -> Tensor:
    r"""Exact: :math:`\varphi(h)(2 - h^2)`; tanh: :math:`(1 - t^2)(u' + \frac12 h (u'' - 2 t u'^2))`."""
    if module.approximate == "tanh":
        u_prime = _GELU_TANH_K * (1.0 + 3.0 * _GELU_TANH_C * h * h)
        u_second = 6.0 * _GELU_TANH_K * _GELU_TANH_C * h
        t, dt = _tanh_terms(_GELU_TANH_K * (h + _GELU_TANH_C * h**3))
        return dt * (u_prime + 0.5 * h * (u_second - 2.0 * t * u_prime * u_prime))
    return _normal_pdf(h) * (2.0 - h * h)


def _normal_pdf(h: Tensor) -> Tensor:
    return torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)


def _silu_first(module: nn.Module, h: Tensor) -> Tensor:
    s, ds = _sigmoid_terms(h)
    return s + h * ds


def _silu_second(module: nn.Module, h: Tensor) -> Tensor:
    s, ds = _sigmoid_terms(h)
    return ds * (2.0 + h * (1.0 - 2.0 * s))


def _mish_first(module: nn.Module, h: Tensor) -> Tensor:
    r""":math:`\phi = h \tanh(\mathrm{sp}(h))`: :math:`t + h \sigma (1 - t^2)`."""
    t, dt = _tanh_terms(nn.functional.softplus(h))
    return t + h * torch.sigmoid(h) * dt


def _mish_second(module: nn.Module, h: Tensor) -> Tensor:
    r""":math:`(1 - t^2)(2\sigma + h \sigma (1 - \sigma) - 2 h \sigma^2 t)`."""
    t, dt = _tanh_terms(nn.functional.softplus(h))
    s, ds = _sigmoid_terms(h)
    return dt * (2.0 * s + h * ds - 2.0 * h * s * s * t)


def _hardswish_first(module: nn.Module, h: Tensor) -> Tensor:
    middle = torch.where(h < 3.0, h / 3.0 + 0.5, 1.0)
    return torch.where(h <= -3.0, 0.0, middle)


def _hardswish_second(module: nn.Module, h: Tensor) -> Tensor:
    return _mask((h > -3.0) & (h < 3.0), h) / 3.0


def _softsign_first(module: nn.Module, h: Tensor) -> Tensor:
    return (1.0 + h.abs()).pow(-2)


def _softsign_second(module: nn.Module, h: Tensor) -> Tensor:
    return -2.0 * torch.sign(h) * (1.0 + h.abs()).pow(-3)


ACTIVATION_RULES: dict[type[nn.Module], ActivationRule] = {
    nn.Identity: ActivationRule(lambda m, h: torch.ones_like(h)),
    nn.ReLU: ActivationRule(lambda m, h: _mask(h > 0, h)),
    nn.LeakyReLU: ActivationRule(
        lambda m, h: torch.where(h > 0, 1.0, torch.full_like(h, m.negative_slope))
    ),
    nn.ReLU6: ActivationRule(_hardtanh_first),
    nn.Hardtanh: ActivationRule(_hardtanh_first),
    nn.Hardsigmoid: ActivationRule(lambda m, h: _mask((h > -3.0) & (h < 3.0), h) / 6.0),
    nn.Sigmoid: ActivationRule(
        lambda m, h: _sigmoid_terms(h)[1],
        lambda m, h: _sigmoid_terms(h)[1] * (1.0 - 2.0 * torch.sigmoid(h)),
    ),
    nn.LogSigmoid: ActivationRule(
        lambda m, h: torch.sigmoid(-h), lambda m, h: -_sigmoid_terms(h)[1]
    ),
    nn.Tanh: ActivationRule(
        lambda m, h: _tanh_terms(h)[1],
        lambda m, h: -2.0 * torch.tanh(h) * _tanh_terms(h)[1],
    ),
    nn.Tanhshrink: ActivationRule(
        lambda m, h: torch.tanh(h).square(),
        lambda m, h: 2.0 * torch.tanh(h) * _tanh_terms(h)[1],
    ),
    nn.Softsign: ActivationRule(_softsign_first, _softsign_second),
    nn.ELU: ActivationRule(
        lambda m, h: _exponential_first(h, 1.0, m.alpha, 1.0),
        lambda m, h: _exponential_second(h, 1.0, m.alpha, 1.0),
    ),
    nn.CELU: ActivationRule(
        lambda m, h: _exponential_first(h, 1.0, m.alpha, 1.0 / m.alpha),
        lambda m, h: _exponential_second(h, 1.0, m.alpha, 1.0 / m.alpha),
    ),
    nn.SELU: ActivationRule(
        lambda m, h: _exponential_first(h, SELU_SCALE, SELU_ALPHA, 1.0),
        lambda m, h: _exponential_second(h, SELU_SCALE, SELU_ALPHA, 1.0),
    ),
    nn.Softplus: ActivationRule(_softplus_first, _softplus_second),
    nn.GELU: ActivationRule(_gelu_first, _gelu_second),
    nn.SiLU: ActivationRule(_silu_first, _silu_second),
    nn.Mish: ActivationRule(_mish_first, _mish_second),
    nn.Hardswish: ActivationRule(_hardswish_first, _hardswish_second),
}
"""Closed-form rules by module class (``nn.ReLU6`` subclasses ``nn.Hardtanh``)."""

ELEMENTWISE: tuple[type[nn.Module], ...] = tuple(
    c for c in ACTIVATION_RULES if c is not nn.Identity
)
"""Elementwise activation modules with a rule (``nn.Identity`` is left out: the graph sees it as
no operation at all)."""

PIECEWISE_LINEAR: tuple[type[nn.Module], ...] = tuple(
    c for c in ELEMENTWISE if ACTIVATION_RULES[c].piecewise_linear
)
"""Elementwise activations with a zero second derivative (almost everywhere)."""


def find_activation_rule(module: nn.Module) -> ActivationRule | None:
    """The rule of an elementwise activation module, or ``None`` if it is not one.

    The nearest registered class in ``type(module).__mro__`` decides. Its closed forms apply
    when ``module`` computes that class's ``forward`` (it does not override it, or overrides it
    with an equivalent one declared in :data:`~curvlab.backprop.rules.same_forward.SAME_FORWARD`,
    as :mod:`curvlab.nn.memsave`'s variants are); a subclass with another ``forward`` gets
    :data:`AUTOGRAD`.
    """
    cls = type(module)
    for registered in cls.__mro__:
        if registered in ACTIVATION_RULES:
            same = computes_forward_of(cls, registered)
            return ACTIVATION_RULES[registered] if same else AUTOGRAD
    return None


def activation_derivatives(module: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`(\phi'(h), \phi''(h))` of an elementwise ``module`` at ``h`` ``[N, *D]``.

    Closed forms where :func:`find_activation_rule` has them, double backward otherwise.
    """
    return (find_activation_rule(module) or AUTOGRAD).derivatives(module, h.detach())


def first_derivative(module: nn.Module, h: Tensor) -> Tensor:
    r""":math:`\phi'(h)` of an elementwise ``module`` at ``h`` ``[N, *D]``."""
    return (find_activation_rule(module) or AUTOGRAD).first(module, h.detach())


def second_derivative(module: nn.Module, h: Tensor) -> Tensor:
    r""":math:`\phi''(h)` of an elementwise ``module`` at ``h`` ``[N, *D]``."""
    return (find_activation_rule(module) or AUTOGRAD).second(module, h.detach())
