r"""The streamed path: quantities reduced *inside* the backward passes.

A tensor hook on every module output receives its gradient :math:`c\,r\,\partial\ell_n/
\partial z_n` while the gradient flows (the user's ``loss.backward()``, or the engine's own
``torch.autograd.grad``), evaluates that module's quantities at once (e.g. ``BatchL2`` of a
Linear layer from :math:`\lVert g_n\rVert^2 \lVert x_n\rVert^2`) and lets the output gradient
go: no list of output gradients and no ``[N, P]`` tensor is kept. (:math:`c` is the scale the
user put on the loss, e.g. a gradient scaler's, measured at the model output.)

MC and exact GGN quantities back-propagate each column of the (sampled or exact) loss
Hessian's square root once, only as far as the earliest module outputs (:func:`sinks`; no
parameter gradients), from the hook on the model output, before the gradient goes on; each
module hook keeps its columns until the last one arrives, then reduces them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.backprop import assembly
from curvlab.backprop.derivatives import Owner, ParamDerivatives
from curvlab.backprop.plan import Plan, sources_of
from curvlab.backprop.quantities import BatchDiagGGN, DiagGGN, Quantity
from curvlab.backprop.results import Results
from curvlab.backprop.rules.linear import LinearRule
from curvlab.backprop.sources import GRAD, Source, SqrtSource


def backward_column(
    output: Tensor, inputs: Sequence[Tensor], column: Tensor, retain_graph: bool
) -> Sequence[Tensor | None]:
    r"""Back-propagate one column ``[*output.shape]`` to ``inputs``.

    The root is the scalar :math:`\langle \text{output}, \text{column} \rangle`: passing
    ``grad_outputs`` instead makes torch import sympy for a shape check (~35 MB resident, once
    per process). Works inside a backward pass (hooks run with gradients disabled).
    """
    with torch.enable_grad():
        root = (output * column).sum()
    return torch.autograd.grad(root, inputs, retain_graph=retain_graph, allow_unused=True)


def sinks(outputs: list[Tensor]) -> list[Tensor]:
    """The outputs with no other one upstream: a backward to them passes through all others.

    Back-propagating from the model output to these (instead of to every output) lets tensor
    hooks see every output's gradient without autograd returning (and so keeping) them all.
    """
    nodes = {o.grad_fn for o in outputs}
    found = []
    for out in outputs:
        stack = [f for f, _ in out.grad_fn.next_functions if f is not None]
        seen: set[Any] = set()
        upstream = False
        while stack and not upstream:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in nodes and node is not out.grad_fn:
                upstream = True
            stack.extend(f for f, _ in node.next_functions if f is not None)
        if not upstream:
            found.append(out)
    return found


BATCHED_COLUMNS_ELEMENTS = 2**19
"""Largest number of column entries (columns x module-output entries) back-propagated at once."""


class StreamedPass:
    """The hooks and partial values of one streamed pass (see the module docstring).

    Use: :meth:`install` after the forward; :meth:`run_columns` when the backward reaches the
    model output (before the gradient goes on); :meth:`start_gradient`; the gradient's
    backward; :meth:`finish_gradient`; :meth:`results`; :meth:`remove`.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.ctx = plan.context(grad={})
        self.by_source: dict[Source, list[Quantity]] = {}
        for q in plan.quantities:
            self.by_source.setdefault(sources_of(q)[0], []).append(q)
        self.owned = assembly.owned_parameters(plan.owners, plan.uses)
        self.params = dict(plan.named)
        self.partial: dict[str, dict[str, Any]] = {q.name: {} for q in plan.quantities}
        self.per_sample_values = any(q.per_sample_values for q in self.by_source.get(GRAD, []))
        self.source: Source | None = None
        self.done: set[Owner] = set()
        self.expected_columns = 0
        self.columns: dict[Owner, list[Tensor]] = {}
        self.seen: dict[Owner, int] = {}
        self.squared: set[Owner] = set()
        self.grad_scale = 1.0
        self.like: dict[Owner, assembly.TensorLike] = {}
        self.sinks: list[Tensor] = []
        self.outputs: list[Tensor] | None = None  # kept only for batched columns
        self.handles: list[Any] = []

    # ------------------------------------------------------------------------ set-up
    def install(self) -> None:
        """Hook every module output and drop the references to the outputs.

        The hooks live on the autograd nodes, so that autograd frees the outputs it does not
        save (e.g. a convolution's output before a ReLU).
        """
        outputs = [own.calls[0].outputs[0] for own in self.plan.owners]
        for own, out in zip(self.plan.owners, outputs, strict=True):
            self.handles.append(out.register_hook(self._hook(own)))
            self.like[own] = assembly.TensorLike.of(out)
        if any(isinstance(s, SqrtSource) for s in self.by_source):
            self.sinks = sinks(outputs)
            if self._batched_columns():
                self.outputs = outputs  # one batched backward needs them as its inputs
                return
        del outputs
        for own in self.plan.owners:
            own.calls[0].outputs = ()

    def _batched_columns(self) -> bool:
        """One vmapped backward for all columns (else one plain backward per column).

        Measured on the CPU (mlp-mnist, ``C = 10`` exact columns, one thread, ratio to a
        gradient of the column passes): batched 1.76 against a loop's 2.15 at ``N = 32``, equal
        at ``N = 128`` (2.07 / 2.05), 2.36 against 2.10 at ``N = 512``; on 3C3D the loop wins at
        every size (the batched convolution and pooling kernels: 4.7 against 2.1 at 128). So:
        batched when every owner is a ``Linear`` layer and all the columns of all module outputs
        stay under :data:`BATCHED_COLUMNS_ELEMENTS`.
        """
        if any(
            own.rule.kron_kind != "rows" or not own.rule.channels_last for own in self.plan.owners
        ):
            return False
        plan = self.plan
        columns = 0
        for source in self.by_source:
            if isinstance(source, SqrtSource):
                columns = max(columns, getattr(source, "samples", plan.output[0].numel()))
        elements = columns * sum(math.prod(like.shape) for like in self.like.values())
        return elements <= BATCHED_COLUMNS_ELEMENTS

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ------------------------------------------------------------------------ the hooks
    def _evaluate(self, own: Owner, source: Source, factor: Tensor, scale: float = 1.0) -> None:
        factors = {source: {own.calls[0]: (factor,)}}
        cache: dict[tuple, dict[str, Any]] = {}
        n = self.plan.num_samples
        with torch.no_grad():
            for q in self.by_source[source]:
                for full in self.owned[own]:
                    param = self.params[full].detach()
                    view = ParamDerivatives(
                        full, self.plan.uses[full], factors, param, n, cache, scale
                    )
                    self.partial[q.name][full] = assembly.evaluate(q, view, self.ctx, True)

    def _hook(self, own: Owner):
        def hook(g: Tensor) -> None:
            source = self.source
            if source is None or own in self.done:
                return
            if source == GRAD:
                self.done.add(own)
                scale = self.grad_scale * self.plan.r
                # the factor is g / scale: rescale the values in place (no new tensor)
                # unless they are per-sample parameter-shaped, and so larger than g
                if scale != 1.0 and self.per_sample_values:
                    self._evaluate(own, source, (g / scale).unsqueeze(0))
                else:
                    self._evaluate(own, source, g.unsqueeze(0), 1.0 / scale)
                return
            cols = self.columns.setdefault(own, [])
            count = self.seen[own] = self.seen.get(own, 0) + 1
            if own in self.squared:
                g2 = g.detach().square()
                if cols:
                    cols[0].add_(g2)
                else:
                    cols.append(g2)
            else:
                cols.append(g.detach())
            if count == self.expected_columns:
                self.done.add(own)
                del self.columns[own]
                if own in self.squared:
                    factor = cols[0].sqrt_()[None]
                else:  # one column (MC, k = 1): a view, read-only like the gradient's
                    factor = cols[0][None] if len(cols) == 1 else torch.stack(cols)
                self._evaluate(own, source, factor)

        return hook

    def _squared_owners(self, source: Source) -> set[Owner]:
        r"""Owners whose columns are summed as squares as they arrive, :math:`\sum_m g_m^2`.

        Every quantity of ``source`` is a GGN diagonal (:class:`DiagGGN`, :class:`BatchDiagGGN`),
        which reads a ``Linear`` layer without positions (output ``[N, out]``) only through
        :math:`\sum_m g_{mno}^2` (:meth:`LinearRule.sum_sq_jac_t`). The factor handed on is then
        ``sqrt(sum_m g_m^2)`` ``[1, N, out]``: no ``[M, N, out]`` stack, one square per column.
        On mlp-mnist (``N = 128``, ``C = 10``) this takes the stack and the squares of the
        stacked columns out of ``DiagGGN`` (see ``benchmarks/results/backprop-cpu-mlp-mnist.json``).
        """
        if not all(type(q) in (DiagGGN, BatchDiagGGN) for q in self.by_source[source]):
            return set()
        return {
            own
            for own in self.plan.owners
            if isinstance(own.rule, LinearRule) and len(self.like[own].shape) == 2
        }

    def _unreached(self, source: Source, columns: int) -> None:
        for own in self.plan.owners:
            if own not in self.done:
                self._evaluate(own, source, assembly.zero_factor(self.like[own], columns))

    # ------------------------------------------------------------------------ the passes
    def run_columns(self, retain_last: bool) -> None:
        """Back-propagate every square-root column of every requested MC/exact source.

        Args:
            retain_last: Keep the graph after the last column (a gradient pass follows).
        """
        plan = self.plan
        sqrt_sources = [s for s in self.by_source if isinstance(s, SqrtSource)]
        for k, source in enumerate(sqrt_sources):
            sqrt = source.columns(plan.spec, plan.output, plan.targets, plan.generator)
            if self.outputs is not None:
                self._batched(source, sqrt)
                continue
            self.source, self.done, self.expected_columns = source, set(), sqrt.shape[0]
            self.seen, self.squared = {}, self._squared_owners(source)
            for m in range(sqrt.shape[0]):
                last = k == len(sqrt_sources) - 1 and m == sqrt.shape[0] - 1
                backward_column(
                    plan.output, self.sinks, sqrt[m], retain_graph=retain_last or not last
                )
            self.columns.clear()
            self._unreached(source, sqrt.shape[0])
        self.source = None

    def _batched(self, source: Source, sqrt: Tensor) -> None:
        """All columns of ``sqrt`` ``[M, N, *out]`` in one vmapped backward to the outputs."""
        self.source = None  # the hooks stand aside: the factors come back as results
        with torch.enable_grad():
            grads = torch.autograd.grad(
                self.plan.output,
                self.outputs,
                sqrt,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
        for own, g in zip(self.plan.owners, grads, strict=True):
            factor = assembly.zero_factor(self.like[own], sqrt.shape[0]) if g is None else g
            self._evaluate(own, source, factor)
        del grads

    def start_gradient(self, grad_scale: float) -> None:
        """The next backward carries the gradient, ``grad_scale`` times the loss's."""
        self.grad_scale = grad_scale
        self.source, self.done = (GRAD if GRAD in self.by_source else None), set()

    def finish_gradient(self) -> None:
        """After the gradient's backward: modules it did not reach get zero factors."""
        if self.source == GRAD:
            self._unreached(GRAD, 1)
        self.source = None

    def results(self, grads: dict[str, Tensor]) -> Results:
        """The quantities, given the loss's gradient by parameter name."""
        plan, ctx = self.plan, self.ctx
        ctx.grad.update(grads)
        n = plan.num_samples

        def unused(q: Quantity, name: str) -> Any:
            source = sources_of(q)[0]
            view = ParamDerivatives(name, [], {source: {}}, self.params[name].detach(), n, {})
            return q.evaluate(view, ctx)

        names = [name for name, _ in plan.named]
        values = assembly.finish_streamed(plan.quantities, self.partial, names, unused, ctx)
        return Results(plan.loss.detach(), ctx.grad, plan.output.detach(), values)
