r"""A damped Newton step restricted to the GGN's top-``k`` eigenspace (ViViT).

.. math::

    \Delta = -\sum_k e_k \frac{e_k^\top g}{\lambda_k + \delta(\lambda_k)}

with :math:`g` the gradient of the batch loss (the whole batch, also with ``subsampling``),
:math:`(\lambda_k, e_k)` the top-``k`` GGN eigenpairs (:func:`~curvlab.vivit.eigh.ggn_eigh`)
and :math:`\delta` a damping function the user supplies. Directions outside the eigenspace get
no step. With blocks, each block takes its own step from its part of :math:`g`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from curvlab.vivit.eigh import Blocks, decompose

Damping = Callable[[Tensor], Tensor]
"""Maps the eigenvalues ``[k]`` to the damping ``[k]`` (or a scalar)."""


def constant_damping(value: float) -> Damping:
    r"""The damping :math:`\delta(\lambda) = \delta_0`, the same for every direction.

    Args:
        value: :math:`\delta_0 \geq 0`.

    Raises:
        ValueError: ``value`` is negative.
    """
    if value < 0:
        raise ValueError(f"damping must be non-negative, got {value}")

    def damping(eigenvalues: Tensor) -> Tensor:
        return torch.full_like(eigenvalues, value)

    return damping


def damped_newton_step(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    k: int,
    damping: float | Damping = 1.0,
    mc_samples: int | None = None,
    subsampling: Sequence[int] | None = None,
    per_parameter: Blocks = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""The damped Newton step :math:`\Delta` in the top-``k`` GGN eigenspace (module docstring).

    Args:
        model: The model.
        loss_func: Its loss function.
        inputs: The batch ``[N, ...]``.
        targets: Its targets.
        k: Eigen-directions (per block).
        damping: :math:`\delta`: a number (constant damping) or a function of the eigenvalues
            ``[k]`` (e.g. :func:`constant_damping`, or ``lambda ev: 0.1 * ev + 1e-3``).
        mc_samples: ``None`` (exact GGN) or MC samples per input.
        subsampling: Samples whose GGN is used (the gradient always uses the whole batch).
        per_parameter: The blocks, as in :func:`~curvlab.vivit.eigh.ggn_eigh`.
        generator: Random number generator for MC sampling.

    Returns:
        The step by parameter name, shaped like the parameters (zero for parameters in no
        block); apply it with ``p.add_(step[name])``. A direction with
        :math:`\lambda_k + \delta(\lambda_k) = 0` (or a zero eigenvector) gets no step.
    """
    damp = constant_damping(damping) if isinstance(damping, (int, float)) else damping
    results, spaces = decompose(
        model, loss_func, inputs, targets, k, mc_samples, subsampling, per_parameter, generator
    )
    step = {name: torch.zeros_like(g) for name, g in results.grad.items()}
    for space in spaces:
        grad = torch.cat([results.grad[name].flatten() for name in space.names])
        projections = space.eigenvectors.T @ grad  # [k]
        denominator = space.eigenvalues + damp(space.eigenvalues)
        usable = space.valid & (denominator != 0)
        weights = torch.where(usable, projections / denominator, projections.new_zeros(()))
        flat = -(space.eigenvectors @ weights)
        for name, part in zip(space.names, flat.split([step[n].numel() for n in space.names])):
            step[name] = part.reshape(step[name].shape)
    return step
