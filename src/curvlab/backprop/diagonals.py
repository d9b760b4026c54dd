r"""BL89 and HesScale on any graph the rules cover: one backward pass with rule-driven hooks.

BL89 propagates, per sample, a diagonal :math:`d` of the Hessian w.r.t. every activation from
the output down, dropping off-diagonal terms: through a module, :math:`d_x = (J\odot J)^\top d_y`
(+ :math:`\phi''\,\partial\ell/\partial a` for an activation), and a tensor consumed several
times (a residual connection, branches) sums its consumers' contributions (the cross terms
between branches are off-diagonal and dropped).

The engine does this with autograd itself. A backward pass from the model output carries
:math:`d` instead of a gradient; a hook on every module output receives the module's complete
:math:`d_y`, evaluates the module's rule (:meth:`~curvlab.backprop.rules.base.Rule.
diag_backprop`, :meth:`~curvlab.backprop.rules.base.Rule.diag_params`), sends zeros into the
module's own backward and adds :math:`d_x` at the module's input tensor. Between modules, the
functional glue of ``forward`` (additions, concatenation, views, slicing) has Jacobians with 0/1
entries, so :math:`(J \odot J)^\top d = J^\top d` is autograd's own step; a few ops with other
constant entries get a node hook that squares them (``x - y``, ``-x``, ``mean``, products and
quotients with a constant, matrix products ``x @ W`` with a constant ``W``). Any other op between modules raises, naming it.

HesScale makes the last parametric layer exact: the exact loss-Hessian square root is
back-propagated to that layer's output and input (one batched backward), and BL89 continues
below it. With several last layers in parallel (the first parametric layer on each path from the
output, e.g. every projection of :class:`curvlab.nn.RevMLP` through its residual streams), the
columns reach each one along the linear head only (the others cut), go through it to its input,
and one BL89 pass from all those inputs carries the rest, summing uses as above. The samples
outside a subsample carry zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop.derivatives import Context
from curvlab.backprop.errors import UnsupportedModuleError
from curvlab.backprop.hessian import ZERO_ONE_OPS
from curvlab.backprop.rules import find_rule
from curvlab.backprop.rules.base import Call, Rule
from curvlab.backprop.rules.parameter_free import ElementwiseRule, input_rule

_ZERO_ONE = ZERO_ONE_OPS
"""Glue ops whose Jacobians have entries 0 and 1: BL89's step is the plain VJP."""


class Atom:
    """A module call the recursion treats as one step (a leaf module, or one with a rule).

    Attributes:
        name: The module's name.
        module: The module.
        call: The call, with the full-batch input in ``args``.
        rule: Its input-side rule.
        output: The call's output (attached).
        input: The call's tensor input (attached), or ``None``.
        parametric: Whether the module holds parameters the pass computes quantities for.
    """

    def __init__(self, name: str, module: nn.Module, call: Call, rule: Rule) -> None:
        self.name, self.module, self.rule = name, module, rule
        self.output = call.outputs[0]
        self.input = call.graph_inputs[0] if call.graph_inputs else None
        full = () if self.input is None else (self.input.detach(),)
        self.call = Call(args=full, outputs=call.outputs, graph_inputs=call.graph_inputs)
        self.original = call
        self.parametric = any(p.requires_grad for p in self.module.parameters())


def _unsupported(quantity: str, name: str, module: nn.Module, why: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{quantity} has no recursion step for {type(module).__name__} (module '{name}'): {why}; "
        "exact alternatives (DiagHessian, DiagGGN, KFLR) remain available"
    )


def atoms(ctx: Context, quantity: str) -> list[Atom]:
    """Every called leaf module (or module with a rule), each call once, with its rule."""
    found = []
    covered: set[str] = set()
    for name, module in ctx.model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        rule = find_rule(module)
        if rule is None and any(True for _ in module.children()):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                raise _unsupported(quantity, name, module, "it holds parameters and has no rule")
            continue  # a container: its children are the steps
        if rule is not None and any(True for _ in module.children()):
            covered.add(f"{name}.")
        for call in ctx.records.get(name, []):
            if len(call.outputs) != 1 or len(call.graph_inputs) > 1:
                raise _unsupported(quantity, name, module, "one tensor input and output needed")
            if call.graph_inputs and call.outputs[0] is call.graph_inputs[0]:
                continue  # returns its input (Identity, dropout in eval): nothing to do
            if not call.outputs[0].requires_grad:
                continue  # below every parameter (e.g. a leading Flatten)
            atom = Atom(name, module, call, input_rule(module, find_rule))
            prefix = f"{name}." if name else ""
            atom.parametric = any(
                f"{prefix}{k}" in ctx.param_names
                for k, p in module.named_parameters()
                if p.requires_grad
            )
            found.append(atom)
    return found


