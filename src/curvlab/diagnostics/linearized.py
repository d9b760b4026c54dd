r"""The linearized (kernel-regime) network: the first-order Taylor expansion in the parameters.

.. math::
    f_{\text{lin}}(x; \theta) = f(x; \theta_0) + J(x; \theta_0)\, (\theta - \theta_0),

with :math:`J(x; \theta_0) = \partial f(x; \theta) / \partial \theta` at the expansion point
:math:`\theta_0` (usually the initialization). It is linear in :math:`\theta`, its gradient
:math:`\partial f_{\text{lin}} / \partial \theta = J(x; \theta_0)` does not depend on
:math:`\theta`, and its NTK is the initial NTK at every :math:`\theta`: training it is training in
the kernel (lazy) regime. One forward pass is a Jacobian-vector product
(:func:`torch.func.jvp`, about 2-3 forward passes), so no Jacobian is formed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import reduce

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp


class LinearizedModel(nn.Module):
    r""":math:`f_{\text{lin}}(x; \theta) = f(x; \theta_0) + J(x; \theta_0)(\theta - \theta_0)`.

    Built by :func:`linearize`. Its trainable parameters :math:`\theta` are those of
    :attr:`network` (a copy of the model, same names under ``network.``), starting at
    :math:`\theta_0`; train them with any ``torch.optim`` optimizer over ``parameters()``.
    :attr:`reference`, a frozen copy holding :math:`\theta_0` and the buffers, is what the forward
    pass evaluates and differentiates.

    Attributes:
        network: The copy whose parameters are :math:`\theta` (only ``parameter_names`` are used).
        reference: The frozen copy at :math:`\theta_0`.
        parameter_names: Names (``named_parameters()`` of the model) of the linearized parameters;
            the model's other parameters stay at their values in ``reference``.
    """

    def __init__(self, model: nn.Module, params0: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to linearize")
        if params0 is not None:
            unknown = sorted(set(params0) - set(names))
            missing = [name for name in names if name not in params0]
            if unknown or missing:
                raise ValueError(
                    f"params0 must give every trainable parameter of {type(model).__name__} by "
                    f"name; unknown: {unknown[:3]}, missing: {missing[:3]}"
                )
        self.parameter_names = names
        self.reference = copy.deepcopy(model)
        self.network = copy.deepcopy(model)
        with torch.no_grad():
            for name in names:
                start = model.get_parameter(name) if params0 is None else params0[name]
                self.reference.get_parameter(name).copy_(start)
                self.network.get_parameter(name).copy_(start)
        self.reference.requires_grad_(False)

    def initial_parameters(self) -> dict[str, Tensor]:
        r"""The expansion point :math:`\theta_0` by name."""
        return {name: _attribute(self.reference, name) for name in self.parameter_names}

    def forward(self, inputs: Tensor) -> Tensor:
        r""":math:`f(x; \theta_0) + J(x; \theta_0)(\theta - \theta_0)`, shaped like the model's output.

        Args:
            inputs: ``[N, *]`` inputs of the model.
        """
        primals = self.initial_parameters()
        tangents = {name: _attribute(self.network, name) - primals[name] for name in primals}

        def f(params: dict[str, Tensor]) -> Tensor:
            return functional_call(self.reference, params, (inputs,))

        out, change = jvp(f, (primals,), (tangents,))
        return out + change


def linearize(model: nn.Module, params0: Mapping[str, Tensor] | None = None) -> LinearizedModel:
    r"""The model's first-order Taylor expansion in its trainable parameters around ``params0``.

    Args:
        model: The network (copied; it is not changed).
        params0: :math:`\theta_0` for every trainable parameter by name (default: the model's
            current values).

    Returns:
        A :class:`LinearizedModel` whose parameters start at :math:`\theta_0`; train it with a
        ``torch.optim`` optimizer like the network itself.
    """
    return LinearizedModel(model, params0)


def _attribute(module: nn.Module, dotted: str) -> Tensor:
    """``module.a.b.weight`` by attribute access, so substituted tensors are seen."""
    return reduce(getattr, dotted.split("."), module)
