"""Recording a forward pass: module calls, which module owns which parameter, and its rule.

:class:`Recorder` puts forward hooks on the model's modules and keeps one
:class:`~curvlab.backprop.rules.base.Call` per execution (forward passes under ``torch.no_grad``
are not recorded). :func:`assign_owners` maps every trainable parameter to the called modules
that provide its derivatives, and :func:`choose_rules` gives each of them its rule. The checks
that reject what no path can handle (batch norm in training mode, in-place outputs, oversized
whole blocks) live here too.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from curvlab.backprop import quantities as quantity_classes
from curvlab.backprop.derivatives import Owner
from curvlab.backprop.errors import GenericPathWarning, UnsupportedModuleError
from curvlab.backprop.functional import FuncRule
from curvlab.backprop.quantities import Quantity
from curvlab.backprop.rules import Call, find_rule

METHODS = ("auto", "func")
"""The values of ``method``."""

MAX_FULL_BLOCK = 2**13
"""Largest parameter (elements) whose whole GGN block stands in for Kronecker factors."""

EXACT_QUANTITIES = (
    "BatchGrad, BatchL2, SumGradSquared, Variance, DiagGGN, BatchDiagGGN, SqrtGGN, DiagHessian, "
    "BatchDiagHessian, GGNMP, HMP"
)

_WARNED: set[str] = set()
"""Module classes (and Hessian obstacles) already reported: the warnings are one-time."""


def quantity_names() -> dict[str, Quantity]:
    """Every built-in quantity by name: defaults, and the one-sample MC variants."""
    table: dict[str, Quantity] = {}
    for cls in quantity_classes.ALL:
        table[cls().name] = cls()
        if issubclass(cls, quantity_classes._MCQuantity) and cls().mc_samples is None:
            table[cls(mc_samples=1).name] = cls(mc_samples=1)
    return table


def check_quantities(quantities: Iterable[Quantity | str]) -> list[Quantity]:
    """Quantity objects (strings are looked up by name), each name at most once.

    Raises:
        TypeError: For an object that is not a quantity.
        ValueError: For an unknown name (listing the valid ones) or a name requested twice.
    """
    if isinstance(quantities, (str, Quantity)):
        quantities = [quantities]
    out: list[Quantity] = []
    names: set[str] = set()
    for q in quantities:
        if isinstance(q, str):
            table = quantity_names()
            if q not in table:
                raise ValueError(f"unknown quantity {q!r}; valid names: {', '.join(sorted(table))}")
            q = table[q]
        if not isinstance(q, Quantity):
            raise TypeError(
                f"quantities must be curvlab.backprop quantity objects or their names, got {q!r}"
            )
        if q.name in names:
            raise ValueError(f"quantity {q.name!r} requested twice")
        names.add(q.name)
        out.append(q)
    return out


def check_batchnorm(model: nn.Module) -> None:
    """Batch norm must use running statistics (samples are otherwise coupled)."""
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


class Recorder:
    """Forward hooks that record the calls of modules (those with trainable parameters, or all).

    Attributes:
        records: The calls by module name, in execution order.
    """

    def __init__(self, model: nn.Module, every_module: bool) -> None:
        self.records: dict[str, list[Call]] = {}
        self._handles: list[Any] = []
        self._counter = itertools.count()
        for name, module in model.named_modules():
            if not every_module and not any(p.requires_grad for p in module.parameters()):
                continue
            calls: list[Call] = []
            self.records[name] = calls
            self._handles.append(module.register_forward_hook(self._hook(calls), with_kwargs=True))

    def _hook(self, calls: list[Call]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not torch.is_grad_enabled():
                return  # an evaluation pass: nothing to differentiate
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
                    order=next(self._counter),
                )
            )

        return hook

    def remove(self) -> None:
        """Remove the hooks (the records stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget the recorded calls (the hooks stay)."""
        for calls in self.records.values():
            calls.clear()


def _holders(model: nn.Module, trainable: dict[Tensor, str]) -> dict[str, list[tuple[str, str]]]:
    """Per trainable parameter, the ``(module, local name)`` pairs that hold it directly."""
    holders: dict[str, list[tuple[str, str]]] = {name: [] for name in trainable.values()}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            if p in trainable and (mod_name, local) not in holders[trainable[p]]:
                holders[trainable[p]].append((mod_name, local))
    return holders


def assign_owners(
    model: nn.Module, records: dict[str, list[Call]], named: list[tuple[str, nn.Parameter]]
) -> tuple[list[Owner], dict[str, list[tuple[Owner, str]]]]:
    """Map every trainable parameter to the called modules that provide its derivatives.

    A parameter belongs to the modules that hold it directly; if none of them was called (a
    parent used it functionally, e.g. ``MultiheadAttention.out_proj``), to the nearest called
    ancestor, which then uses the generic rule for it.

    Returns:
        The owners, and per parameter name its ``(owner, local name)`` pairs.
    """
    modules = dict(model.named_modules())
    owners: dict[str, Owner] = {}
    uses: dict[str, list[tuple[Owner, str]]] = {name: [] for name, _ in named}

    def owner(name: str) -> Owner:
        if name not in owners:
            owners[name] = Owner(name, modules[name], records[name])
        return owners[name]

    for full, held in _holders(model, {p: n for n, p in named}).items():
        for mod_name, local in held:
            if records.get(mod_name):
                uses[full].append((owner(mod_name), local))
        if uses[full] or not held:
            continue
        mod_name, local = held[0]
        while mod_name:
            parent, _, child = mod_name.rpartition(".")
            local, mod_name = f"{child}.{local}", parent
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


def choose_rules(owners: list[Owner], method: str, quantities: list[Quantity]) -> None:
    """Give every owner its rule (generic modules warned once) and check whole blocks."""
    generic = []
    for own in owners:
        rule = find_rule(own.module)
        if rule is not None and not rule.applies(own.module, own.calls):
            rule = None
        if own.generic_names and rule is not None:
            if own.generic_names <= set(rule.claims):
                own.generic_names = set()  # the rule covers the uncalled children's parameters
            else:
                rule = None
        own.kron_rule = rule if rule is not None and rule.kronecker else None
        if method == "func" or rule is None:
            own.rule = FuncRule(own.name)
            if rule is None:
                generic.append(own)
        else:
            own.rule = rule
        if own.kron_rule is None:
            check_full_blocks(own, quantities)
    new = sorted({type(o.module).__name__ for o in generic} - _WARNED)
    if method == "auto" and new:
        _WARNED.update(new)
        listing = ", ".join(f"{type(o.module).__name__} ('{o.name}')" for o in generic)
        warnings.warn(
            f"curvlab has no per-layer rule for {listing}; using the generic torch.func path "
            "(exact, slower)",
            GenericPathWarning,
            stacklevel=4,
        )


def check_full_blocks(own: Owner, quantities: list[Quantity]) -> None:
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


def check_batch_first(owners: list[Owner], batch_size: int) -> None:
    """Per-layer rules read dimension 0 as the batch: reject a call whose output says otherwise.

    (A ``Linear`` applied to a sequence-first ``[T, N, H]`` tensor, say; the generic rule knows
    the batch dimensions of recurrent layers.)
    """
    for own in owners:
        if isinstance(own.rule, FuncRule):
            continue
        for call in own.calls:
            for out in call.outputs:
                if out.dim() == 0 or out.shape[0] != batch_size:
                    raise UnsupportedModuleError(
                        f"the output of {type(own.module).__name__} (module '{own.name}') has "
                        f"shape {list(out.shape)}, whose first dimension is not the batch "
                        f"({batch_size} samples); per-layer rules need batch-first tensors "
                        "(use method='func', or keep the batch first inside the model)"
                    )


def check_versions(records: dict[str, list[Call]], modules: dict[str, nn.Module]) -> None:
    """Reject module outputs that were modified in place after the module returned them."""
    for name, calls in records.items():
        for call in calls:
            for out, version in zip(call.outputs, call.versions, strict=True):
                if out._version != version:
                    raise UnsupportedModuleError(
                        f"the output of {type(modules[name]).__name__} (module '{name}') was "
                        "modified in place after the module returned it (e.g. "
                        "ReLU(inplace=True)); use out-of-place operations"
                    )
