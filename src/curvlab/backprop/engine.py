r"""The extended-backpropagation engine: :func:`compute`.

What one call does:

1. **Forward** once, with forward hooks that record the inputs and outputs of every module
   that holds trainable parameters (and, for Hessian quantities and whole-network recursions,
   of every module).
2. **Backward** once with ``torch.autograd.grad`` w.r.t. the parameters *and* the recorded
   module outputs: this gives the gradient and, per module call, the output gradient
   (:math:`r\,\partial \ell_n / \partial z_n` for sample ``n``), for any ``forward`` (residual
   additions, concatenation, branches, shared modules: the total derivative flows through
   autograd).
3. For GGN-type quantities, a symmetric factor of the loss Hessian ``[M, N, *out]`` (exact, or
   MC with ``k`` sampled labels) is back-propagated to the same module outputs in **one
   vmapped backward** (``is_grads_batched=True``; all ``M`` columns at once), one per distinct
   factor. Hessian quantities add the signed residual factors of :mod:`~curvlab.backprop.hessian`.
4. Per parameter, a rule (``rules/``: einsum forms for Linear, Conv, norms, Embedding; the
   generic torch.func :class:`~curvlab.backprop.functional.FuncRule` otherwise) turns (inputs,
   factor) into the quantities (:mod:`~curvlab.backprop.quantities`). A module used several
   times sums its calls' per-sample contributions.

**Streamed path.** When every quantity needs only the per-sample gradient, MC samples or the
exact loss-Hessian square root (GGN quantities) and every parametric module has a rule, one
call and one output (:func:`_streamable`), steps 2-4
happen *inside* the backward pass instead (:func:`_compute_streamed`): tensor hooks on the module
outputs reduce each module's factor as it arrives and let it go, so neither the list of output
gradients nor the module outputs themselves are kept. Square-root columns go back one plain
backward pass each (no vmapped backward, whose batched kernels are slow on the CPU).

``compute`` does not touch ``param.grad``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from curvlab.backprop.derivatives import Context, Owner, ParamDerivatives
from curvlab.backprop.errors import GenericPathWarning, UnsupportedModuleError
from curvlab.backprop.functional import FuncRule, WholeModelFunc
from curvlab.backprop.hessian import ELEMENTWISE, PIECEWISE_LINEAR, graph_obstacle, residual_columns
from curvlab.backprop.loss import LossSpec
from curvlab.backprop.quantities import Quantity
from curvlab.backprop.results import Results
from curvlab.backprop.rules import Call, find_rule

_WARNED: set[str] = set()
"""Module classes already reported as using the generic path (the warning is one-time)."""

METHODS = ("auto", "func")
HESSIAN_SOURCES = ("hessian+", "hessian-")
EXACT_QUANTITIES = (
    "BatchGrad, BatchL2, SumGradSquared, Variance, DiagGGN, BatchDiagGGN, SqrtGGN, DiagHessian, "
    "BatchDiagHessian, GGNMP, HMP"
)


def _check_quantities(quantities: Iterable[Quantity]) -> list[Quantity]:
    quantities = list(quantities)
    names = set()
    for q in quantities:
        if not isinstance(q, Quantity):
            raise TypeError(f"quantities must be curvlab.backprop quantity objects, got {q!r}")
        if q.name in names:
            raise ValueError(f"quantity {q.name!r} requested twice")
        names.add(q.name)
    return quantities


def _check_batchnorm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            raise UnsupportedModuleError(
                f"{type(module).__name__} (module '{name}') normalizes with batch statistics "
                "(training mode or track_running_stats=False), which couples the samples of a "
                "batch: per-sample and curvature quantities are undefined. Call model.eval() "
                "(BatchNorm then uses its running statistics)"
            )


def _detach(tree: Any) -> Any:
    return tree_map(lambda a: a.detach() if isinstance(a, Tensor) else a, tree)


def _record_calls(model: nn.Module, every_module: bool) -> tuple[dict[str, list[Call]], list[Any]]:
    """Register forward hooks on modules with trainable parameters (or on all modules)."""
    records: dict[str, list[Call]] = {}
    handles = []
    for name, module in model.named_modules():
        if not every_module and not any(p.requires_grad for p in module.parameters()):
            continue
        calls: list[Call] = []
        records[name] = calls

        def hook(mod, args, kwargs, output, calls=calls):
            if not kwargs and isinstance(output, Tensor) and all(type(a) is Tensor for a in args):
                # the common case, without the pytree traversals (a measurable cost per call)
                outputs, inputs = (output,), list(args)
                stored_args, stored_kwargs = tuple(a.detach() for a in args), {}
            else:
                leaves, _ = tree_flatten(output)
                outputs = tuple(o for o in leaves if isinstance(o, Tensor))
                inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
                stored_args, stored_kwargs = _detach(args), _detach(kwargs)
            calls.append(
                Call(
                    stored_args,
                    stored_kwargs,
                    outputs,
                    versions=[o._version for o in outputs],
                    input_nodes=[a.grad_fn for a in inputs],
                    graph_inputs=inputs,
                )
            )

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return records, handles


def _assign_owners(
    model: nn.Module, records: dict[str, list[Call]], trainable: dict[int, str]
) -> tuple[list[Owner], dict[str, list[tuple[Owner, str]]]]:
    """Map every trainable parameter to the called modules that provide its derivatives.

    A parameter belongs to the modules that hold it directly; if none of them was called (a
    parent used it functionally, e.g. ``MultiheadAttention.out_proj``), to the nearest called
    ancestor, which then uses the generic rule for it.
    """
    modules = dict(model.named_modules())
    owners: dict[str, Owner] = {}
    uses: dict[str, list[tuple[Owner, str]]] = {name: [] for name in trainable.values()}

    def owner(name: str) -> Owner:
        if name not in owners:
            owners[name] = Owner(name, modules[name], records[name])
        return owners[name]

    holders: dict[str, list[tuple[str, str]]] = {name: [] for name in trainable.values()}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            if id(p) in trainable and (mod_name, local) not in holders[trainable[id(p)]]:
                holders[trainable[id(p)]].append((mod_name, local))
    for full, held in holders.items():
        for mod_name, local in held:
            if records.get(mod_name):
                uses[full].append((owner(mod_name), local))
        if uses[full] or not held:
            continue
        mod_name, local = held[0]
        while mod_name:
            parent, _, child = mod_name.rpartition(".")
            local = f"{child}.{local}"
            mod_name = parent
            if records.get(mod_name):
                own = owner(mod_name)
                own.generic_names.add(local)
                uses[full].append((own, local))
                break
    for pairs in uses.values():
        for own, local in pairs:
            if local not in own.local_names:
                own.local_names.append(local)
    return list(owners.values()), uses


def _choose_rules(owners: list[Owner], method: str, quantities: list[Quantity]) -> None:
    generic = []
    for own in owners:
        rule = None if own.generic_names else find_rule(own.module)
        own.kron_rule = rule if rule is not None and rule.kronecker else None
        if method == "func" or rule is None:
            own.rule = FuncRule(own.name)
            if rule is None:
                generic.append(own)
        else:
            own.rule = rule
        if own.kron_rule is None:
            _check_full_blocks(own, quantities)
    new = sorted({type(o.module).__name__ for o in generic} - _WARNED)
    if method == "auto" and new:
        _WARNED.update(new)
        listing = ", ".join(f"{type(o.module).__name__} ('{o.name}')" for o in generic)
        warnings.warn(
            f"curvlab has no per-layer rule for {listing}; using the generic torch.func path "
            "(exact, slower)",
            GenericPathWarning,
            stacklevel=3,
        )


MAX_FULL_BLOCK = 2**13
"""Largest parameter (elements) whose whole GGN block stands in for Kronecker factors."""


def _check_full_blocks(own: Owner, quantities: list[Quantity]) -> None:
    """Layer-wise quantities of a module without a Kronecker rule need small parameters."""
    layerwise = [q.name for q in quantities if q.layerwise and q.per_parameter]
    if not layerwise:
        return
    params = dict(own.module.named_parameters(remove_duplicate=False))
    for local in own.local_names:
        size = params[local].numel()
        if size > MAX_FULL_BLOCK:
            raise UnsupportedModuleError(
                f"curvlab has no Kronecker rule for {type(own.module).__name__} (module "
                f"'{own.name}'), so {', '.join(layerwise)} would give parameter '{local}' "
                f"({size} entries) its whole {size} x {size} GGN block, more than "
                f"MAX_FULL_BLOCK={MAX_FULL_BLOCK} entries allow; exact quantities remain "
                f"available ({EXACT_QUANTITIES})"
            )


def _check_versions(records: dict[str, list[Call]], modules: dict[str, nn.Module]) -> None:
    for name, calls in records.items():
        for call in calls:
            for out, version in zip(call.outputs, call.versions, strict=True):
                if out._version != version:
                    raise UnsupportedModuleError(
                        f"the output of {type(modules[name]).__name__} (module '{name}') was "
                        "modified in place after the module returned it (e.g. "
                        "ReLU(inplace=True)); use out-of-place operations"
                    )


def _backward_column(
    output: Tensor, inputs: Sequence[Tensor], column: Tensor, retain_graph: bool
) -> Sequence[Tensor | None]:
    r"""Back-propagate one column ``[*output.shape]`` to ``inputs``.

    The root is the scalar :math:`\langle \text{output}, \text{column} \rangle`: passing
    ``grad_outputs`` instead makes torch import sympy for a shape check (~35 MB resident, once
    per process).
    """
    return torch.autograd.grad(
        (output * column).sum(), inputs, retain_graph=retain_graph, allow_unused=True
    )


def _batched_backward(
    output: Tensor, inputs: list[Tensor], factor: Tensor
) -> Sequence[Tensor | None]:
    """Back-propagate every column of ``factor`` ``[M, *output.shape]`` to ``inputs``."""
    if not inputs:
        return []
    if factor.shape[0] == 1:  # one column: a plain backward avoids vmap's overhead
        grads = _backward_column(output, inputs, factor[0], retain_graph=True)
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
        columns = [
            torch.autograd.grad(
                output, inputs, grad_outputs=col, retain_graph=True, allow_unused=True
            )
            for col in factor
        ]
        return [None if col[0] is None else torch.stack(col) for col in zip(*columns, strict=True)]


def _selector(index: Tensor | None, n_total: int):
    def select(t: Tensor, dim: int = 0) -> Tensor:
        if index is None or t.dim() <= dim or t.shape[dim] != n_total:
            return t
        return t.index_select(dim, index.to(t.device))

    return select


def compute(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    quantities: Iterable[Quantity] = (),
    *,
    method: str = "auto",
    subsampling: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Results:
    r"""One forward and one backward pass that return the loss, gradient and ``quantities``.

    Args:
        model: Any module; samples must be processed independently (BatchNorm in eval mode).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``,
            reduction ``"mean"`` or ``"sum"``.
        inputs: The batch ``[N, ...]`` passed as ``model(inputs)``.
        targets: Targets for ``loss_func(model(inputs), targets)``.
        quantities: Quantity objects (:mod:`curvlab.backprop.quantities`), distinct names.
        method: ``"auto"``: per-layer rules where they exist, the generic torch.func path for
            other parametric modules (warned once). ``"func"``: the generic path everywhere
            (Kronecker quantities and recursions still use their layer rules).
        subsampling: Indices of the samples that per-sample and curvature quantities use
            (scaling :math:`r` stays that of the full batch); the gradient and loss always use
            the full batch.
        generator: Random number generator for MC sampling.

    Returns:
        :class:`~curvlab.backprop.results.Results` with ``loss``, ``grad``, ``output`` and
        ``results[q][param_name]`` for every requested quantity.

    Raises:
        UnsupportedModuleError: A module that no path can handle, naming it and the reason.
        UnsupportedLossError: An unsupported loss, reduction or target shape.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    quantities = _check_quantities(quantities)
    spec = LossSpec(loss_func)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = {id(p): n for n, p in named}
    sources = list(dict.fromkeys(s for q in quantities for s in q.sources()))
    needs_hessian = any(s in HESSIAN_SOURCES for s in sources)
    needs_model = any(not q.per_parameter for q in quantities)
    records, handles = {}, []
    if quantities:
        _check_batchnorm(model)
        records, handles = _record_calls(model, every_module=needs_hessian or needs_model)
    try:
        output = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    spec.check(output, targets)
    loss = loss_func(output, targets)
    modules = dict(model.named_modules())
    owners, uses = _assign_owners(model, records, trainable) if quantities else ([], {})
    _choose_rules(owners, method, quantities)
    _check_versions(records, modules)

    n_total = output.shape[0]
    r = spec.batch_factor(n_total)
    if subsampling is None and _streamable(quantities, owners, uses, method):
        return _compute_streamed(
            model, spec, named, owners, uses, quantities, output, loss, targets, r, generator
        )
    index = None if subsampling is None else torch.as_tensor(subsampling, dtype=torch.long)
    n = n_total if index is None else len(index)
    select = _selector(index, n_total)
    mask = None
    if index is not None:
        mask = torch.zeros(n_total, dtype=output.dtype, device=output.device)
        mask[index.to(output.device)] = 1.0

    # --- which calls get output gradients / factors
    owner_calls = [call for own in owners for call in own.calls]
    activations: list[tuple[str, nn.Module, Call]] = []
    if needs_hessian:
        activations = [
            (name, modules[name], call)
            for name, calls in records.items()
            if isinstance(modules[name], ELEMENTWISE)
            for call in calls
        ]
    extra_calls: list[Call] = []
    if needs_model:
        extra_calls = [call for calls in records.values() for call in calls]
    extra_calls += [call for _, _, call in activations]
    known = {id(c) for c in owner_calls}
    grad_calls = list(owner_calls)
    for call in extra_calls:
        if id(call) not in known:
            known.add(id(call))
            grad_calls.append(call)
    slots = [
        (call, i) for call in grad_calls for i, o in enumerate(call.outputs) if o.requires_grad
    ]
    owner_ids = {id(c) for c in owner_calls}
    factor_slots = [(call, i) for call, i in slots if id(call) in owner_ids]

    grads = torch.autograd.grad(
        loss,
        [p for _, p in named] + [call.outputs[i] for call, i in slots],
        allow_unused=True,
        retain_graph=bool(sources) or needs_model,
    )
    param_grads = {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(named, grads[: len(named)], strict=True)
    }
    output_grads: dict[int, list[Tensor | None]] = {
        id(c): [None] * len(c.outputs) for c in grad_calls
    }
    for (call, i), g in zip(slots, grads[len(named) :], strict=True):
        output_grads[id(call)][i] = None if g is None else g / r

    def factors_of(batched: Sequence[Tensor | None], columns: int) -> dict[int, tuple]:
        per_call: dict[int, list[Tensor]] = {
            id(c): [
                torch.zeros(columns, n, *o.shape[1:], dtype=o.dtype, device=o.device)
                for o in c.outputs
            ]
            for c in owner_calls
        }
        for (call, i), g in zip(factor_slots, batched, strict=True):
            if g is not None:
                per_call[id(call)][i] = select(g, 1)
        return {k: tuple(v) for k, v in per_call.items()}

    def masked(sqrt: Tensor) -> Tensor:
        return sqrt if mask is None else sqrt * mask.reshape(1, -1, *[1] * (sqrt.dim() - 2))

    slot_outputs = [call.outputs[j] for call, j in factor_slots]
    factors: dict[Any, dict[int, tuple]] = {}
    if "grad" in sources:
        per_sample = [output_grads[id(c)][i] for c, i in factor_slots]
        factors["grad"] = factors_of([None if g is None else g[None] for g in per_sample], 1)
    exact_batched = None
    for source in sources:
        if source in ("grad", *HESSIAN_SOURCES):
            continue
        if source == "exact":
            sqrt = masked(spec.sqrt_hessian(output, targets))
            exact_batched = _batched_backward(output, slot_outputs, sqrt)
            factors[source] = factors_of(exact_batched, sqrt.shape[0])
        else:
            sqrt = masked(spec.sampled_sqrt_hessian(output, source, generator))
            factors[source] = factors_of(_batched_backward(output, slot_outputs, sqrt), source)

    hessian_fallback = None
    if needs_hessian:
        obstacle = _hessian_obstacle(method, owners, output, modules, activations)
        if obstacle is None:
            if exact_batched is None:
                sqrt = masked(spec.sqrt_hessian(output, targets))
                exact_batched = _batched_backward(output, slot_outputs, sqrt)
            pos = [_columns_of(exact_batched, factor_slots, owner_calls, n, select)]
            neg: list[dict[int, list[Tensor | None]]] = []
            for _, module, call in activations:
                if isinstance(module, PIECEWISE_LINEAR) or not call.graph_inputs:
                    continue
                h = call.graph_inputs[0]
                grad_a = output_grads[id(call)][0]
                if not h.requires_grad or grad_a is None:
                    continue
                columns, signs = residual_columns(module, h.detach(), grad_a, mask)
                batched = _batched_backward(h, slot_outputs, columns)
                for sign, target in ((1.0, pos), (-1.0, neg)):
                    keep = (signs == sign).to(columns.dtype)  # [D, N]
                    signed = [
                        None if b is None else b * keep.reshape(*keep.shape, *[1] * (b.dim() - 2))
                        for b in batched
                    ]
                    target.append(_columns_of(signed, factor_slots, owner_calls, n, select))
            factors["hessian+"] = _concat(pos, owner_calls, n)
            if neg:
                factors["hessian-"] = _concat(neg, owner_calls, n)
        else:
            _warn_hessian_fallback(obstacle, method)
            hessian_fallback = WholeModelFunc(
                model,
                spec,
                select(inputs),
                select(targets),
                r,
                [name for name, _ in named],
            )

    # bring the call inputs and outputs to the subsample
    for calls in records.values():
        for call in calls:
            call.values = tuple(select(o.detach()) for o in call.outputs)
            if index is not None:
                call.args = tree_map(lambda a: select(a) if isinstance(a, Tensor) else a, call.args)
                call.kwargs = tree_map(
                    lambda a: select(a) if isinstance(a, Tensor) else a, call.kwargs
                )
    ctx = _context(
        model,
        spec,
        output,
        targets,
        r,
        n,
        owners,
        named,
        grad=param_grads,
        index=index,
        hessian_fallback=hessian_fallback,
        records=records,
        output_grads={
            k: tuple(None if g is None else select(g) for g in v) for k, v in output_grads.items()
        },
    )

    cache: dict[tuple, dict[str, Any]] = {}
    values: dict[str, dict[str, Any]] = {}
    for q in quantities:
        if not q.per_parameter:
            values[q.name] = q.evaluate_model(ctx)
            continue
        values[q.name] = {}
        for name, param in named:
            if q.layerwise and not uses[name]:
                continue  # an unused parameter has no Kronecker factors
            view = ParamDerivatives(name, uses[name], factors, param.detach(), n, cache)
            try:
                values[q.name][name] = q.evaluate(view, ctx)
            except NotImplementedError as err:
                culprit = ", ".join(
                    f"{type(o.module).__name__} (module '{o.name}')" for o, _ in uses[name]
                )
                raise UnsupportedModuleError(
                    f"{q.name} is not available for parameter '{name}' of {culprit}: {err}"
                ) from err
    return Results(loss.detach(), param_grads, output.detach(), values)


