r"""SINGD: structured inverse-free natural-gradient descent (Lin et al., ICML 2024).

Every ``Linear``/``Conv``/``ConvTranspose`` layer (:data:`curvlab.optim.kfac.KRONECKER_MODULES`)
keeps two factors of the *inverse* Kronecker preconditioner, :math:`K` ``[G, a, a]`` (input
side) and :math:`C` ``[G, b, b]`` (output side), with :math:`K K^\top \otimes C C^\top \approx
(A \otimes B)^{-1}` in the engine's Kronecker order (``docs/backprop.md``). They start at the
identity and are updated from the engine's statistics :math:`A` (``input_factor``) and
:math:`B` (``output_factor``) of :func:`curvlab.backprop.capture` by the multiplicative
Riemannian update with momentum (no inverse, no decomposition):

.. math::

    H_K = K^\top A K, \quad H_C = C^\top B C,

    m_K \leftarrow \alpha_1 m_K + \frac{1}{2 b}\,\hat\Pi_K\big(\mathrm{tr}(H_C) H_K
        + \lambda\,\mathrm{tr}(C^\top C)\,K^\top K - b I_a\big), \quad
    K \leftarrow K (I_a - \beta_1 m_K),

    m_C \leftarrow \alpha_1 m_C + \frac{1}{2 a}\,\hat\Pi_C\big(\mathrm{tr}(H_K) H_C
        + \lambda\,\mathrm{tr}(K^\top K)\,C^\top C - a I_b\big), \quad
    C \leftarrow C (I_b - \beta_1 m_C),

with :math:`\hat\Pi` the paper's structure-preserving map of a symmetric matrix onto the
factor's structure (:data:`STRUCTURES`,
:meth:`~curvlab.optim.structures.StructuredMatrix.from_symmetric`: the natural gradient in the
structure's local coordinates, which doubles the off-diagonal entries whose mirror image is
not free; the orthogonal projection for dense, diagonal and block-diagonal). Each structure is
a matrix group (closed under products), so the update keeps it. The factors are
stored by their free entries only and multiplied in their structure
(:mod:`curvlab.optim.structures`: a diagonal is a vector, block-diagonal its blocks,
triu-Toeplitz its first row, ...), so a structure saves memory and time. At the fixed point (:math:`m_K = m_C = 0`),
:math:`(K K^\top)^{-1} = \frac{\mathrm{tr}(B C C^\top)}{b} A + \lambda \frac{\mathrm{tr}(C
C^\top)}{b} I` and likewise for :math:`C`: a damped KFAC inverse. The parameters move by

.. math::

    m_\theta \leftarrow \alpha_2 m_\theta + C C^\top \hat G K K^\top + \gamma \theta, \qquad
    \theta \leftarrow \theta - \beta_2 m_\theta

(:math:`\hat G` ``[G, b, a]`` the gradient matrices of :class:`curvlab.backprop.Layout`,
:math:`\gamma` the weight decay, :math:`\alpha_2` the momentum, :math:`\beta_2` the learning
rate). Every other parameter goes to a fallback optimizer, as in
:class:`curvlab.optim.KFAC`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop import KronFactors, capture
from curvlab.backprop.loss import LossSpec
from curvlab.optim import parts
from curvlab.optim.kfac import FALLBACKS, FallbackFactory, _is_int, _LayerwiseOptimizer, _Unit
from curvlab.optim.structures import (
    STRUCTURES,
    BlockDiagonal,
    Dense,
    Diagonal,
    Hierarchical,
    LowerTriangular,
    Structure,
    StructuredMatrix,
    TriuToeplitz,
    UpperTriangular,
    make_structure,
)

__all__ = [
    "SINGD",
    "STRUCTURES",
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Hierarchical",
    "LowerTriangular",
    "Structure",
    "StructuredMatrix",
    "TriuToeplitz",
    "UpperTriangular",
    "inverse_free_update",
    "make_structure",
    "multiplicative_update",
    "precondition",
    "riemannian_step",
]


# ------------------------------------------------------------------- inverse-free update
Factors = tuple[StructuredMatrix, StructuredMatrix]
"""A pair :math:`(K, C)` (or their momenta, or curvature terms) of structured matrices."""


def riemannian_step(
    factors: Factors,
    momenta: Factors,
    curvature: Factors,
    damping: float,
    alpha1: float,
    beta1: float,
    *,
    normalise: bool = False,
) -> tuple[Factors, Factors]:
    r"""The multiplicative update of :math:`(K, C)` from the projected curvature terms.

    .. math::

        m_K \leftarrow \alpha_1 m_K + \tfrac{1}{2b}\big(\hat\Pi_K(T_K) + \lambda\,
        \mathrm{tr}(C^\top C)\,\hat\Pi_K(K^\top K) - b I_a\big), \quad
        K \leftarrow K (I_a - \beta_1 m_K)

    and likewise for :math:`C` (with :math:`a` and :math:`b` swapped), all in the factors'
    structures (:mod:`curvlab.optim.structures`: the product stays in the structure, a group).
    SINGD's terms are :math:`T_K = \mathrm{tr}(H_C) H_K`, :math:`T_C = \mathrm{tr}(H_K) H_C`
    (:func:`inverse_free_update`); IF-Shampoo's come from the gradient matrix
    (:class:`curvlab.optim.IFShampoo`).

    Args:
        factors: :math:`K` ``[G, a, a]``, :math:`C` ``[G, b, b]``, structured.
        momenta: :math:`m_K`, :math:`m_C`, in the factors' structures.
        curvature: :math:`\hat\Pi_K(T_K)`, :math:`\hat\Pi_C(T_C)`, in the factors' structures.
        damping: :math:`\lambda \ge 0`.
        alpha1: Riemannian momentum :math:`\alpha_1 \in [0, 1)`.
        beta1: Factor learning rate :math:`\beta_1 > 0`.
        normalise: Divide :math:`\beta_1` by :math:`\max(1, \|m_K\|_F)` (and likewise for
            :math:`C`), as :func:`multiplicative_update` does with it (IF-Shampoo).

    Returns:
        ``(K, C), (m_K, m_C)``, new structured matrices of the factors' dtype.
    """
    k, c = factors
    t_k, t_c = curvature
    ktk, ktk_trace = k.gram()
    ctc, ctc_trace = c.gram()
    damped = (t_k + ktk.scale(damping * ctc_trace), t_c + ctc.scale(damping * ktk_trace))
    return multiplicative_update(factors, momenta, damped, alpha1, beta1, normalise=normalise)


def multiplicative_update(
    factors: Factors,
    momenta: Factors,
    damped: Factors,
    alpha1: float,
    beta1: float,
    *,
    normalise: bool = False,
) -> tuple[Factors, Factors]:
    r"""The step shared by SINGD and IF-Shampoo from the damped, projected curvature terms.

    .. math::

        m_K \leftarrow \alpha_1 m_K + \tfrac{1}{2b} \big(D_K - b I_a\big), \quad
        K \leftarrow K (I_a - \beta_1 m_K)

    with :math:`D_K = \hat\Pi_K(T_K) + \lambda\,\mathrm{tr}(C^\top C)\,\hat\Pi_K(K^\top K)`, and
    likewise for :math:`C`. With ``normalise`` the factor step is
    :math:`K \leftarrow K (I_a - \beta_1 m_K / \max(1, \|m_K\|_F))`, per group: the first-order
    truncation of :math:`K \exp(-\beta_1 m_K)` is only a descent step while
    :math:`\beta_1 \|m_K\| < 1`; a large curvature term (a large first gradient) would
    otherwise flip the sign of an eigenvalue of :math:`I_a - \beta_1 m_K` and blow
    :math:`K K^\top` up instead of shrinking it (the authors' IF-Shampoo,
    ``sirfshampoo.SIRFShampoo``, clamps the norm so).

    Args:
        factors: :math:`K` ``[G, a, a]``, :math:`C` ``[G, b, b]``, structured.
        momenta: :math:`m_K`, :math:`m_C`, in the factors' structures.
        damped: :math:`D_K`, :math:`D_C`, in the factors' structures.
        alpha1: Riemannian momentum :math:`\alpha_1 \in [0, 1)`.
        beta1: Factor learning rate :math:`\beta_1 > 0`.
        normalise: Divide :math:`\beta_1` by :math:`\max(1, \|m\|_F)` per factor and group.

    Returns:
        ``(K, C), (m_K, m_C)``.
    """
    k, c = factors
    m_k, m_c = momenta
    d_k, d_c = damped
    dim_a, dim_b = k.dim, c.dim
    m_k = m_k.scale(alpha1) + d_k.scale(1 / (2 * dim_b)) - k.eye_like().scale(0.5)
    m_c = m_c.scale(alpha1) + d_c.scale(1 / (2 * dim_a)) - c.eye_like().scale(0.5)
    rate_k = beta1 / m_k.frobenius_sq().sqrt().clamp(min=1.0) if normalise else beta1
    rate_c = beta1 / m_c.frobenius_sq().sqrt().clamp(min=1.0) if normalise else beta1
    k = k - k.product(m_k).scale(rate_k)
    c = c - c.product(m_c).scale(rate_c)
    return (k, c), (m_k, m_c)


def inverse_free_update(
    factors: Factors,
    momenta: Factors,
    statistics: tuple[Tensor, Tensor],
    damping: float,
    alpha1: float,
    beta1: float,
) -> tuple[Factors, Factors]:
    r"""SINGD's update of :math:`(K, C)` from the Kronecker statistics (module docstring).

    :func:`riemannian_step` with :math:`T_K = \mathrm{tr}(H_C) H_K`, :math:`T_C = \mathrm{tr}(H_K)
    H_C`, :math:`H_K = K^\top A K`, :math:`H_C = C^\top B C`, its damping term folded in:
    :math:`D_K = \hat\Pi_K\big(K^\top (\mathrm{tr}(H_C) A + \lambda\,\mathrm{tr}(C^\top C) I)
    K\big)` (:meth:`~curvlab.optim.structures.StructuredMatrix.damped_congruence`: two products
    for the dense-backed structures, only the structure's part of :math:`A` for the others, e.g.
    its diagonal blocks).

    Args:
        factors: :math:`K` ``[G, a, a]``, :math:`C` ``[G, b, b]``, structured.
        momenta: :math:`m_K`, :math:`m_C`, in the factors' structures.
        statistics: :math:`A` ``[G, a, a]`` (input side), :math:`B` ``[G, b, b]`` (output side).
        damping: :math:`\lambda \ge 0`.
        alpha1: Riemannian momentum :math:`\alpha_1 \in [0, 1)`.
        beta1: Factor learning rate :math:`\beta_1 > 0`.

    Returns:
        ``(K, C), (m_K, m_C)``, new structured matrices of the factors' dtype.
    """
    k, c = factors
    a_stat, b_stat = (s.to(k.dtype) for s in statistics)
    parts_k, trace_k = k.congruence_parts(a_stat)
    parts_c, trace_c = c.congruence_parts(b_stat)
    damped = (
        k.damped_congruence(parts_k, trace_c, damping * c.frobenius_sq()),
        c.damped_congruence(parts_c, trace_k, damping * k.frobenius_sq()),
    )
    return multiplicative_update(factors, momenta, damped, alpha1, beta1)


def precondition(k: StructuredMatrix, c: StructuredMatrix, matrix: Tensor) -> Tensor:
    r""":math:`C C^\top M K K^\top` for the gradient matrices ``matrix`` ``[G, b, a]``.

    Computed by the structured products :math:`C\,(C^\top ((M K) K^\top))`.
    """
    m = matrix.to(k.dtype)
    out = c.matmul(c.tmatmul(k.rtmatmul(k.rmatmul(m))))
    return out.to(matrix.dtype)


FACTOR_KEYS = ("K", "C", "m_K", "m_C")
"""The state entries that hold structured matrices (as tuples of their parameters)."""


def check_structured_state(state_dict: dict[str, Any], who: str) -> None:
    """Raise a clear error for a state dict whose factors are dense tensors (before structured storage).

    Raises:
        ValueError: A factor stored as one tensor instead of its structure's parameters.
    """
    for index, state in state_dict.get("state", {}).items():
        for key in FACTOR_KEYS:
            if isinstance(state.get(key), Tensor):
                raise ValueError(
                    f"{who}.load_state_dict: state {index!r} holds {key!r} as one dense tensor "
                    "(a state dict from before the structured storage); the factors are now "
                    "tuples of their structure's parameters, so it cannot be resumed"
                )


# ------------------------------------------------------------------------------ optimizer
def _check(condition: bool, name: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"SINGD: {name} must be {requirement}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SINGD(_LayerwiseOptimizer):
    r"""Structured inverse-free natural-gradient descent (Lin et al. 2024).

    ``step(closure)`` takes the standard closure and opens :func:`curvlab.backprop.capture`
    around it on the steps that update the preconditioner (every ``update_interval``), so the
    closure's loss **must** be computed with ``loss_func``.

    Defaults are the paper's (Lin et al., ICML 2024, arXiv 2312.05705) as its authors'
    package sets them (``singd.optim.optimizer.SINGD`` 0.0.5, checked against its signature):
    ``lr`` ``1e-3`` (:math:`\beta_2`), ``momentum`` 0.9 (:math:`\alpha_2`), ``damping``
    ``1e-3`` (:math:`\lambda`), ``alpha1`` 0.5 (the factors' Riemannian momentum), ``lr_cov``
    0.01 (:math:`\beta_1`), ``update_interval`` 10 (``T``), ``weight_decay`` 0, dense factors,
    KFAC-expand and the empirical Fisher (the package's backward hooks see the gradients at the
    labels).

    Args:
        model: The network; its Kronecker layers (:data:`curvlab.optim.KRONECKER_MODULES`) get
            the factors :math:`K, C`, every other parameter the fallback.
        lr: :math:`\beta_2`, the parameters' learning rate (per param group).
        loss_func: The loss module the closure uses. Required.
        params: Parameters or param groups (``"lr"``, ``"momentum"``, ``"weight_decay"`` per
            group), all of ``model``'s; default: every trainable parameter of ``model``.
        momentum: :math:`\alpha_2 \in [0, 1)`, the parameters' momentum.
        weight_decay: :math:`\gamma \ge 0`, added to the momentum (not preconditioned).
        damping: :math:`\lambda \ge 0`.
        alpha1: :math:`\alpha_1 \in [0, 1)`, the factors' Riemannian momentum.
        lr_cov: :math:`\beta_1 > 0`, the factors' learning rate.
        update_interval: Steps between preconditioner updates (engine calls), ``T``.
        structure: A name of :data:`STRUCTURES` (or a :class:`Structure`) for both factors, or
            a pair ``(structure of K, structure of C)``.
        block_size: Block size of ``"block_diagonal"``.
        hierarchical_sizes: ``(k1, k2)`` of ``"hierarchical"``.
        fisher_type: ``"empirical"`` (default, the gradients at the labels, as the SINGD
            paper), ``"mc"`` or ``"type-2"`` (:func:`curvlab.optim.parts.kronecker_quantity`).
        mc_samples: Sampled labels per input for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weights shared over positions.
        separate_weight_and_bias: ``False`` (default): one joint block per layer.
        fallback: ``"adam"`` (default), ``"sgd"`` or a factory of param groups (as KFAC).
        fallback_lr: A fixed learning rate for the built-in fallback (default: the group's).
        seed: Seed of the MC generator (``"mc"`` only matters); saved in ``state_dict``.

    Hooks: ``register_statistics_hook(hook)`` (:mod:`curvlab.optim.hooks`) sees the engine's
    fresh blocks ``{name: KronFactors}`` before they update :math:`K` and :math:`C`
    (``hook(optimizer, blocks)`` returns replacements or ``None``); data parallelism
    all-reduces them there.

    Raises:
        ValueError: A bad hyperparameter or structure (the message names it), or parameters
            not in ``model``.
        UnsupportedLossError: ``loss_func`` is not a loss the engine supports.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.001,
        *,
        loss_func: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 0.001,
        alpha1: float = 0.5,
        lr_cov: float = 0.01,
        update_interval: int = 10,
        structure: str | Structure | tuple[str | Structure, str | Structure] = "dense",
        block_size: int = 30,
        hierarchical_sizes: tuple[int, int] = (15, 15),
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = False,
        fallback: str | FallbackFactory = "adam",
        fallback_lr: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SINGD: model must be a torch.nn.Module, got {type(model).__name__}")
        LossSpec(loss_func)
        _check(_number(lr) and lr >= 0, "lr", lr, "a number >= 0")
        self._check_group_values(momentum, weight_decay)
        _check(_number(damping) and damping >= 0, "damping", damping, ">= 0")
        _check(_number(alpha1) and 0 <= alpha1 < 1, "alpha1", alpha1, "in [0, 1)")
        _check(_number(lr_cov) and lr_cov > 0, "lr_cov", lr_cov, "> 0")
        _check(
            _is_int(update_interval) and update_interval >= 1,
            "update_interval",
            update_interval,
            "a positive int",
        )
        _check(
            isinstance(separate_weight_and_bias, bool),
            "separate_weight_and_bias",
            separate_weight_and_bias,
            "a bool",
        )
        _check(
            callable(fallback) or fallback in FALLBACKS,
            "fallback",
            fallback,
            f"one of {FALLBACKS} or a factory of param groups",
        )
        _check(fallback_lr is None or fallback_lr >= 0, "fallback_lr", fallback_lr, "None or >= 0")
        pair = structure if isinstance(structure, tuple) else (structure, structure)
        _check(len(pair) == 2, "structure", structure, "a name or a pair (K's, C's)")
        self.structures = tuple(make_structure(s, block_size, hierarchical_sizes) for s in pair)
        self.quantity = parts.kronecker_quantity(
            fisher_type, mc_samples, kfac_approx, separate_weight_and_bias
        )
        self.model, self.loss_func = model, loss_func
        self.damping, self.alpha1, self.lr_cov = float(damping), float(alpha1), float(lr_cov)
        self.update_interval = update_interval
        self.fallback_lr = fallback_lr
        self._fallback_kind = fallback if isinstance(fallback, str) else "factory"

        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._setup_layers(model, params, defaults, separate_weight_and_bias, fallback, seed)

    @staticmethod
    def _check_group_values(momentum: Any, weight_decay: Any) -> None:
        _check(_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "in [0, 1)")
        _check(_number(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay, ">= 0")

    # -------------------------------------------------------------------------- factors
    def _all_units(self) -> list[_Unit]:
        return [u for units in self._units for u in units]

    def preconditioner(self) -> dict[str, tuple[StructuredMatrix, StructuredMatrix]]:
        r"""The factors :math:`(K, C)` by parameter name (a joint block under both names).

        Returns:
            ``{name: (K, C)}``, :class:`~curvlab.optim.structures.StructuredMatrix` objects
            (``.shape`` ``[G, a, a]`` and ``[G, b, b]``, ``.to_dense()``); empty before the
            first step.
        """
        out = {}
        for unit in self._all_units():
            if "K" in self.state[unit.params[0]]:
                out.update(dict.fromkeys(unit.names, self._factors(unit, "K", "C")))
        return out

    def _factors(self, unit: _Unit, key_k: str, key_c: str) -> Factors:
        """The structured matrices stored (as their parameters) under ``key_k``, ``key_c``."""
        state = self.state[unit.params[0]]
        pi_k, pi_c = self.structures
        return pi_k.wrap(tuple(state[key_k])), pi_c.wrap(tuple(state[key_c]))

    def _store(self, unit: _Unit, **matrices: StructuredMatrix) -> None:
        """Keep the matrices' parameters (tuples of tensors) in the unit's state."""
        self.state[unit.params[0]].update({k: m.tensors for k, m in matrices.items()})

    def _init_factors(self, unit: _Unit) -> None:
        if "K" in self.state[unit.params[0]]:
            return
        p = unit.params[0]
        groups, b, a = unit.layout.to_matrix([q.detach() for q in unit.params], 0).shape
        k, c = (s.eye(groups, d, p.dtype, p.device) for s, d in zip(self.structures, (a, b)))
        self._store(unit, K=k, C=c, m_K=k.zeros_like(), m_C=c.zeros_like())

    def _update_factors(self, results: dict[str, Any]) -> None:
        results = self._hooked_statistics(results)
        for unit in self._all_units():
            new = results[unit.names[0]]
            if not isinstance(new, KronFactors) or new.layout != unit.layout:
                raise RuntimeError(
                    f"SINGD: the engine's block of {unit.names[0]} ({new!r}) does not have the "
                    f"expected layout {unit.layout}"
                )
            (k, c), (m_k, m_c) = inverse_free_update(
                self._factors(unit, "K", "C"),
                self._factors(unit, "m_K", "m_C"),
                (new.input_factor.detach(), new.output_factor.detach()),
                self.damping,
                self.alpha1,
                self.lr_cov,
            )
            self._store(unit, K=k, C=c, m_K=m_k, m_C=m_c)

    # ----------------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One SINGD step (and the fallback's) from the standard closure.

        Args:
            closure: ``zero_grad``, forward, ``loss_func``, ``backward``, return the loss.

        Returns:
            The closure's loss (before the step).
        """
        if closure is None or not callable(closure):
            raise TypeError(
                "SINGD.step needs the closure (zero_grad, forward, loss_func, backward, return "
                "loss): the engine computes the statistics during its backward"
            )
        for unit in self._all_units():
            self._init_factors(unit)
        if self._steps % self.update_interval == 0:
            with capture(
                self.model, self.loss_func, [self.quantity], generator=self._generator
            ) as captured:
                with torch.enable_grad():
                    loss = closure()
            with torch.no_grad():
                self._update_factors(captured.results[self.quantity.name])
        else:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._parameter_update()
            self._fallback_step()
        self._steps += 1
        return loss

    def _parameter_update(self) -> None:
        for group, units in zip(self.param_groups, self._units, strict=True):
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for unit in units:
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in unit.params]
                matrix = unit.layout.to_matrix(grads, 0)
                k, c = self._factors(unit, "K", "C")
                directions = unit.layout.from_matrix(precondition(k, c, matrix), 0)
                for p, d in zip(unit.params, directions, strict=True):
                    d = parts.with_weight_decay(d, p, decay)
                    buffer = parts.momentum_direction(
                        self.state[p].get("momentum_buffer"), d, momentum
                    )
                    if momentum != 0:
                        self.state[p]["momentum_buffer"] = buffer
                    p.add_(buffer, alpha=-lr)

    # ------------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict plus ``"singd"``: steps, MC generator, fallback state."""
        state = super().state_dict()
        state["singd"] = {
            "steps": self._steps,
            "generator": self._generator.get_state(),
            "fallback": None if self._fallback is None else self._fallback.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (resumes bit for bit)."""
        state_dict = dict(state_dict)
        if "singd" not in state_dict:
            raise ValueError("SINGD.load_state_dict: not a SINGD state dict (no 'singd' entry)")
        extra = state_dict.pop("singd")
        check_structured_state(state_dict, "SINGD")
        super().load_state_dict(state_dict)
        self._steps = int(extra["steps"])
        self._generator.set_state(extra["generator"].cpu())
        if (extra["fallback"] is None) != (self._fallback is None):
            raise ValueError("SINGD.load_state_dict: the fallback parameters do not match")
        if self._fallback is not None:
            self._fallback.load_state_dict(extra["fallback"])

    @property
    def steps(self) -> int:
        """Steps taken so far."""
        return self._steps
