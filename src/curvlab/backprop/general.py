r"""The general path: output gradients and factors first, then the rules.

What it does, for any ``forward`` (residual additions, concatenation, branches, shared
modules), subsampling, the generic torch.func rule, the Hessian and the whole-network
recursions:

1. **Gradient**: ``torch.autograd.grad`` w.r.t. the parameters *and* the recorded module
   outputs gives the gradient and, per call, the output gradient :math:`r\,\partial\ell_n /
   \partial z_n` (the total derivative flows through autograd).
2. **Square-root factors**: a symmetric factor of the loss Hessian ``[M, N, *out]`` (exact, or
   MC with ``k`` sampled labels) is back-propagated to the same outputs in one vmapped
   backward (``is_grads_batched=True``), one per distinct source.
3. **Hessian**: the exact factor plus the signed residual columns of every elementwise
   activation (:mod:`~curvlab.backprop.hessian`), or the generic whole-model path where the
   graph has an obstacle.
4. **Assembly**: per parameter, the rules turn (inputs, factor) into the quantities; a module
   used several times sums its calls' contributions.

The graph is kept (``retain_graph=True``): a user's own backward may follow.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.backprop import assembly
from curvlab.backprop.blocks import BLOCKS, AttentionResiduals, EncoderResiduals
from curvlab.backprop.derivatives import Owner, ParamDerivatives
from curvlab.backprop.errors import GenericPathWarning
from curvlab.backprop.functional import (
    FuncRule,
    WholeModelFunc,
    input_batch_dims,
    output_batch_dims,
)
from curvlab.backprop.hessian import ELEMENTWISE, PIECEWISE_LINEAR, graph_obstacle, residual_columns
from curvlab.backprop.plan import Plan, sources_of
from curvlab.backprop.quantities import BatchDiagHessian, DiagHessian
from curvlab.backprop.recording import _WARNED
from curvlab.backprop.results import Results
from curvlab.backprop.rules.base import Call
from curvlab.backprop.sources import EXACT, GRAD, HESSIAN_NEG, HESSIAN_POS, Source, SqrtSource
from curvlab.backprop.streamed import backward_column

Slot = tuple[Call, int]
"""One tensor output of a call: ``(call, output index)``."""

Factors = dict[Source, dict[Call, tuple[Tensor, ...]]]


class _Selection:
    """The subsample: select samples of tensors, and mask the full batch.

    Args:
        index: The chosen samples, or ``None`` (all).
        n_total: The full batch size.
        like: A tensor of the batch (dtype and device of the mask).
    """

    def __init__(self, index: Tensor | None, n_total: int, like: Tensor) -> None:
        self.index, self.n_total = index, n_total
        self.mask = None
        if index is not None:
            self.mask = torch.zeros(n_total, dtype=like.dtype, device=like.device)
            self.mask[index.to(like.device)] = 1.0

    def __call__(self, t: Tensor, dim: int = 0) -> Tensor:
        if self.index is None or t.dim() <= dim or t.shape[dim] != self.n_total:
            return t
        return t.index_select(dim, self.index.to(t.device))

    def masked(self, sqrt: Tensor) -> Tensor:
        """A square root ``[M, N, *out]`` with the samples outside the subsample zeroed."""
        if self.mask is None:
            return sqrt
        return sqrt * self.mask.reshape(1, -1, *[1] * (sqrt.dim() - 2))


def batched_backward(
    output: Tensor, inputs: list[Tensor], factor: Tensor
) -> Sequence[Tensor | None]:
    """Back-propagate every column of ``factor`` ``[M, *output.shape]`` to ``inputs``."""
    if not inputs:
        return []
    if factor.shape[0] == 1:  # one column: a plain backward avoids vmap's overhead
        grads = backward_column(output, inputs, factor[0], retain_graph=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        return torch.autograd.grad(
            output,
            inputs,
            grad_outputs=factor,
            retain_graph=True,
            is_grads_batched=True,
            allow_unused=True,
        )
    except RuntimeError:  # an op without a batching rule: one column at a time
        columns = [backward_column(output, inputs, col, retain_graph=True) for col in factor]
        return [None if col[0] is None else torch.stack(col) for col in zip(*columns, strict=True)]


class _Slots:
    """Which call outputs get output gradients (all recorded ones needed) and factors (owners).

    Attributes:
        owner_calls: The calls of modules with trainable parameters.
        activations: ``(name, module, call)`` of elementwise activations (Hessian quantities).
        grad_calls: Every call whose output gradient is needed.
        slots: Their outputs that require gradients.
        factor_slots: The slots of ``owner_calls``.
        batch_dims: Per call in ``grad_calls``, the batch dimension of each output (``0`` but
            for recurrent layers' sequence-first outputs and states).
    """

    def __init__(self, plan: Plan) -> None:
        modules = dict(plan.model.named_modules())
        self.owner_calls = [call for own in plan.owners for call in own.calls]
        self.activations: list[tuple[str, nn.Module, Call]] = []
        if plan.needs_hessian:
            self.activations = [
                (name, modules[name], call)
                for name, calls in plan.records.items()
                if isinstance(modules[name], ELEMENTWISE)
                for call in calls
            ]
        self.blocks: list[tuple[str, nn.Module, Call]] = []  # whole blocks (blocks.py)
        if plan.needs_hessian:
            named = [
                name for name in plan.records if isinstance(modules[name], tuple(BLOCKS))
            ]  # the outermost ones: an encoder layer's attention is part of the layer
            outer = [n for n in named if not any(n.startswith(f"{m}.") for m in named)]
            self.blocks = [
                (name, modules[name], call) for name in outer for call in plan.records[name]
            ]
        extra = [c for calls in plan.records.values() for c in calls] if plan.needs_model else []
        extra += [call for _, _, call in self.activations]
        extra += [call for _, _, call in self.blocks]
        self.grad_calls = list(dict.fromkeys(self.owner_calls + extra))
        self.slots: list[Slot] = [
            (c, i) for c in self.grad_calls for i, o in enumerate(c.outputs) if o.requires_grad
        ]
        owners = set(self.owner_calls)
        self.factor_slots = [(c, i) for c, i in self.slots if c in owners]
        self.factor_outputs = [c.outputs[i] for c, i in self.factor_slots]
        module_of = {c: modules[name] for name, calls in plan.records.items() for c in calls}
        self.batch_dims = {
            c: output_batch_dims(module_of[c], len(c.outputs)) for c in self.grad_calls
        }

    def _factor(self, call: Call, i: int, g: Tensor, select) -> Tensor:
        """Columns ``[M, *out]`` at output ``i`` as a subsampled factor ``[M, N, *rest]``."""
        dim = self.batch_dims[call][i]
        return select(g if dim == 0 else g.movedim(1 + dim, 1), 1)

    def _zeros(self, call: Call, i: int, columns: int, n: int) -> Tensor:
        return assembly.zero_factor(call.outputs[i], columns, n, self.batch_dims[call][i])

    def per_call(self, batched: Sequence[Tensor | None], columns: int, n: int, select) -> dict:
        """Per owner call, its back-propagated columns (zeros where none arrived)."""
        per: dict[Call, list[Tensor]] = {
            c: [self._zeros(c, i, columns, n) for i in range(len(c.outputs))]
            for c in self.owner_calls
        }
        for (call, i), g in zip(self.factor_slots, batched, strict=True):
            if g is not None:
                per[call][i] = self._factor(call, i, g, select)
        return {c: tuple(v) for c, v in per.items()}

    def parts(self, batched: Sequence[Tensor | None], select) -> dict[Call, list[Tensor | None]]:
        """Like :meth:`per_call`, with ``None`` where no column arrived (concatenated later)."""
        per: dict[Call, list[Tensor | None]] = {
            c: [None] * len(c.outputs) for c in self.owner_calls
        }
        for (call, i), g in zip(self.factor_slots, batched, strict=True):
            if g is not None:
                per[call][i] = self._factor(call, i, g, select)
        return per

    def concat(self, parts: list[dict[Call, list[Tensor | None]]], n: int) -> dict:
        """Concatenate column blocks along ``M`` (zeros where a block reached no output)."""
        out = {}
        for call in self.owner_calls:
            tensors = []
            for i in range(len(call.outputs)):
                blocks = [part[call][i] for part in parts if part[call][i] is not None]
                if not blocks:
                    blocks = [self._zeros(call, i, 1, n)]
                tensors.append(blocks[0] if len(blocks) == 1 else torch.cat(blocks))
            out[call] = tuple(tensors)
        return out


def _gradient(plan: Plan, slots: _Slots) -> tuple[dict[str, Tensor], dict[Call, list]]:
    """The parameter gradients and the output gradients ``r dl_n/dz`` (divided by ``r``)."""
    inputs = [p for _, p in plan.named] + [c.outputs[i] for c, i in slots.slots]
    if plan.output_grad is None:
        grads = torch.autograd.grad(plan.loss, inputs, allow_unused=True, retain_graph=True)
    else:  # the loss's own node has run (the user's backward): start at the model output
        grads = backward_column(plan.output, inputs, plan.output_grad, retain_graph=True)
    k = len(plan.named)
    param_grads = {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(plan.named, grads[:k], strict=True)
    }
    output_grads: dict[Call, list[Tensor | None]] = {
        c: [None] * len(c.outputs) for c in slots.grad_calls
    }
    for (call, i), g in zip(slots.slots, grads[k:], strict=True):
        output_grads[call][i] = None if g is None else g / plan.r
    return param_grads, output_grads


def _hessian_obstacle(plan: Plan, activations: list[tuple[str, nn.Module, Call]]) -> str | None:
    """Why the fast Hessian path cannot be used, or ``None``."""
    if plan.method == "func":
        return "method='func' was requested"
    for own in plan.owners:
        if len(own.calls) > 1:
            return (
                f"{type(own.module).__name__} (module '{own.name}') is called "
                f"{len(own.calls)} times (weight sharing adds mixed second derivatives)"
            )
        if isinstance(own.rule, FuncRule):
            return (
                f"{type(own.module).__name__} (module '{own.name}') has no per-layer rule, so "
                "its second derivative w.r.t. its parameters is unknown"
            )
        if not own.rule.linear_in_params:
            return (
                f"{type(own.module).__name__} (module '{own.name}') is not linear in its parameters"
            )
    calls = [
        (own.name, own.module, call, own.rule.linear_in_input)
        for own in plan.owners
        for call in own.calls
    ]
    return graph_obstacle(plan.output, calls, activations)


def _block_route(
    plan: Plan, slots: _Slots, output_grads: dict
) -> tuple[dict[str, EncoderResiduals | AttentionResiduals], str | None]:
    """Residuals of a whole encoder layer that make the fast Hessian path exact, or why not.

    Applies to one ``nn.TransformerEncoderLayer`` or self-attention call (:data:`~curvlab.
    backprop.blocks.BLOCKS`), no subsampling, only Hessian diagonals, and a graph after the layer that
    :func:`~curvlab.backprop.hessian.graph_obstacle` finds linear without activation residuals.
    """
    if plan.method != "auto" or plan.index is not None:
        return {}, "subsampling or method='func'"
    hessian = [q for q in plan.quantities if HESSIAN_POS in sources_of(q)]
    if not all(type(q) in (DiagHessian, BatchDiagHessian) for q in hessian):
        return {}, "a Hessian quantity other than DiagHessian / BatchDiagHessian"
    if len(slots.blocks) != 1:
        return {}, "not exactly one TransformerEncoderLayer / MultiheadAttention call"
    name, module, call = slots.blocks[0]
    obstacle, residuals_class = next(v for k, v in BLOCKS.items() if isinstance(module, k))
    reason = obstacle(module, call)
    if reason is not None:
        return {}, f"{type(module).__name__} (module '{name}') with {reason}"
    outside = [own for own in plan.owners if not own.name.startswith(f"{name}.")]
    for own in outside:
        if len(own.calls) > 1 or isinstance(own.rule, FuncRule):
            return {}, f"module '{own.name}' (called twice, or without a per-layer rule)"
    calls = [(name, module, call, True)] + [
        (own.name, own.module, c, own.rule.linear_in_input) for own in outside for c in own.calls
    ]
    reason = graph_obstacle(plan.output, calls, [])
    grad_out = output_grads[call][0]
    if reason is not None or grad_out is None:
        return {}, f"after module '{name}': {reason}"
    try:
        return {name: residuals_class(module, call, grad_out)}, None
    except RuntimeError as err:
        return {}, str(err)


def _warn_hessian_fallback(obstacle: str, method: str) -> None:
    key = f"hessian:{obstacle}"
    if method == "func" or key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"Hessian quantities use the generic torch.func path (exact, P Hessian-vector "
        f"products) because of {obstacle}",
        GenericPathWarning,
        stacklevel=5,
    )


def _hessian_factors(
    plan: Plan, slots: _Slots, output_grads: dict, exact: Sequence | None, select: _Selection
) -> tuple[Factors, WholeModelFunc | None, dict[str, EncoderResiduals | AttentionResiduals]]:
    """The signed Hessian factors (and whole blocks' residuals), or the whole-model fallback."""
    obstacle = _hessian_obstacle(plan, slots.activations)
    n = plan.num_samples
    residuals: dict[str, EncoderResiduals | AttentionResiduals] = {}
    if obstacle is not None and slots.blocks:
        residuals, _ = _block_route(plan, slots, output_grads)
        if residuals:  # the GGN's factors, and the block's residuals in closed form
            if exact is None:
                sqrt = plan.spec.sqrt_hessian(plan.output, plan.targets)
                exact = batched_backward(plan.output, slots.factor_outputs, sqrt)
            return {HESSIAN_POS: slots.concat([slots.parts(exact, select)], n)}, None, residuals
    if obstacle is not None:
        _warn_hessian_fallback(obstacle, plan.method)
        names = [name for name, _ in plan.named]
        inputs, targets = select(plan.inputs[0]), select(plan.targets)
        return {}, WholeModelFunc(plan.model, plan.spec, inputs, targets, plan.r, names), {}
    if exact is None:
        sqrt = select.masked(plan.spec.sqrt_hessian(plan.output, plan.targets))
        exact = batched_backward(plan.output, slots.factor_outputs, sqrt)
    pos, neg = [slots.parts(exact, select)], []
    for _, module, call in slots.activations:
        if isinstance(module, PIECEWISE_LINEAR) or not call.graph_inputs:
            continue
        h, grad_a = call.graph_inputs[0], output_grads[call][0]
        if not h.requires_grad or grad_a is None:
            continue
        columns, signs = residual_columns(module, h.detach(), grad_a, select.mask)
        batched = batched_backward(h, slots.factor_outputs, columns)
        for sign, target in ((1.0, pos), (-1.0, neg)):
            keep = (signs == sign).to(columns.dtype)  # [D, N]
            signed = [
                None if b is None else b * keep.reshape(*keep.shape, *[1] * (b.dim() - 2))
                for b in batched
            ]
            target.append(slots.parts(signed, select))
    factors: Factors = {HESSIAN_POS: slots.concat(pos, n)}
    if neg:
        factors[HESSIAN_NEG] = slots.concat(neg, n)
    return factors, None, {}


def _factors(
    plan: Plan, slots: _Slots, output_grads: dict, select: _Selection
) -> tuple[Factors, WholeModelFunc | None, dict[str, EncoderResiduals | AttentionResiduals]]:
    """Every source's factors at the owner calls' outputs."""
    n = plan.num_samples
    factors: Factors = {}
    if GRAD in plan.sources:
        per_sample = [output_grads[c][i] for c, i in slots.factor_slots]
        factors[GRAD] = slots.per_call(
            [None if g is None else g[None] for g in per_sample], 1, n, select
        )
    exact = None
    for source in plan.sources:
        if not isinstance(source, SqrtSource):
            continue
        sqrt = select.masked(source.columns(plan.spec, plan.output, plan.targets, plan.generator))
        batched = batched_backward(plan.output, slots.factor_outputs, sqrt)
        exact = batched if source == EXACT else exact
        factors[source] = slots.per_call(batched, sqrt.shape[0], n, select)
    fallback, residuals = None, {}
    if plan.needs_hessian:
        hessian, fallback, residuals = _hessian_factors(plan, slots, output_grads, exact, select)
        factors.update(hessian)
    return factors, fallback, residuals


def _select_tree(tree: Any, dims: Any, select: _Selection) -> Any:
    """``tree`` with every tensor that carries the batch (at its entry of ``dims``) selected."""
    leaves, spec = tree_flatten(tree)
    flat_dims, _ = tree_flatten(dims)
    selected = [a if d is None else select(a, d) for a, d in zip(leaves, flat_dims, strict=True)]
    return tree_unflatten(selected, spec)


def _select_calls(
    records: dict[str, list[Call]], modules: dict[str, nn.Module], select: _Selection
) -> None:
    """Bring the recorded call inputs and outputs to the subsample, along their batch dims."""
    for name, calls in records.items():
        module = modules[name]
        for call in calls:
            dims = output_batch_dims(module, len(call.outputs))
            call.values = tuple(
                select(o.detach(), d) for o, d in zip(call.outputs, dims, strict=True)
            )
            if select.index is not None:
                args_dims, kwargs_dims = input_batch_dims(
                    module, call.args, call.kwargs, select.n_total
                )
                call.args = _select_tree(call.args, args_dims, select)
                call.kwargs = _select_tree(call.kwargs, kwargs_dims, select)


def run(plan: Plan) -> Results:
    """Every quantity of ``plan`` on the general path (see the module docstring)."""
    select = _Selection(plan.index, plan.output.shape[0], plan.output)
    slots = _Slots(plan)
    param_grads, output_grads = _gradient(plan, slots)
    factors, fallback, residuals = _factors(plan, slots, output_grads, select)
    _select_calls(plan.records, dict(plan.model.named_modules()), select)
    ctx = plan.context(
        grad=param_grads,
        hessian_fallback=fallback,
        hessian_residuals=residuals,
        records=plan.records,
        output_grads={
            k: tuple(
                None if g is None else select(g, d)
                for g, d in zip(v, slots.batch_dims[k], strict=True)
            )
            for k, v in output_grads.items()
        },
    )
    cache: dict[tuple, dict[str, Any]] = {}
    values: dict[str, dict[str, Any]] = {}
    for q in plan.quantities:
        if not q.per_parameter:
            values[q.name] = q.evaluate_model(ctx)
            continue
        values[q.name] = {}
        for name, param in plan.named:
            uses: list[tuple[Owner, str]] = plan.uses[name]
            if q.layerwise and not uses:
                continue  # an unused parameter has no Kronecker factors
            view = ParamDerivatives(name, uses, factors, param.detach(), plan.num_samples, cache)
            values[q.name][name] = assembly.evaluate(q, view, ctx)
    return Results(plan.loss.detach(), param_grads, plan.output.detach(), values)