def _context(
    model: nn.Module,
    spec: LossSpec,
    output: Tensor,
    targets: Tensor,
    r: float,
    n: int,
    owners: list[Owner],
    named: list[tuple[str, nn.Parameter]],
    **extra: Any,
) -> Context:
    """The :class:`Context` of one pass (``extra``: the optional fields)."""
    return Context(
        model=model,
        spec=spec,
        output=output.detach(),
        targets=targets,
        graph_output=output,
        r=r,
        num_samples=n,
        index=extra.pop("index", None),
        owners=owners,
        param_names=[name for name, _ in named],
        **extra,
    )


def _is_streamed_source(source: Any) -> bool:
    return source in ("grad", "exact") or (isinstance(source, int) and not isinstance(source, bool))


def _streamable(
    quantities: list[Quantity],
    owners: list[Owner],
    uses: dict[str, list[tuple[Owner, str]]],
    method: str,
) -> bool:
    """Whether :func:`_compute_streamed` applies (otherwise the general path runs).

    It needs quantities of one source each (the per-sample gradient, MC samples or the exact
    loss-Hessian square root), and modules
    with a per-layer rule, one call and one output, whose parameters no other module holds.
    """
    if method != "auto" or not quantities:
        return False
    for q in quantities:
        sources = q.sources()
        if not q.per_parameter or len(sources) != 1 or not _is_streamed_source(sources[0]):
            return False
    for own in owners:
        if len(own.calls) != 1 or own.generic_names or isinstance(own.rule, FuncRule):
            return False
        outputs = own.calls[0].outputs
        if len(outputs) != 1 or not outputs[0].requires_grad or outputs[0].grad_fn is None:
            return False
    return all(len(pairs) <= 1 for pairs in uses.values())


