r"""The GGN's square-root factor :math:`V` of one parameter, kept factored per layer call.

:math:`G = V V^\top` with the columns :math:`V_{mn} = \sqrt{r_S}\, J_n^\top F_{mn}` (``F`` the
back-propagated loss-Hessian square root, exact or MC). :class:`FactorQuantity` is an engine
quantity (:mod:`curvlab.backprop.quantities`) that only keeps, per parameter, the recorded
calls and their factors ``[M, N, *out]`` (activation-sized, not ``[M, N, *p]``);
:class:`ParamFactor` then forms Gram matrices with the rules' :meth:`~curvlab.backprop.Rule.gram`
primitive (factored for ``Linear``) and the products :math:`V c` with
:meth:`~curvlab.backprop.Rule.sum_jac_t`.

Scaling :math:`r_S`: the GGN is that of the samples used, as a batch of its own:
:math:`r_S = 1/|S|` for ``reduction="mean"`` and :math:`1` for ``"sum"`` (``S`` the subsample,
or the whole batch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.backprop import GRAD, Context, ParamDerivatives, Quantity, SqrtGGN
from curvlab.backprop.sources import Source


class ParamFactor:
    r"""One parameter's factor :math:`s\, J_n^\top F_{mn}` (summed over calls), unevaluated.

    Args:
        view: The engine's derivatives of the parameter.
        source: Which back-propagated factor (exact, MC, or the per-sample gradient).
        scale: ``s``, the multiplier of the rules' VJPs.
        copy: Copy the factors (autograd's own gradient tensors on the streamed path).
    """

    def __init__(self, view: ParamDerivatives, source: Source, scale: float, copy: bool) -> None:
        self.shape = view.shape
        self.param = view.param
        self.scale = scale * view.scale
        self.calls = [(owner, local, call) for owner, local in view.uses for call in owner.calls]
        factors = view.factors.get(source, {})
        self.factors = {
            call: tuple(f.clone() if copy else f for f in factors[call])
            for _, _, call in self.calls
        }

    @property
    def columns(self) -> int:
        """``M``, the factor's columns per sample (``0`` if no module used the parameter)."""
        return next(iter(self.factors.values()))[0].shape[0] if self.factors else 0

    @property
    def samples(self) -> int:
        """``N``, the samples of the factor (``0`` if no module used the parameter)."""
        return next(iter(self.factors.values()))[0].shape[1] if self.factors else 0

    def jac_t(self) -> Tensor:
        r"""The factor itself, :math:`s \sum_c J_{n,c}^\top F_{mn,c}`, ``[M, N, *p]``."""
        values = [
            owner.rule.jac_t(owner.module, call, self.factors[call], [local])[local]
            for owner, local, call in self.calls
        ]
        return sum(values[1:], values[0]) * self.scale

    def gram(self, other: ParamFactor | None = None, cache: dict | None = None) -> Tensor | None:
        r""":math:`\langle V_{mn}, V'_{m'n'} \rangle` with ``other``'s factor :math:`V'`.

        One call: the rule's :meth:`~curvlab.backprop.Rule.gram` (results shared by the
        module's parameters through ``cache``); a shared module sums its calls' VJPs first
        (their cross terms count).

        Returns:
            ``[M, N, M', N]`` (``None`` if no module used the parameter).
        """
        if not self.calls:
            return None
        other_factor = self if other is None else other
        if len(self.calls) > 1:
            a = self.jac_t().flatten(start_dim=2)
            b = a if other is None else other.jac_t().flatten(start_dim=2)
            return (a.flatten(end_dim=1) @ b.flatten(end_dim=1).T).reshape(
                *a.shape[:2], *b.shape[:2]
            )
        owner, local, call = self.calls[0]
        # keyed by the factor tensors themselves (each parameter holds its own tuple of them)
        key = (id(call), *map(id, self.factors[call]), None, *map(id, other_factor.factors[call]))
        cache = {} if cache is None else cache
        if key not in cache:
            cache[key] = owner.rule.gram(
                owner.module,
                call,
                self.factors[call],
                owner.local_names,
                None if other is None else other.factors[call],
            )
        return cache[key][local] * (self.scale * other_factor.scale)

    def contract(self, coefficients: Tensor) -> Tensor:
        r""":math:`\sum_{m,n} c_{kmn} V_{mn}` for coefficients ``[K, M, N]``, ``[K, *p]``."""
        out = self.param.new_zeros(coefficients.shape[0], *self.shape)
        for owner, local, call in self.calls:
            weighted = tuple(
                torch.einsum("kmn,mn...->kn...", coefficients, f) for f in self.factors[call]
            )
            out += owner.rule.sum_jac_t(owner.module, call, weighted, [local])[local]
        return out.mul_(self.scale)

    def release(self) -> None:
        """Drop the factors (the recorded calls' inputs and back-propagated tensors)."""
        self.calls, self.factors = [], {}


def sample_scale(ctx: Context, reduction: str) -> float:
    r""":math:`r_S`: ``1 / |S|`` for ``reduction="mean"``, the engine's :math:`r` otherwise."""
    return 1.0 / ctx.num_samples if reduction == "mean" else ctx.r


class FactorQuantity(SqrtGGN):
    r"""The GGN's square-root factor as a :class:`ParamFactor` (includes :math:`\sqrt{r_S}`).

    Args:
        mc_samples: ``None`` for the exact loss Hessian, ``k`` for ``k`` MC samples.
        reduction: The loss function's reduction (for :math:`r_S`).
    """

    def __init__(self, mc_samples: int | None = None, reduction: str = "mean") -> None:
        super().__init__(mc_samples)
        self.reduction = reduction

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Any:  # noqa: D102
        scale = sample_scale(ctx, self.reduction) ** 0.5
        return ParamFactor(view, self.sources()[0], scale, copy=False)


class GradientFactor(Quantity):
    r"""The per-sample gradients :math:`g_n = J_n^\top \nabla_f \ell_n` as a :class:`ParamFactor`."""

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Any:  # noqa: D102
        return ParamFactor(view, GRAD, 1.0, copy=True)
