r"""The Hessian of the loss over the data, :math:`\nabla^2_\theta L`, as an operator.

A product is a double backward: :math:`H v = \nabla_\theta \langle \nabla_\theta L, v \rangle`.
The first backward (the gradient, with its graph) does not depend on :math:`v`, so the operator
can keep it: once recorded, every further product is only the second backward (3C3D-CIFAR-10,
batch 128: 1.6x a gradient instead of 2.7x; see ``docs/linops.md``, "Cost").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab.linops.base import CurvatureOperator
from curvlab.linops.empirical_risk import Data, ModelOperator, Params


@dataclass
class _KeptGraph:
    r"""One batch's gradient :math:`\nabla_\theta L_b` with its graph, and what it was taken at."""

    inputs: object
    targets: Tensor
    versions: tuple[int, ...]
    leaves: tuple[Tensor, ...]
    gradient: tuple[Tensor, ...]


def _versions(tensors: Sequence[object]) -> tuple[int, ...]:
    """In-place version counters: they change when a tensor is modified in place."""
    return tuple(t._version if isinstance(t, Tensor) else -1 for t in tensors)


class Hessian(ModelOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of :math:`L = r \sum_{n=1}^N \ell_n` over the data.

    Each batch contributes the Hessian of its own loss times :math:`r / r_b`, by a double
    backward :math:`\nabla_\theta \langle \nabla_\theta L_b, v \rangle`. With ``keep_graph``
    the gradient :math:`\nabla_\theta L_b` and its graph are recorded at the first product and
    kept, so that later products run only the second backward; a kept graph is recorded again
    when the parameters or the batch's tensors change in place (their version counters) or
    the batch is another object. Symmetric; scales like the loss.

    Args:
        model: Any module (twice differentiable).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        params: The parameters (``None``: all trainable ones).
        data: Re-iterable ``(inputs, targets)`` batches.
        check_deterministic: Check at construction that two passes over the data agree.
        keep_graph: Keep each batch's gradient graph between products (memory: about one
            forward and backward pass's saved tensors per batch). ``None``: keep it when
            ``data`` is a list or tuple of one batch (the same tensors at every pass);
            ``True``: for every batch of a list or tuple; ``False``: never (a data loader
            yields new tensors at every pass and never keeps it).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        params: Params,
        data: Data,
        check_deterministic: bool = True,
        keep_graph: bool | None = None,
    ) -> None:
        super().__init__(model, loss_func, params, data, check_deterministic)
        sequence = isinstance(data, (list, tuple))
        self.keep_graph = sequence and (len(data) == 1 if keep_graph is None else keep_graph)
        self._kept: dict[int, _KeptGraph] = {}

    def restrict(self, names: Sequence[str]) -> CurvatureOperator:
        """The Hessian block of the named parameters (its own kept graphs)."""
        new = super().restrict(names)
        new._kept = {}
        return new

    def _gradient_graph(self, index: int, inputs: object, targets: Tensor) -> _KeptGraph:
        """The batch's gradient with its graph: the kept one if still valid, else a new one."""
        versions = _versions([*self.params.values(), inputs, targets])
        kept = self._kept.get(index)
        if (
            kept is not None
            and kept.inputs is inputs
            and kept.targets is targets
            and kept.versions == versions
        ):
            return kept
        self._kept.pop(index, None)  # free the stale graph before recording the new one
        leaves = {k: p.detach().requires_grad_() for k, p in self.params.items()}
        with torch.enable_grad():
            loss = self.spec.value(self.model_output(leaves, inputs), targets)
            gradient = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=True, allow_unused=True
            )
        record = _KeptGraph(inputs, targets, versions, tuple(leaves.values()), gradient)
        if self.keep_graph:
            self._kept[index] = record
        return record

    def _batch_matmat(self, index, inputs, targets, columns):
        weight = self.batch_weight(targets.shape[0])
        record = self._gradient_graph(index, inputs, targets)
        names = list(self.params)
        live = [i for i, g in enumerate(record.gradient) if g is not None and g.requires_grad]
        count = next(iter(columns.values())).shape[0]
        out = {k: torch.zeros_like(columns[k]) for k in names}
        if not live:  # the loss is at most linear in the parameters
            return out
        outputs = [record.gradient[i] for i in live]
        # one second backward per column: on CPU faster than vmap over the backward
        # (is_grads_batched), whose batching rules copy (3C3D: 2.7x vs 1.6x a gradient each)
        for j in range(count):
            with torch.enable_grad():
                product = torch.autograd.grad(
                    outputs,
                    record.leaves,
                    grad_outputs=[columns[names[i]][j] for i in live],
                    retain_graph=self.keep_graph or j < count - 1,
                    allow_unused=True,
                )
            for name, value in zip(names, product, strict=True):
                if value is not None:
                    out[name][j] = weight * value
        return out
