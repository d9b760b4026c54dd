"""Turning back-propagated factors into quantity values, shared by both paths.

One place for the per-parameter evaluation (with the error that names the module when a rule
lacks a primitive), for the zero factors of modules the loss never reached, and for the
finishing step that gives every quantity its own tensor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab.backprop.derivatives import Context, Owner, ParamDerivatives
from curvlab.backprop.errors import UnsupportedModuleError
from curvlab.backprop.quantities import Quantity


def evaluate(
    quantity: Quantity,
    view: ParamDerivatives,
    ctx: Context,
    streamed: bool = False,
) -> Any:
    """``quantity``'s value for ``view``'s parameter, naming the module if a rule falls short.

    Raises:
        UnsupportedModuleError: A rule of a module that uses the parameter lacks a primitive.
    """
    try:
        if streamed:
            return quantity.evaluate_streamed(view, ctx)
        return quantity.evaluate(view, ctx)
    except NotImplementedError as err:
        culprit = ", ".join(f"{type(o.module).__name__} (module '{o.name}')" for o, _ in view.uses)
        raise UnsupportedModuleError(
            f"{quantity.name} is not available for parameter '{view.name}' of {culprit}: {err}"
        ) from err


def zero_factor(
    like: TensorLike, columns: int, num_samples: int | None = None, batch_dim: int = 0
) -> Tensor:
    """A zero factor ``[M, N, *rest]`` for an output ``like`` that no column reached.

    ``rest`` is ``like``'s shape without its batch dimension ``batch_dim`` (``1`` for the
    sequence-first outputs and the states of recurrent layers).
    """
    n = like.shape[batch_dim] if num_samples is None else num_samples
    rest = [size for d, size in enumerate(like.shape) if d != batch_dim]
    return torch.zeros(columns, n, *rest, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class TensorLike:
    """Shape, dtype and device of a tensor that is no longer kept."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: Tensor) -> TensorLike:
        """The description of ``t``."""
        return cls(t.shape, t.dtype, t.device)


def owned_parameters(
    owners: list[Owner], uses: dict[str, list[tuple[Owner, str]]]
) -> dict[Owner, list[str]]:
    """Per owner, the full names of the parameters it provides derivatives for."""
    owned: dict[Owner, list[str]] = {own: [] for own in owners}
    for full, pairs in uses.items():
        for own, _ in pairs:
            owned[own].append(full)
    return owned


def finish_streamed(
    quantities: list[Quantity],
    partial: dict[str, dict[str, Any]],
    names: list[str],
    unused_value,
    ctx: Context,
) -> dict[str, dict[str, Any]]:
    """Complete the partial values of the streamed path, in ``named_parameters()`` order.

    A quantity that finishes its value in place gets its own copy of a tensor that another
    quantity also returned; ``unused_value(quantity, name)`` gives a parameter that no module
    used its (zero) value.
    """
    shared = Counter(id(v) for part in partial.values() for v in part.values())
    values: dict[str, dict[str, Any]] = {}
    for q in quantities:
        values[q.name] = {}
        finishes = type(q).finish_streamed is not Quantity.finish_streamed
        for name in names:
            if name in partial[q.name]:
                value = partial[q.name][name]
                if finishes and shared[id(value)] > 1 and isinstance(value, Tensor):
                    value = value.clone()
                values[q.name][name] = q.finish_streamed(value, name, ctx)
            elif not q.layerwise:
                values[q.name][name] = unused_value(q, name)
    return values
