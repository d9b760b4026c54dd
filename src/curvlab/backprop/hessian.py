r"""Signed factors of the Hessian w.r.t. module outputs, for the exact Hessian diagonal.

For the output :math:`z` of a module that is linear in its parameters, the parameter block of
the Hessian is :math:`J_\theta^\top (\nabla_z^2 L) J_\theta`. By the chain rule,

.. math::
    \nabla_z^2 \ell_n = J_{f,z}^\top H_n J_{f,z}
        + \sum_k J_{h_k, z}^\top \mathrm{diag}\big(\phi_k''(h_k) \odot \partial \ell_n /
          \partial a_k\big) J_{h_k, z},

summing over the elementwise activation modules :math:`a_k = \phi_k(h_k)` between :math:`z` and
the loss, *provided every other operation on the way is linear in the activations*. The first
term is the GGN (the loss Hessian's square root back-propagated); each residual term is
back-propagated as the columns :math:`\sqrt{|\rho_k|}\, e_j` with the signs of
:math:`\rho_k = \phi_k'' \odot \partial\ell_n/\partial a_k` kept apart ("hessian+" and
"hessian-" factors). :func:`graph_obstacle` checks the condition on the autograd graph with a
list of operations known to be linear (views, additions, concatenation, pooling, ReLU, products
with a constant, ...) and a table of custom autograd Functions keyed by their class
(:data:`FUNCTION_KINDS`, holding :mod:`curvlab.nn.memsave`'s); anything else sends the Hessian
quantities to the generic path.

Why a table of node names: an autograd node carries no description of its math. Its Python class
is generated per operator (``ViewBackward0``, ``TanhBackward0``, ...) with the operator's name as
its only identity, and neither its saved tensors (``ReluBackward0`` and ``TanhBackward0`` both save
their result) nor its callable backward tell a linear operation from a nonlinear one. The
alternatives are (a) probing each node numerically, which costs extra backward passes and can
only suggest linearity, or (b) re-running the model under a tracer, which the capture path cannot
do. So the check keeps two short prefix lists for built-in operators and keys custom Functions by
class (:data:`FUNCTION_KINDS`); it errs one way only: an unlisted name is an obstacle (exact
generic fallback), never taken as linear. ``tests/backprop/test_hessian_graph.py`` builds every
listed operation in the installed torch and checks its nodes' kinds, so a renamed node fails a
test instead of silently slowing the Hessian quantities.

:math:`\phi_k''` comes from the activation rules (:mod:`curvlab.backprop.rules.activation`), which
also define :data:`ELEMENTWISE` and :data:`PIECEWISE_LINEAR` (re-exported here).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop.rules.activation import ELEMENTWISE, PIECEWISE_LINEAR, second_derivative
from curvlab.backprop.rules.base import Call
from curvlab.nn.memsave import BILINEAR_FUNCTIONS, LINEAR_FUNCTIONS

ZERO_ONE_OPS = (
    "Add",
    "View",
    "UnsafeView",
    "ReshapeAlias",
    "Reshape",
    "Cat",
    "Stack",
    "Transpose",
    "Permute",
    "TBackward",
    "Expand",
    "Squeeze",
    "Unsqueeze",
    "Select",
    "Slice",
    "Index",
    "Clone",
    "Sum",
    "Split",
    "Unbind",
    "ToCopy",
    "Alias",
    "Flip",
    "Roll",
    "Repeat",
    "ConstantPadNd",
)
"""Autograd node names (prefixes) of linear ops whose Jacobians have entries 0 and 1 only."""

_LINEAR_PREFIXES = (
    *ZERO_ONE_OPS,
    "Sub",
    "Neg",
    "Mean",
    "AvgPool",
    "AdaptiveAvgPool",
    "MaxPool",
    "AdaptiveMaxPool",
    "Relu",
    "Threshold",
    "LeakyRelu",
    "Hardtanh",
    "ReflectionPad",
    "ReplicationPad",
    "NativeDropout",
)
_PRODUCT_PREFIXES = (
    "Mul",
    "Mm",
    "Addmm",
    "Bmm",
    "Baddbmm",
    "Mv",
    "Addmv",
    "Convolution",
    "Linear",
    "Dot",
    "Div",
)


FUNCTION_KINDS: dict[type[torch.autograd.Function], str] = {
    **dict.fromkeys(LINEAR_FUNCTIONS, "linear"),
    **dict.fromkeys(BILINEAR_FUNCTIONS, "product"),
}
"""``FUNCTION_KINDS[cls]``: how the custom autograd Function ``cls`` (a subclass of
:class:`torch.autograd.Function`) enters second derivatives. ``"linear"``: (piecewise) linear in
its differentiable inputs, zero second derivative almost everywhere; ``"product"``: linear in each
tensor operand separately (a product of two activations is then an obstacle). Holds
:mod:`curvlab.nn.memsave`'s Functions; register your own so their nodes do not send the Hessian
quantities to the generic path. Custom Functions not listed here are obstacles, whatever their
name."""


def _kind(node: Any) -> str:
    """``"linear"``, ``"product"`` or ``"other"`` for an autograd node."""
    function = getattr(type(node), "_forward_cls", None)  # set on custom Functions' nodes
    if function is not None:
        return FUNCTION_KINDS.get(function, "other")
    name = node.name()
    if name.startswith(_PRODUCT_PREFIXES):
        return "product"
    if name.startswith(_LINEAR_PREFIXES):
        return "linear"
    return "other"


def graph_obstacle(
    output: Tensor,
    modules: list[tuple[str, nn.Module, Call, bool]],
    activations: list[tuple[str, nn.Module, Call]],
) -> str | None:
    """Why the signed-factor Hessian is not exact for this graph, or ``None`` if it is.

    Args:
        output: The model output (attached).
        modules: ``(name, module, call, ok)`` for the calls of modules with parameters; ``ok``
            when the module is linear in its parameters and its tensor inputs.
        activations: ``(name, module, call)`` for calls of elementwise activation modules.

    Returns:
        A description of the first obstacle found, or ``None``.
    """
    stops: dict[Any, tuple[str, Any]] = {}
    for name, module, call, ok in modules:
        for out in call.outputs:
            if out.grad_fn is not None:
                stops[out.grad_fn] = ("module", (name, module, call, ok))
    for name, module, call in activations:
        for out in call.outputs:
            if out.grad_fn is not None:
                stops[out.grad_fn] = ("activation", (name, module, call))

    def children(node: Any) -> list[Any]:
        if node in stops:
            return [n for n in stops[node][1][2].input_nodes if n is not None]
        return [n for n, _ in node.next_functions if n is not None]

    # post-order: does a node depend on any recorded module / activation output?
    depends: dict[Any, bool] = {}
    root = output.grad_fn
    if root is None:
        return None
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in depends:
            continue
        kids = children(node)
        if not expanded:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if k not in depends)
            continue
        depends[node] = node in stops or any(depends.get(k, False) for k in kids)

    for node, dep in depends.items():
        if not dep:
            continue
        kids = children(node)
        dependent_kids = [k for k in kids if depends.get(k, False)]
        if node in stops:
            kind, info = stops[node]
            # a module nonlinear in its input matters only if that input depends on parameters
            if kind == "module" and dependent_kids and not info[3]:
                return f"{type(info[1]).__name__} (module '{info[0]}') is not linear in its input"
            continue
        kind = _kind(node)
        if kind == "linear":
            continue
        if kind == "product":
            nexts = [n for n, _ in node.next_functions]
            if node.name().startswith("Div") and len(nexts) > 1 and depends.get(nexts[1], False):
                return f"a division by an activation ({node.name()})"
            if len(dependent_kids) > 1:
                return f"a product of two activations ({node.name()})"
            continue
        return f"the operation {node.name()}, whose second derivative curvlab does not know"
    return None


def residual_columns(
    module: nn.Module, h: Tensor, grad_a: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    r"""Columns :math:`\sqrt{|\rho|}\,e_j` of one activation's residual and their signs.

    Args:
        module: The activation :math:`a = \phi(h)`.
        h: Its input ``[N, *D]``.
        grad_a: Per-sample loss gradients w.r.t. its output ``[N, *D]``.
        mask: ``[N]`` 0/1 sample mask (subsampling) or ``None``.

    Returns:
        Columns ``[D, N, *D]`` and signs ``[D, N]`` (:math:`+1`, :math:`-1` or 0).
    """
    rho = second_derivative(module, h) * grad_a
    if mask is not None:
        rho = rho * mask.reshape(-1, *[1] * (rho.dim() - 1))
    n = rho.shape[0]
    d = math.prod(rho.shape[1:])
    flat = rho.reshape(n, d)
    eye = torch.eye(d, dtype=rho.dtype, device=rho.device)
    columns = eye[:, None, :] * flat.abs().sqrt()[None]
    return columns.reshape(d, *rho.shape), flat.sign().T


__all__ = [
    "ELEMENTWISE",
    "FUNCTION_KINDS",
    "PIECEWISE_LINEAR",
    "graph_obstacle",
    "residual_columns",
]
