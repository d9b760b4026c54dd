r"""Quantities defined by a backward recursion over the layers: KFRA, BL89, HesScale.

BL89 and HesScale run on any graph the rules cover (:mod:`~curvlab.backprop.diagonals`), and so
does KFRA, which propagates a dense batch-averaged GGN per module output: every module step asks
the module's rule (:meth:`~curvlab.backprop.rules.base.Rule.ggn_backprop`), the functional glue
between modules (sample-independent linear maps) enters through its Jacobian, and a module or op
without a step raises :class:`~curvlab.backprop.errors.UnsupportedModuleError` naming it. Modules *below* the lowest
parametric layer are never visited, so e.g. a leading ``Flatten`` is always fine.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop.derivatives import Context
from curvlab.backprop.errors import UnsupportedModuleError
from curvlab.backprop.kron import KronFactors, Layout, kron_block
from curvlab.backprop.rules import find_rule
from curvlab.backprop.rules.base import Call, KronSums
from curvlab.backprop.rules.conv import grouped_output_sum
from curvlab.backprop.rules.parameter_free import input_rule


def _unsupported(quantity: str, name: str, module: nn.Module, why: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{quantity} has no recursion step for {type(module).__name__} (module '{name}'): {why}; "
        "exact alternatives (DiagHessian, DiagGGN, KFLR) remain available"
    )


def _names(name: str, module: nn.Module) -> dict[str, str]:
    return {local: f"{name}.{local}" for local, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------- KFRA
KFRA_MAX_FEATURES = 2**13
"""Largest activation (features per sample) whose dense batch-averaged GGN KFRA propagates."""


def _kfra_step(name: str, module: nn.Module, x: Tensor, g_bar: Tensor) -> Tensor:
    r"""The batch-averaged GGN w.r.t. the module input, :math:`\frac1N\sum_n J_n^\top \bar G J_n`."""
    if x[0].numel() > KFRA_MAX_FEATURES:
        raise _unsupported(
            "KFRA",
            name,
            module,
            f"its input has {x[0].numel()} features per sample, more than KFRA_MAX_FEATURES="
            f"{KFRA_MAX_FEATURES} for the dense batch-averaged GGN",
        )
    try:
        return input_rule(module, find_rule).ggn_backprop(module, x, g_bar)
    except NotImplementedError as err:
        raise _unsupported("KFRA", name, module, str(err)) from err


def _kfra_factors(
    name: str, module: nn.Module, call: Call, x: Tensor, g_bar: Tensor, ctx: Context
) -> dict[str, KronFactors]:
    r"""The typed block of every parameter of a layer with a Kronecker rule.

    A weight's ``B`` sums the diagonal blocks of :math:`\bar G_y` over the positions that share
    it (KFAC-expand, per group for grouped layers); a bias's sums every block, its exact share.
    """
    rule = find_rule(module)
    if rule is None or not rule.kronecker or rule.kron_kind == "whole":
        raise _unsupported(
            "KFRA",
            name,
            module,
            "KFRA has Kronecker factors for Linear, Conv, ConvTranspose and Embedding layers",
        )
    names = _names(name, module)
    local = list(names)
    out_shape = call.outputs[0].shape[1:] if call.outputs else None
    if out_shape is None:
        out_shape = module(x[:1]).shape[1:]
    c = out_shape[-1] if rule.channels_last else out_shape[0]
    t = math.prod(out_shape) // c
    if rule.channels_last:
        blocks = g_bar.reshape(t, c, t, c)
        b = blocks.diagonal(dim1=0, dim2=2).sum(-1)
        b_bias = blocks.sum((0, 2))
    else:
        blocks = g_bar.reshape(c, t, c, t)
        b = blocks.diagonal(dim1=1, dim2=3).sum(-1)
        b_bias = blocks.sum((1, 3))
    zeros = x.new_zeros(1, x.shape[0], *out_shape)
    sums = rule.kron_sums(module, Call(args=(x,)), (zeros,), local)
    groups = getattr(module, "groups", 1)
    results: dict[str, KronFactors] = {}
    for loc, full in names.items():
        s = sums[loc]
        shape = (tuple(dict(module.named_parameters())[loc].shape),)
        if s.input_sum is None:
            s = KronSums(None, s.input_count, b_bias)
            layout = Layout("bias", shape)
        else:
            b_w = b if groups == 1 else grouped_output_sum(b, groups)
            s = KronSums(s.input_sum, s.input_count, b_w, s.input_total)
            layout = Layout(rule.kron_kind, shape, groups)
        results[full] = kron_block(s, layout, (full,), ctx.num_samples, ctx.r, output_scale=1.0)
    return results


def kfra(ctx: Context) -> dict[str, Any]:
    r"""KFRA factors (see :class:`~curvlab.backprop.quantities.KFRA`), on any graph of atoms.

    The batch-averaged GGN :math:`\bar G` w.r.t. every module output is the sum over the
    module's consumers of :math:`J^\top \bar G_{\text{consumer input}} J`, :math:`J` the
    Jacobian of the functional glue between them (the cross terms between consumers are
    dropped, as KFRA keeps one block per activation); below a module, the module's rule gives
    :math:`\frac1N\sum_n J_n^\top \bar G J_n`. Modules are visited in reverse call order, so
    every consumer comes before its producers.
    """
    from curvlab.backprop.diagonals import atoms

    if ctx.output.dim() != 2:
        raise UnsupportedModuleError(
            f"KFRA needs a model output [N, C]; got {list(ctx.output.shape)}"
        )
    steps = sorted(atoms(ctx, "KFRA"), key=lambda a: a.original.order)
    calls: dict[str, int] = {}
    for atom in steps:
        calls[atom.name] = calls.get(atom.name, 0) + 1
        if atom.parametric and calls[atom.name] > 1:
            raise _unsupported(
                "KFRA",
                atom.name,
                atom.module,
                "it is called more than once (shared weights); KFLR and KFAC sum the calls",
            )
    root_calls = ctx.records.get("", [])
    if not root_calls:
        raise UnsupportedModuleError("KFRA: the model's output was not recorded")
    output = root_calls[0].outputs[0]
    sqrt = ctx.spec.sqrt_hessian(_select(ctx, ctx.output), _select(ctx, ctx.targets))
    glue = _Glue(steps, ctx.output.shape[0])
    at: dict[Any, Tensor] = {}
    glue.distribute(output, ctx.r * torch.einsum("mnd,mne->de", sqrt, sqrt), at)
    results: dict[str, Any] = {}
    for atom in reversed(steps):
        g_bar = at.pop(atom, None)
        if g_bar is None:
            continue  # the loss does not depend on it
        x = atom.original.args[0] if atom.original.args else None
        if atom.parametric:
            factors = _kfra_factors(atom.name, atom.module, atom.original, x, g_bar, ctx)
            results.update({k: v for k, v in factors.items() if k in ctx.param_names})
        if atom.input is not None and atom.input.requires_grad and glue.feeds_parameters(atom):
            glue.distribute(atom.input, _kfra_step(atom.name, atom.module, x, g_bar), at)
    return dict(sorted(results.items(), key=lambda kv: ctx.param_names.index(kv[0])))


class _Glue:
    """The functional ops between modules: which module outputs feed a tensor, and their Jacobian.

    Args:
        steps: The atoms (module calls) of the pass.
        batch_size: ``N`` of the recorded graph.
    """

    def __init__(self, steps: list, batch_size: int) -> None:
        self.steps = steps
        self.stops = {a.output.grad_fn: a for a in steps if a.output.grad_fn is not None}
        self.n = batch_size
        self._feeds: dict[Any, bool] = {}

    def producers(self, tensor: Tensor) -> list:
        """The atoms whose outputs reach ``tensor`` through glue only (checking each glue op)."""
        if tensor.grad_fn in self.stops:
            return [self.stops[tensor.grad_fn]]
        found, seen, stack = [], set(), [tensor.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in self.stops:
                found.append(self.stops[node])
                continue
            name = type(node).__name__
            if name == "AccumulateGrad":
                continue
            if not _sample_independent_linear(node, name, self.n):
                raise UnsupportedModuleError(
                    f"KFRA: the operation {name} between modules (in the model's forward) is not "
                    "a sample-independent linear map; use modules for it (exact alternatives: "
                    "KFLR, DiagGGN)"
                )
            stack.extend(f for f, _ in node.next_functions if f is not None)
        return found

    def distribute(self, tensor: Tensor, g_bar: Tensor, at: dict) -> None:
        r"""Add :math:`J_p^\top \bar G J_p` to every producer ``p`` of ``tensor``."""
        for producer in self.producers(tensor):
            if producer.output is tensor:
                jac = None
            else:
                jac = self._jacobian(tensor, producer)  # [D_t, D_p]
            part = g_bar if jac is None else jac.T @ g_bar @ jac
            at[producer] = part if producer not in at else at[producer] + part

    def _jacobian(self, tensor: Tensor, producer) -> Tensor:
        """The glue's per-sample Jacobian ``[D_t, D_p]`` (sample slots carry the basis vectors)."""
        d_t = tensor[0].numel()
        k = -(-d_t // self.n)
        basis = torch.zeros(k * self.n, d_t, dtype=tensor.dtype, device=tensor.device)
        basis[:d_t] = torch.eye(d_t, dtype=tensor.dtype, device=tensor.device)
        grads = basis.reshape(k, self.n, *tensor.shape[1:])
        handles = [  # paths through other modules carry nothing: glue only
            a.output.register_hook(lambda g: torch.zeros_like(g))
            for a in self.steps
            if a is not producer and a.output.requires_grad
        ]
        try:
            with torch.enable_grad():
                (rows,) = torch.autograd.grad(
                    tensor, producer.output, grads, retain_graph=True, is_grads_batched=True
                )
        finally:
            for handle in handles:
                handle.remove()
        return rows.reshape(k * self.n, -1)[:d_t]

    def feeds_parameters(self, atom) -> bool:
        """Whether a parametric atom lies below ``atom``'s input (else stop there)."""
        if atom not in self._feeds:
            targets = {a.output.grad_fn for a in self.steps if a.parametric}
            stack, seen, hit = [atom.input.grad_fn], set(), False
            while stack and not hit:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                hit = node in targets
                stack.extend(f for f, _ in node.next_functions if f is not None)
            self._feeds[atom] = hit
        return self._feeds[atom]


def _sample_independent_linear(node: Any, name: str, batch_size: int) -> bool:
    """Glue with the same linear Jacobian for every sample (0/1 entries or scalar constants)."""
    from curvlab.backprop.diagonals import _ZERO_ONE, _constant

    if name.startswith((*_ZERO_ONE, "Neg", "Sub", "Mean")):
        return True
    if name.startswith(("Mul", "Div")):
        c = _constant(node)
        if c is None:
            return False
        return not (isinstance(c, Tensor) and c.dim() > 0 and c.shape[0] == batch_size > 1)
    return False


def _select(ctx: Context, t: Tensor) -> Tensor:
    return t if ctx.index is None else t.index_select(0, ctx.index.to(t.device))


# ---------------------------------------------------------------------------- BL89 / HesScale
def diagonal_recursion(ctx: Context, exact_last_layer: bool) -> dict[str, Tensor]:
    """BL89 or HesScale (``exact_last_layer``) diagonals: :mod:`~curvlab.backprop.diagonals`."""
    from curvlab.backprop.diagonals import diagonals

    return diagonals(ctx, exact_last_layer)
