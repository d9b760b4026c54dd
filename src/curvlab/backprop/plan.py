"""What one pass knows once the loss is computed: :class:`Plan`, and the choice of path.

A plan is built when the captured loss function returns (:mod:`~curvlab.backprop.capturing`):
the recorded calls, the owners of the trainable parameters and their rules, the loss and the
model output (attached to the graph), and the sources the quantities need. :meth:`Plan.
streamable` decides between the streamed path (:mod:`~curvlab.backprop.streamed`) and the
general one (:mod:`~curvlab.backprop.general`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.backprop.derivatives import Context, Owner
from curvlab.backprop.functional import FuncRule
from curvlab.backprop.loss import LossSpec
from curvlab.backprop.quantities import Quantity
from curvlab.backprop.rules.base import Call
from curvlab.backprop.sources import HESSIAN_NEG, HESSIAN_POS, Source, as_source


def sources_of(quantity: Quantity) -> tuple[Source, ...]:
    """A quantity's sources as :class:`~curvlab.backprop.sources.Source` objects."""
    return tuple(as_source(s) for s in quantity.sources())


@dataclass
class Plan:
    r"""The state of one pass after the forward (see the module docstring).

    Attributes:
        model: The model.
        spec: The loss function's second-order view.
        quantities: The requested quantities.
        method: ``"auto"`` or ``"func"``.
        named: Trainable ``(name, parameter)`` pairs in ``named_parameters()`` order.
        records: Recorded calls by module name.
        owners: Called modules with trainable parameters.
        uses: Per parameter name, its ``(owner, local name)`` pairs.
        inputs: The model's positional inputs (its first recorded call).
        output: The model output (attached to the graph).
        targets: The targets.
        loss: The loss (attached to the graph).
        index: The subsample's indices, or ``None``.
        generator: Random number generator for MC sampling.
        output_grad: :math:`\partial L / \partial f` when the user's backward has already passed
            the loss (the engine's gradient pass then starts at the model output), else ``None``.
    """

    model: nn.Module
    spec: LossSpec
    quantities: list[Quantity]
    method: str
    named: list[tuple[str, nn.Parameter]]
    records: dict[str, list[Call]]
    owners: list[Owner]
    uses: dict[str, list[tuple[Owner, str]]]
    inputs: tuple
    output: Tensor
    targets: Tensor
    loss: Tensor
    index: Tensor | None = None
    generator: torch.Generator | None = None
    output_grad: Tensor | None = None
    sources: list[Source] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sources = list(dict.fromkeys(s for q in self.quantities for s in sources_of(q)))

    @property
    def r(self) -> float:
        r"""The batch factor :math:`r` of the full batch."""
        return self.spec.batch_factor(self.output.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples that the quantities use (after subsampling)."""
        return self.output.shape[0] if self.index is None else len(self.index)

    @staticmethod
    def needs(quantities: list[Quantity]) -> bool:
        """Whether ``quantities`` need every module's calls (Hessian, recursions)."""
        sources = {s for q in quantities for s in sources_of(q)}
        hessian = HESSIAN_POS in sources or HESSIAN_NEG in sources
        return hessian or any(not q.per_parameter for q in quantities)

    @property
    def needs_hessian(self) -> bool:
        """Whether a quantity reads the signed Hessian factors."""
        return HESSIAN_POS in self.sources or HESSIAN_NEG in self.sources

    @property
    def needs_model(self) -> bool:
        """Whether a quantity is a whole-network recursion."""
        return any(not q.per_parameter for q in self.quantities)

    def context(self, **extra) -> Context:
        """The :class:`~curvlab.backprop.derivatives.Context` quantities read."""
        return Context(
            model=self.model,
            spec=self.spec,
            output=self.output.detach(),
            targets=self.targets,
            r=self.r,
            num_samples=self.num_samples,
            index=extra.pop("index", self.index),
            owners=self.owners,
            param_names=[name for name, _ in self.named],
            **extra,
        )

    def streamable(self) -> bool:
        """Whether the streamed path applies (otherwise the general path runs).

        It needs no subsampling, quantities of one streamable source each (the per-sample
        gradient, MC samples or the exact loss-Hessian square root), and modules with a
        per-layer rule, one call and one output, whose parameters no other module holds.
        """
        if self.method != "auto" or not self.quantities or self.index is not None:
            return False
        for q in self.quantities:
            sources = sources_of(q)
            if not q.per_parameter or len(sources) != 1 or not sources[0].streamable:
                return False
        for own in self.owners:
            if len(own.calls) != 1 or own.generic_names or isinstance(own.rule, FuncRule):
                return False
            outputs = own.calls[0].outputs
            if len(outputs) != 1 or not outputs[0].requires_grad or outputs[0].grad_fn is None:
                return False
        return all(len(pairs) <= 1 for pairs in self.uses.values())
