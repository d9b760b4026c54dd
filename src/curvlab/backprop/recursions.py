r"""Quantities defined by a backward recursion over the layers: KFRA, BL89, HesScale.

BL89 and HesScale run on any graph the rules cover (:mod:`~curvlab.backprop.diagonals`). KFRA
propagates a dense batch-averaged GGN per activation and needs the model to be an
``nn.Sequential`` (nested ``Sequential`` s are flattened); every step asks the module's rule
(:meth:`~curvlab.backprop.rules.base.Rule.ggn_backprop`), and a module without one raises
:class:`~curvlab.backprop.errors.UnsupportedModuleError` naming it. Modules *below* the lowest
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


def _chain(ctx: Context, quantity: str) -> list[tuple[str, nn.Module, Call]]:
    """``(name, module, call)`` of the leaf modules of a (nested) ``nn.Sequential``, in order."""
    if not isinstance(ctx.model, nn.Sequential):
        raise UnsupportedModuleError(
            f"{quantity} is a layer-by-layer recursion and needs an nn.Sequential model; got "
            f"{type(ctx.model).__name__} with a custom forward (exact alternatives: DiagHessian, "
            "DiagGGN)"
        )
    chain = []

    def visit(prefix: str, seq: nn.Sequential) -> None:
        for child_name, child in seq.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, nn.Sequential):
                visit(f"{name}.", child)
                continue
            calls = ctx.records.get(name, [])
            if len(calls) != 1:
                raise UnsupportedModuleError(
                    f"{quantity}: module '{name}' ({type(child).__name__}) was called "
                    f"{len(calls)} times; the recursion needs each module called once"
                )
            chain.append((name, child, calls[0]))

    visit("", ctx.model)
    return chain


def _has_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


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
    r"""KFRA factors (see :class:`~curvlab.backprop.quantities.KFRA`)."""
    chain = _chain(ctx, "KFRA")
    lowest = min((i for i, (_, m, _) in enumerate(chain) if _has_params(m)), default=-1)
    if ctx.output.dim() != 2:
        raise UnsupportedModuleError(
            f"KFRA needs a model output [N, C]; got {list(ctx.output.shape)}"
        )
    sqrt = ctx.spec.sqrt_hessian(_select(ctx, ctx.output), _select(ctx, ctx.targets))
    g_bar = ctx.r * torch.einsum("mnd,mne->de", sqrt, sqrt)
    results: dict[str, Any] = {}
    for i in range(len(chain) - 1, lowest - 1, -1):
        name, module, call = chain[i]
        x = call.args[0]
        if _has_params(module):
            results.update(_kfra_factors(name, module, call, x, g_bar, ctx))
        if i > lowest:
            g_bar = _kfra_step(name, module, x, g_bar)
    return dict(sorted(results.items(), key=lambda kv: ctx.param_names.index(kv[0])))


def _select(ctx: Context, t: Tensor) -> Tensor:
    return t if ctx.index is None else t.index_select(0, ctx.index.to(t.device))


# ---------------------------------------------------------------------------- BL89 / HesScale
def diagonal_recursion(ctx: Context, exact_last_layer: bool) -> dict[str, Tensor]:
    """BL89 or HesScale (``exact_last_layer``) diagonals: :mod:`~curvlab.backprop.diagonals`."""
    from curvlab.backprop.diagonals import diagonals

    return diagonals(ctx, exact_last_layer)
