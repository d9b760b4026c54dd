r"""Quantities defined by a backward recursion over a chain of layers: KFRA, BL89, HesScale.

These approximations are defined layer by layer for feed-forward chains, so they need the model
to be an ``nn.Sequential`` (nested ``Sequential`` s are flattened) of modules with a known
recursion step; any other module raises :class:`~curvlab.backprop.errors.UnsupportedModuleError`
naming it. Modules *below* the lowest parametric layer are never visited, so e.g. a leading
``Flatten`` is always fine. The per-sample loss gradients w.r.t. every module output come from
the engine's single backward pass (:attr:`Context.output_grads`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)

from curvlab.backprop.derivatives import Context
from curvlab.backprop.errors import UnsupportedModuleError
from curvlab.backprop.kron import KronFactors, Layout, kron_block
from curvlab.backprop.rules import find_rule
from curvlab.backprop.rules.activation import (
    ELEMENTWISE,
    PIECEWISE_LINEAR,
    activation_derivatives,
    first_derivative,
)
from curvlab.backprop.rules.base import Call, KronSums
from curvlab.backprop.rules.conv import grouped_output_sum, unfold
from curvlab.backprop.rules.norm import NormRule

_PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)


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


def _graph_vjp(ctx: Context, call: Call, vectors: Tensor, batched: bool = False) -> Tensor:
    """VJP through the recorded graph of a call (input 0), for subsampled ``vectors``."""
    out, inp = call.outputs[0], call.graph_inputs[0]
    if ctx.index is not None:
        shape = (vectors.shape[0], *out.shape) if batched else out.shape
        full = vectors.new_zeros(shape)
        full.index_copy_(1 if batched else 0, ctx.index.to(vectors.device), vectors)
        vectors = full
    (result,) = torch.autograd.grad(
        out, inp, grad_outputs=vectors, retain_graph=True, is_grads_batched=batched
    )
    if ctx.index is not None:
        result = result.index_select(1 if batched else 0, ctx.index.to(result.device))
    return result


def _names(name: str, module: nn.Module) -> dict[str, str]:
    return {local: f"{name}.{local}" for local, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------- KFRA
KFRA_MAX_FEATURES = 2**13
"""Largest activation (features per sample) whose dense batch-averaged GGN KFRA propagates."""

_LINEAR_PARAMETER_FREE = (
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
)
"""Parameter-free modules that are linear in their input (one Jacobian for every sample)."""


def _sandwich(module: nn.Module, x: Tensor, g_bar: Tensor) -> Tensor:
    r""":math:`J^\top \bar G J` for the input Jacobian :math:`J` of ``module`` at one sample ``x``.

    Two batched VJPs: rows of :math:`\bar G J` from the rows of :math:`\bar G`, then rows of
    :math:`J^\top (\bar G J)` (symmetric) from the columns of :math:`\bar G J`.
    """
    with torch.enable_grad():
        _, pullback = torch.func.vjp(module, x.unsqueeze(0))
    out_shape = module(x.unsqueeze(0)).shape

    def rows(m: Tensor) -> Tensor:
        (vjp,) = torch.func.vmap(pullback)(m.reshape(m.shape[0], *out_shape))
        return vjp.reshape(m.shape[0], -1)

    g_j = rows(g_bar)  # [D_out, D_in]
    return rows(g_j.T.contiguous())  # [D_in, D_in]


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
    if isinstance(module, nn.Linear) and x.dim() == 2:
        w = module.weight.detach()
        return w.T @ g_bar @ w
    if isinstance(module, ELEMENTWISE):
        first = first_derivative(module, x).flatten(start_dim=1)
        return g_bar * (first.T @ first / first.shape[0])
    if isinstance(module, nn.Dropout) and not module.training:
        return g_bar
    rule = find_rule(module)
    linear = isinstance(module, _LINEAR_PARAMETER_FREE) or (
        rule is not None and rule.linear_in_input
    )
    if linear:  # one Jacobian for all samples
        return _sandwich(module, x[0], g_bar)
    random_or_batch = isinstance(module, (nn.modules.dropout._DropoutNd, _BatchNorm))
    if not _has_params(module) and not (random_or_batch and module.training):
        # per-sample Jacobians (max pooling, other nonlinear modules), averaged
        return sum(_sandwich(module, xn, g_bar) for xn in x) / x.shape[0]
    raise _unsupported(
        "KFRA",
        name,
        module,
        "KFRA propagates through modules linear in their input, elementwise activations and "
        "parameter-free modules that treat samples independently (no dropout or batch norm in "
        "training mode)",
    )


def _kfra_factors(
    name: str, module: nn.Module, call: Call, x: Tensor, g_bar: Tensor, ctx: Context
) -> dict[str, KronFactors]:
    r"""The typed block of every parameter of a layer with a Kronecker rule.

    A weight's ``B`` sums the diagonal blocks of :math:`\bar G_y` over the positions that share
    it (KFAC-expand, per group for grouped layers); a bias's sums every block, its exact share.
    """
    rule = find_rule(module)
    if rule is None or not rule.kronecker or isinstance(rule, NormRule):
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
    channels_last = isinstance(module, (nn.Linear, nn.Embedding))
    c = out_shape[-1] if channels_last else out_shape[0]
    t = math.prod(out_shape) // c
    if channels_last:
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
def _param_diagonals(
    name: str, module: nn.Module, x: Tensor, d_out: Tensor, r: float
) -> dict[str, Tensor]:
    """BL89 parameter diagonals of a Linear / Conv layer from the output diagonal."""
    names = _names(name, module)
    out = {}
    if isinstance(module, nn.Linear):
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).square()
        ds = d_out.reshape(d_out.shape[0], -1, d_out.shape[-1])
        if "weight" in names:
            out[names["weight"]] = r * torch.einsum("nto,nti->oi", ds, xs)
        if "bias" in names:
            out[names["bias"]] = r * ds.sum((0, 1))
    else:
        u = unfold(module, x).square()  # [N, in*K, T]
        n, g = x.shape[0], module.groups
        ds = d_out.reshape(n, g, module.out_channels // g, -1)
        us = u.reshape(n, g, -1, u.shape[-1])
        if "weight" in names:
            w = torch.einsum("ngot,ngit->goi", ds, us)
            out[names["weight"]] = r * w.reshape(module.weight.shape)
        if "bias" in names:
            out[names["bias"]] = r * ds.sum((0, 3)).reshape(-1)
    return out


def _diag_step(
    ctx: Context, name: str, module: nn.Module, call: Call, d_out: Tensor, quantity: str
) -> Tensor:
    r"""One BL89 step: the diagonal w.r.t. the module input from the one w.r.t. its output."""
    x = call.args[0]
    if isinstance(module, nn.Linear):
        return d_out @ module.weight.detach().square()
    if isinstance(module, _ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.padding_mode != "zeros":
            raise _unsupported(quantity, name, module, "padding modes other than zeros")
        weight_sq = module.weight.detach().square()
        _, vjp = torch.func.vjp(lambda z: module._conv_forward(z, weight_sq, None), x)
        return vjp(d_out)[0]
    if isinstance(module, ELEMENTWISE):
        first, second = activation_derivatives(module, x)
        grad_a = ctx.output_grads[call][0]
        return first.square() * d_out + second * grad_a
    if isinstance(module, (_MaxPoolNd, _AdaptiveMaxPoolNd)):
        return _graph_vjp(ctx, call, d_out)
    if isinstance(module, _AvgPoolNd):
        if (
            module.ceil_mode
            or not getattr(module, "count_include_pad", True)
            or getattr(module, "divisor_override", None)
        ):
            raise _unsupported(quantity, name, module, "only ceil_mode=False, count_include_pad")
        kernel = module.kernel_size
        size = math.prod(kernel) if isinstance(kernel, tuple) else kernel ** (x.dim() - 2)
        return _graph_vjp(ctx, call, d_out) / size
    if isinstance(module, _AdaptiveAvgPoolNd):
        in_sizes, out_sizes = x.shape[2:], d_out.shape[2:]
        if any(i % o for i, o in zip(in_sizes, out_sizes, strict=True)):
            raise _unsupported(quantity, name, module, "output sizes must divide input sizes")
        size = math.prod(i // o for i, o in zip(in_sizes, out_sizes, strict=True))
        return _graph_vjp(ctx, call, d_out) / size
    if isinstance(module, _PASS_THROUGH):
        scale = 1.0
        if isinstance(module, nn.Dropout) and module.training:
            scale = 1.0 / (1.0 - module.p)
        return _graph_vjp(ctx, call, d_out) * scale
    raise _unsupported(quantity, name, module, "no diagonal backpropagation rule")


def diagonal_recursion(ctx: Context, exact_last_layer: bool) -> dict[str, Tensor]:
    r"""BL89 (``exact_last_layer=False``) or HesScale parameter diagonals."""
    quantity = "HesScale" if exact_last_layer else "BL89"
    chain = _chain(ctx, quantity)
    parametric = [i for i, (_, m, _) in enumerate(chain) if _has_params(m)]
    if not parametric:
        return {}
    for i in parametric:
        name, module, _ = chain[i]
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise _unsupported(
                quantity, name, module, "only Linear and Conv layers hold parameters"
            )
    output = _select(ctx, ctx.output)
    sqrt = ctx.spec.sqrt_hessian(output, _select(ctx, ctx.targets))  # [M, N, *out]
    results: dict[str, Tensor] = {}
    top = len(chain) - 1
    d = sqrt.square().sum(0)
    if exact_last_layer:
        last = parametric[-1]
        for name, module, _ in chain[last + 1 :]:
            if isinstance(module, ELEMENTWISE) and not isinstance(module, PIECEWISE_LINEAR):
                raise _unsupported(
                    quantity,
                    name,
                    module,
                    "HesScale needs the last parametric layer to be "
                    "followed by (piecewise) linear modules only",
                )
        name, module, call = chain[last]
        cols = sqrt
        for above in range(top, last - 1, -1):
            if above == last:
                d_out = cols.square().sum(0)
                results.update(_param_diagonals(name, module, call.args[0], d_out, ctx.r))
            cols = _graph_vjp(ctx, chain[above][2], cols, batched=True)
        d = cols.square().sum(0)
        top = last - 1
    for i in range(top, parametric[0] - 1, -1):
        name, module, call = chain[i]
        if _has_params(module):
            results.update(_param_diagonals(name, module, call.args[0], d, ctx.r))
        if i > parametric[0]:
            d = _diag_step(ctx, name, module, call, d, quantity)
    return dict(sorted(results.items(), key=lambda kv: ctx.param_names.index(kv[0])))
