r"""The extended-backpropagation entry point :func:`compute`: a thin call of the in-loop capture.

``compute(model, loss_func, inputs, targets, quantities)`` runs ``loss_func(model(inputs),
targets)`` inside :func:`~curvlab.backprop.capturing.capture` and lets the capture run its own
backward, which leaves ``param.grad`` untouched. The engine's parts:

* :mod:`~curvlab.backprop.recording`: forward hooks, parameter owners, rule choice, checks;
* :mod:`~curvlab.backprop.sources`: what is back-propagated (gradient, exact or MC square roots,
  signed Hessian factors), as typed objects;
* :mod:`~curvlab.backprop.plan`: the state after the forward and the choice of path;
* :mod:`~curvlab.backprop.streamed`: quantities reduced inside the backward passes;
* :mod:`~curvlab.backprop.general`: output gradients and factors first, then the rules;
* :mod:`~curvlab.backprop.assembly`: per-parameter evaluation shared by both paths;
* :mod:`~curvlab.backprop.capturing`: the context manager that ties them to a training loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from curvlab.backprop.capturing import capture, check_finite
from curvlab.backprop.quantities import Quantity
from curvlab.backprop.recording import MAX_FULL_BLOCK, METHODS
from curvlab.backprop.results import Results

__all__ = ["MAX_FULL_BLOCK", "METHODS", "compute"]


def compute(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    quantities: Iterable[Quantity | str] = (),
    *,
    method: str = "auto",
    subsampling: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    params: Iterable[str | Tensor] | None = None,
) -> Results:
    r"""One forward and one backward pass that return the loss, gradient and ``quantities``.

    Args:
        model: Any module; samples must be processed independently (BatchNorm in eval mode).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``,
            reduction ``"mean"`` or ``"sum"``.
        inputs: The batch ``[N, ...]`` passed as ``model(inputs)``.
        targets: Targets for ``loss_func(model(inputs), targets)``.
        quantities: Quantity objects (:mod:`curvlab.backprop.quantities`) or their names,
            distinct.
        method: ``"auto"``: per-layer rules where they exist, the generic torch.func path for
            other parametric modules (warned once). ``"func"``: the generic path everywhere
            (Kronecker quantities and recursions still use their layer rules).
        subsampling: Indices of the samples that per-sample and curvature quantities use
            (scaling :math:`r` stays that of the full batch); the gradient and loss always use
            the full batch.
        generator: Random number generator for MC sampling.
        params: The parameters (names or tensors) to compute quantities and ``grad`` for
            (default: every trainable one).

    Returns:
        :class:`~curvlab.backprop.results.Results` with ``loss``, ``grad``, ``output`` and
        ``results[q][param_name]`` for every requested quantity.

    Raises:
        UnsupportedModuleError: A module that no path can handle, naming it and the reason.
        UnsupportedLossError: An unsupported loss, reduction or target shape.
        NonFiniteError: NaN or Inf in ``inputs``, the model output or the loss.
    """
    if isinstance(inputs, Tensor):
        check_finite("inputs", inputs)
    with capture(
        model,
        loss_func,
        quantities,
        method=method,
        subsampling=subsampling,
        generator=generator,
        params=params,
    ) as captured:
        loss_func(model(inputs), targets)
    return captured.results