def _check_parametric(quantity: str, atom: Atom) -> None:
    rule = find_rule(atom.module)
    if rule is None or type(rule).diag_params is Rule.diag_params:
        raise _unsupported(
            quantity, atom.name, atom.module, "its rule has no BL89 parameter diagonals"
        )


def _constant(node: Any) -> Tensor | float | None:
    """The constant factor of a product or quotient node (``None``: both factors vary)."""
    values = [getattr(node, attr, None) for attr in ("_saved_self", "_saved_other")]
    constants = [v for v in values if not (isinstance(v, Tensor) and v.requires_grad)]
    variables = [v for v in values if isinstance(v, Tensor) and v.requires_grad]
    if len(variables) > 1 or not constants:
        return None
    return constants[-1]


def _glue_hook(node: Any, name: str):
    """A post-hook squaring the constant Jacobian entries of ``node`` (``None``: 0/1 entries).

    Returns ``"obstacle"`` for an op without a diagonal step.
    """
    if name.startswith(_ZERO_ONE):
        return None
    if name.startswith("Neg"):
        return lambda grads_in, grads_out: tuple(None if g is None else -g for g in grads_in)
    if name.startswith("Sub"):
        alpha = float(getattr(node, "_saved_alpha", 1.0))

        def sub(grads_in, grads_out):
            if len(grads_in) < 2 or grads_in[1] is None:
                return grads_in
            return (grads_in[0], -alpha * grads_in[1])

        return sub
    if name.startswith("Mean"):

        def mean(grads_in, grads_out):
            k = grads_in[0].numel() / grads_out[0].numel()
            return tuple(None if g is None else g / k for g in grads_in)

        return mean
    if name.startswith(("Mul", "Div")):
        c = _constant(node)
        if c is None or (
            name.startswith("Div")
            and isinstance(getattr(node, "_saved_other", None), Tensor)
            and node._saved_other.requires_grad
        ):
            return "obstacle"
        c = c if name.startswith("Mul") else 1.0 / c
        return lambda grads_in, grads_out: tuple(None if g is None else g * c for g in grads_in)
    if name.startswith("Mm"):
        return _matmul_hook(node)
    return "obstacle"


def _matmul_hook(node: Any):
    r"""The step through :math:`y = x W` with a constant matrix :math:`W` (``[in, out]``).

    As for a linear layer, :math:`d_x = d_y\, (W \odot W)^\top` per sample (``[N, out] ->
    [N, in]``), e.g. the fixed expansions and projection of :class:`curvlab.nn.RevMLP`. A varying
    right factor mixes the samples and has no diagonal step (``"obstacle"``).
    """
    weight = getattr(node, "_saved_mat2", None)
    if not isinstance(weight, Tensor) or weight.requires_grad:
        return "obstacle"
    squared = weight.square().T

    def matmul(grads_in, grads_out):
        if grads_in[0] is None:
            return grads_in
        return (grads_out[0] @ squared, *grads_in[1:])

    return matmul


def _install_glue_hooks(roots: list[Tensor], stops: dict[Any, Atom], quantity: str) -> list[Any]:
    """Node hooks on the glue between atoms below ``roots``; raises for an op with no BL89 step."""
    handles, seen = [], set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in stops:  # an atom: continue below its input
            atom = stops[node]
            if atom.input is not None and atom.input.grad_fn is not None:
                stack.append(atom.input.grad_fn)
            continue
        name = type(node).__name__
        if name == "AccumulateGrad":
            continue
        hook = _glue_hook(node, name)
        if hook == "obstacle":
            raise UnsupportedModuleError(
                f"{quantity}: the operation {name} between modules (in the model's forward) has "
                "no diagonal backpropagation step; use modules for nonlinear operations (exact "
                "alternatives: DiagHessian, DiagGGN)"
            )
        if hook is not None:
            handles.append(node.register_hook(hook))
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return handles


def _full(ctx: Context, t: Tensor | None, n: int) -> Tensor | None:
    """A subsampled ``[n_sub, ...]`` tensor back on the full batch (zeros elsewhere)."""
    if t is None or ctx.index is None:
        return t
    full = t.new_zeros(n, *t.shape[1:])
    full.index_copy_(0, ctx.index.to(t.device), t)
    return full


