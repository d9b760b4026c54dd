"""The :class:`Results` container returned by :func:`curvlab.backprop.compute`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from curvlab.backprop.quantities import Quantity


class Results(Mapping[str, dict[str, Any]]):
    """Loss, gradient and the requested quantities of one :func:`compute` call.

    ``results[q]`` (``q`` a :class:`~curvlab.backprop.quantities.Quantity` or its ``name``) is a
    plain ``dict`` keyed by ``model.named_parameters()`` names (trainable parameters only).

    Attributes:
        loss: The batch loss as the user's loss function computed it (detached scalar).
        grad: Its gradient by parameter name, each shaped like the parameter.
        output: The model output (detached), ``[N, ...]``.
    """

    def __init__(
        self,
        loss: Tensor,
        grad: dict[str, Tensor],
        output: Tensor,
        quantities: dict[str, dict[str, Any]],
    ) -> None:
        self.loss = loss
        self.grad = grad
        self.output = output
        self._quantities = quantities

    def __getitem__(self, key: str | Quantity) -> dict[str, Any]:
        name = key.name if isinstance(key, Quantity) else key
        try:
            return self._quantities[name]
        except KeyError:
            raise KeyError(
                f"{name!r} was not computed; available: {sorted(self._quantities)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._quantities)

    def __len__(self) -> int:
        return len(self._quantities)

    def __repr__(self) -> str:
        return f"Results(loss={self.loss.item():.6g}, quantities={list(self._quantities)})"