def _sinks(outputs: list[Tensor]) -> list[Tensor]:
    """The outputs with no other one upstream: a backward to them passes through all others.

    Back-propagating from the model output to these (instead of to every output) lets tensor
    hooks see every output's gradient without autograd returning (and so keeping) them all.
    """
    nodes = {o.grad_fn for o in outputs}
    sinks = []
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
            sinks.append(out)
    return sinks


def _compute_streamed(
    model: nn.Module,
    spec: LossSpec,
    named: list[tuple[str, nn.Parameter]],
    owners: list[Owner],
    uses: dict[str, list[tuple[Owner, str]]],
    quantities: list[Quantity],
    output: Tensor,
    loss: Tensor,
    targets: Tensor,
    r: float,
    generator: torch.Generator | None,
) -> Results:
    r"""First-order, MC and exact GGN quantities reduced *inside* the backward passes.

    A tensor hook on every module output receives its gradient :math:`r\,\partial\ell_n/
    \partial z_n` while ``torch.autograd.grad(loss, params)`` runs, evaluates that module's
    quantities at once (e.g. ``BatchL2`` of a Linear layer from :math:`\lVert g_n\rVert^2
    \lVert x_n\rVert^2`) and lets the output gradient go: no list of output gradients and no
    ``[N, P]`` tensor is kept. MC and exact GGN quantities back-propagate each column of the
    (sampled or exact) loss Hessian's square root once more, only as far as the earliest module
    output (no parameter gradients); each hook keeps its module's columns until the last one
    arrives, then reduces them the same way.
    """
    n = output.shape[0]
    params = dict(named)
    ctx = _context(model, spec, output, targets, r, n, owners, named, grad={})
    by_source: dict[Any, list[Quantity]] = {}
    for q in quantities:
        by_source.setdefault(q.sources()[0], []).append(q)
    owned: dict[int, list[tuple[str, str]]] = {id(own): [] for own in owners}
    for full, pairs in uses.items():
        for own, local in pairs:
            owned[id(own)].append((full, local))
    partial: dict[str, dict[str, Any]] = {q.name: {} for q in quantities}

    def evaluate(own: Owner, source: Any, factor: Tensor, scale: float = 1.0) -> None:
        call = own.calls[0]
        factors = {source: {id(call): (factor,)}}
        cache: dict[tuple, dict[str, Any]] = {}
        with torch.no_grad():
            for q in by_source[source]:
                for full, _ in owned[id(own)]:
                    view = ParamDerivatives(
                        full, uses[full], factors, params[full].detach(), n, cache, scale
                    )
                    try:
                        partial[q.name][full] = q.evaluate_streamed(view, ctx)
                    except NotImplementedError as err:
                        raise UnsupportedModuleError(
                            f"{q.name} is not available for parameter '{full}' of "
                            f"{type(own.module).__name__} (module '{own.name}'): {err}"
                        ) from err

    per_sample_values = any(q.per_sample_values for q in by_source.get("grad", []))
    state: dict[str, Any] = {"source": None, "done": set(), "columns": 0}
    columns: dict[int, list[Tensor]] = {}

    def make_hook(own: Owner):
        def hook(g: Tensor) -> None:
            source = state["source"]
            if source is None:
                return
            if source == "grad":
                state["done"].add(id(own))
                # the factor is g / r: rescale the values in place (no new tensor) unless
                # they are per-sample parameter-shaped, and so larger than g
                if r != 1.0 and per_sample_values:
                    evaluate(own, source, (g / r).unsqueeze(0))
                else:
                    evaluate(own, source, g.unsqueeze(0), 1.0 / r)
                return
            cols = columns.setdefault(id(own), [])
            cols.append(g.detach())
            if len(cols) == state["columns"]:
                state["done"].add(id(own))
                del columns[id(own)]
                evaluate(own, source, torch.stack(cols))

        return hook

    def unreached(source: Any, m: int) -> None:
        for own in owners:
            if id(own) not in state["done"]:
                shape, dtype, device = like[id(own)]
                evaluate(own, source, torch.zeros(m, *shape, dtype=dtype, device=device))

    outputs = [own.calls[0].outputs[0] for own in owners]
    handles = [out.register_hook(make_hook(own)) for own, out in zip(owners, outputs, strict=True)]
    like = {id(own): (o.shape, o.dtype, o.device) for own, o in zip(owners, outputs, strict=True)}
    mc_sources = [s for s in by_source if s != "grad"]
    sinks = _sinks(outputs) if mc_sources else []
    # The hooks live on the autograd nodes: drop the references to the module outputs, so that
    # autograd frees those it does not save (e.g. a convolution's output before a ReLU).
    del outputs
    for own in owners:
        own.calls[0].outputs = ()
    try:
        state["source"] = "grad" if "grad" in by_source else None
        grads = torch.autograd.grad(
            loss, [p for _, p in named], allow_unused=True, retain_graph=bool(mc_sources)
        )
        if "grad" in by_source:
            unreached("grad", 1)
        for k, source in enumerate(mc_sources):
            if source == "exact":
                sqrt = spec.sqrt_hessian(output, targets)
            else:
                sqrt = spec.sampled_sqrt_hessian(output, source, generator)
            state["source"], state["done"], state["columns"] = source, set(), sqrt.shape[0]
            for m in range(sqrt.shape[0]):
                last = k == len(mc_sources) - 1 and m == sqrt.shape[0] - 1
                _backward_column(output, sinks, sqrt[m], retain_graph=not last)
            columns.clear()
            unreached(source, sqrt.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    ctx.grad.update(
        {
            name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(named, grads, strict=True)
        }
    )
    values: dict[str, dict[str, Any]] = {}
    # quantities that finish their partial value may overwrite it: copy one that is shared
    shared = Counter(id(v) for part in partial.values() for v in part.values())
    for q in quantities:
        values[q.name] = {}
        finishes = type(q).finish_streamed is not Quantity.finish_streamed
        for name, param in named:
            if name in partial[q.name]:
                value = partial[q.name][name]
                if finishes and shared[id(value)] > 1 and isinstance(value, Tensor):
                    value = value.clone()
                values[q.name][name] = q.finish_streamed(value, name, ctx)
            elif not q.layerwise:  # a parameter no module used
                view = ParamDerivatives(name, [], {q.sources()[0]: {}}, param.detach(), n, {})
                values[q.name][name] = q.evaluate(view, ctx)
    return Results(loss.detach(), ctx.grad, output.detach(), values)


def _columns_of(
    batched: Sequence[Tensor | None],
    factor_slots: list[tuple[Call, int]],
    owner_calls: list[Call],
    n: int,
    select,
) -> dict[int, list[Tensor | None]]:
    """Per call, the back-propagated columns ``[M, n, *out]`` of each output (``None``: zero)."""
    per_call: dict[int, list[Tensor | None]] = {id(c): [None] * len(c.outputs) for c in owner_calls}
    for (call, i), g in zip(factor_slots, batched, strict=True):
        if g is not None:
            per_call[id(call)][i] = select(g, 1)
    return per_call


def _concat(
    parts: list[dict[int, list[Tensor | None]]], owner_calls: list[Call], n: int
) -> dict[int, tuple[Tensor, ...]]:
    """Concatenate column blocks along ``M`` (zeros where a block did not reach an output)."""
    out = {}
    for call in owner_calls:
        tensors = []
        for i, o in enumerate(call.outputs):
            blocks = []
            for part in parts:
                block = part[id(call)][i]
                if block is not None:
                    blocks.append(block)
            if not blocks:
                blocks = [torch.zeros(1, n, *o.shape[1:], dtype=o.dtype, device=o.device)]
            tensors.append(blocks[0] if len(blocks) == 1 else torch.cat(blocks))
        out[id(call)] = tuple(tensors)
    return out


def _hessian_obstacle(
    method: str,
    owners: list[Owner],
    output: Tensor,
    modules: dict[str, nn.Module],
    activations: list[tuple[str, nn.Module, Call]],
) -> str | None:
    """Why the fast Hessian path cannot be used, or ``None``."""
    if method == "func":
        return "method='func' was requested"
    for own in owners:
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
    calls = [
        (own.name, own.module, call, own.rule.linear_in_input)
        for own in owners
        for call in own.calls
    ]
    return graph_obstacle(output, calls, activations)


def _warn_hessian_fallback(obstacle: str, method: str) -> None:
    if method == "func":
        return
    key = f"hessian:{obstacle}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"Hessian quantities use the generic torch.func path (exact, P Hessian-vector "
        f"products) because of {obstacle}",
        GenericPathWarning,
        stacklevel=3,
    )