class _Propagation:
    """The hooks of one diagonal backward pass (see the module docstring)."""

    def __init__(self, ctx: Context, quantity: str, steps: list[Atom]) -> None:
        self.ctx, self.quantity, self.steps = ctx, quantity, steps
        self.pending: dict[Tensor, Tensor] = {}
        self.results: dict[str, Tensor] = {}
        self.handles: list[Any] = []
        self.nested = False  # a rule's own VJP is running: the hooks stand aside

    def _names(self, atom: Atom) -> dict[str, str]:
        prefix = f"{atom.name}." if atom.name else ""
        return {k: prefix + k for k, p in atom.module.named_parameters() if p.requires_grad}

    def add_params(self, atom: Atom, d_out: Tensor) -> None:
        """The atom's parameter diagonals from the diagonal at its output."""
        names = self._names(atom)
        local = find_rule(atom.module).diag_params(atom.module, atom.call, d_out, list(names))
        for k, v in local.items():
            full = names[k]
            if full not in self.ctx.param_names:
                continue  # not asked for (compute(..., params=...))
            value = self.ctx.r * v
            self.results[full] = value if full not in self.results else self.results[full] + value

    def _vjp(self, atom: Atom) -> Callable[[Tensor], Tensor]:
        def vjp(v: Tensor) -> Tensor:
            self.nested = True
            try:
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(atom.output, atom.input, v, retain_graph=True)
            finally:
                self.nested = False
            return g

        return vjp

    def step(self, atom: Atom, d_out: Tensor) -> Tensor | None:
        """The diagonal at the atom's input (``None`` when its input needs none)."""
        if atom.input is None or not atom.input.requires_grad:
            return None
        grads = self.ctx.output_grads.get(atom.original)
        grad_out = None if grads is None else _full(self.ctx, grads[0], d_out.shape[0])
        try:
            return atom.rule.diag_backprop(atom.module, atom.call, d_out, grad_out, self._vjp(atom))
        except NotImplementedError as err:
            raise _unsupported(self.quantity, atom.name, atom.module, str(err)) from err

    def install(self) -> None:
        """Input hooks first (they complete a producer's diagonal), then the output hooks."""
        for atom in self.steps:
            if atom.input is not None and atom.input.requires_grad:
                self.handles.append(atom.input.register_hook(self._inject(atom.input)))
        for atom in self.steps:
            self.handles.append(atom.output.register_hook(self._at_output(atom)))

    def _inject(self, tensor: Tensor):
        def hook(g: Tensor) -> Tensor:
            if self.nested:
                return g
            extra = self.pending.pop(tensor, None)
            return g if extra is None else g + extra

        return hook

    def _at_output(self, atom: Atom):
        def hook(d_out: Tensor) -> Tensor:
            if self.nested:
                return d_out
            d_out = d_out.detach()
            if atom.parametric:
                self.add_params(atom, d_out)
            d_in = self.step(atom, d_out)
            if d_in is not None:
                key = atom.input
                self.pending[key] = d_in if key not in self.pending else self.pending[key] + d_in
            return torch.zeros_like(d_out)  # the module's own backward carries nothing

        return hook

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()


def _run(roots: list[tuple[Tensor, Tensor]], steps: list[Atom], propagation: _Propagation) -> None:
    """One backward pass from the ``(tensor, diagonal)`` roots carrying the diagonals."""
    targets = [a.output for a in steps] + [
        a.input for a in steps if a.input is not None and a.input.requires_grad
    ]
    targets = list({id(t): t for t in targets}.values())
    propagation.install()
    try:
        with torch.enable_grad():
            torch.autograd.grad(
                [r for r, _ in roots],
                targets,
                [d for _, d in roots],
                retain_graph=True,
                allow_unused=True,
            )
    finally:
        propagation.remove()


def _masked(ctx: Context, t: Tensor, dim: int) -> Tensor:
    """``t`` with the samples outside the subsample zeroed (batch at ``dim``)."""
    if ctx.index is None:
        return t
    mask = torch.zeros(t.shape[dim], dtype=t.dtype, device=t.device)
    mask[ctx.index.to(t.device)] = 1.0
    return t * mask.reshape(*[1] * dim, -1, *[1] * (t.dim() - dim - 1))


