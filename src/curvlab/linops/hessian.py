r"""The Hessian of the loss over the data, :math:`\nabla^2_\theta L`, as an operator.

A product is a double backward: :math:`H v = \nabla_\theta \langle \nabla_\theta L, v \rangle`.
The first backward (the gradient, with its graph) does not depend on :math:`v`, so the operator
can keep it: once recorded, every further product is only the second backward (3C3D-CIFAR-10,
batch 128: 1.5x a gradient instead of 2.7x; see ``docs/linops.md``, "Cost").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.linops.empirical_risk import Data, ModelOperator, Params


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
        self._init_keep(keep_graph)

    def _gradient_graph(
        self, index: int, inputs: object, targets: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """``(leaves, gradient)``: the batch's gradient with its graph (kept or recorded)."""
        kept = self._kept(index, inputs, targets)
        if kept is not None:
            return kept
        leaves = {k: p.detach().requires_grad_() for k, p in self.params.items()}
        with torch.enable_grad():
            loss = self.spec.value(self.model_output(leaves, inputs), targets)
            gradient = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=True, allow_unused=True
            )
        record = (tuple(leaves.values()), gradient)
        self._keep(index, inputs, targets, record)
        return record

    def _batch_matmat(self, index, inputs, targets, columns):
        weight = self.batch_weight(targets.shape[0])
        leaves, gradient = self._gradient_graph(index, inputs, targets)
        names = list(self.params)
        live = [i for i, g in enumerate(gradient) if g is not None and g.requires_grad]
        count = next(iter(columns.values())).shape[0]
        if not live:  # the loss is at most linear in the parameters
            return {k: torch.zeros_like(columns[k]) for k in names}
        outputs = [gradient[i] for i in live]
        if count > 1 and not self.column_by_column:  # one batched second backward
            with torch.enable_grad():
                product = torch.autograd.grad(
                    outputs,
                    leaves,
                    grad_outputs=[columns[names[i]] for i in live],
                    retain_graph=self.keep_graph,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            return {
                k: torch.zeros_like(columns[k]) if v is None else v.mul_(weight)
                for k, v in zip(names, product, strict=True)
            }
        # one second backward per column: with convolutions on CPU faster than vmap over the
        # backward (is_grads_batched), whose batching rules copy (3C3D: 2.7x vs 1.5x each)
        out = {k: torch.zeros_like(columns[k]) for k in names}
        for j in range(count):
            with torch.enable_grad():
                product = torch.autograd.grad(
                    outputs,
                    leaves,
                    grad_outputs=[columns[names[i]][j] for i in live],
                    retain_graph=self.keep_graph or j < count - 1,
                    allow_unused=True,
                )
            for name, value in zip(names, product, strict=True):
                if value is not None:
                    out[name][j] = weight * value
        return out