def _last_layers(quantity: str, steps: list[Atom], output: Tensor) -> list[Atom]:
    """The last parametric layers: the first parametric atom on each path from the output.

    Only (piecewise) linear modules may lie above them (the linear head).
    """
    parametric = [a for a in steps if a.parametric]
    stops = {a.output.grad_fn: a for a in steps}
    # walk from the output to the first parametric atoms on each path
    frontier, seen, first = [output.grad_fn], set(), []
    while frontier:
        node = frontier.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        atom = stops.get(node)
        if atom is not None and atom.parametric:
            if atom not in first:
                first.append(atom)
            continue
        if (
            atom is not None
            and isinstance(atom.rule, ElementwiseRule)
            and not atom.rule.piecewise_linear
        ):
            raise _unsupported(
                quantity,
                atom.name,
                atom.module,
                "HesScale needs the last parametric layers to be followed by (piecewise) "
                "linear modules only",
            )
        frontier.extend(f for f, _ in node.next_functions if f is not None)
    if len(parametric) > 1 and any(a.input is None for a in first):
        raise UnsupportedModuleError(f"{quantity}: a last parametric layer has no input")
    return first


def _head_columns(output: Tensor, sqrt: Tensor, last: list[Atom]) -> list[Tensor]:
    r"""Exact columns :math:`J^\top S` at each last layer's output, along the head only.

    One batched backward of the loss-Hessian square root ``[M, N, *out]`` from the model output,
    with the flow into each last layer's own backward cut, so that the columns at a layer's
    output follow only the paths that avoid every other last layer (the linear head).
    """
    cuts = [
        a.output.grad_fn.register_prehook(lambda go: tuple(torch.zeros_like(g) for g in go))
        for a in last
        if a.output.grad_fn is not None
    ]
    try:
        with torch.enable_grad():
            cols = torch.autograd.grad(
                output,
                [a.output for a in last],
                sqrt,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
    finally:
        for handle in cuts:
            handle.remove()
    return [
        sqrt.new_zeros(sqrt.shape[0], *a.output.shape) if c is None else c
        for a, c in zip(last, cols, strict=True)
    ]


def diagonals(ctx: Context, exact_last_layer: bool) -> dict[str, Tensor]:
    r"""BL89 (``exact_last_layer=False``) or HesScale parameter diagonals, on any graph."""
    quantity = "HesScale" if exact_last_layer else "BL89"
    steps = atoms(ctx, quantity)
    for atom in steps:
        if atom.parametric:
            _check_parametric(quantity, atom)
    if not any(a.parametric for a in steps):
        return {}
    root_calls = ctx.records.get("", [])
    if not root_calls or not root_calls[0].outputs:
        raise UnsupportedModuleError(f"{quantity}: the model's output was not recorded")
    output = root_calls[0].outputs[0]
    stops = {a.output.grad_fn: a for a in steps if a.output.grad_fn is not None}
    sqrt = _masked(ctx, ctx.spec.sqrt_hessian(ctx.output, ctx.targets), 1)  # [M, N, *out]
    propagation = _Propagation(ctx, quantity, steps)
    roots: list[tuple[Tensor, Tensor]] = []
    if not exact_last_layer:
        roots.append((output, sqrt.square().sum(0)))
    else:
        last = _last_layers(quantity, steps, output)
        for atom, cols in zip(last, _head_columns(output, sqrt, last), strict=True):
            propagation.add_params(atom, cols.square().sum(0))
            if atom.input is None or not atom.input.requires_grad:
                continue
            with torch.enable_grad():  # exact through the layer itself (its true Jacobian)
                (cols_in,) = torch.autograd.grad(
                    atom.output, atom.input, cols, retain_graph=True, is_grads_batched=True
                )
            roots.append((atom.input, cols_in.square().sum(0)))
        # BL89 below: every atom that feeds a last layer (a last layer among them when it feeds
        # another one, e.g. through a residual stream)
        propagation.steps = [a for a in steps if any(_upstream(a, b) for b in last)]
        if not propagation.steps:
            roots = []
    if roots:
        handles = _install_glue_hooks([r for r, _ in roots], stops, quantity)
        try:
            _run(roots, propagation.steps, propagation)
        finally:
            for handle in handles:
                handle.remove()
    return dict(sorted(propagation.results.items(), key=lambda kv: ctx.param_names.index(kv[0])))


def _upstream(atom: Atom, last: Atom) -> bool:
    """Whether ``atom``'s output feeds ``last``'s input."""
    if last.input is None or last.input.grad_fn is None:
        return False
    target = atom.output.grad_fn
    stack, seen = [last.input.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return False
