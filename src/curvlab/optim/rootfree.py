r"""Root-free adaptive methods (Lin et al., ICML 2024, arXiv 2402.03496).

"Can we remove the square-root in adaptive gradient methods?": the diagonal preconditioner of
RMSProp/Adam is applied *without* its square root, read as a second-order method whose
curvature is the mini-batch gradient outer product :math:`B\,g g^\top` (``B`` the batch size,
which keeps the hyperparameters independent of it). :class:`RootFreeAdam` is the diagonal
method (the paper's root-free RMSProp with momentum):

.. math::

    s \leftarrow \beta_2 s + (1 - \beta_2)\, B\, g \odot g, \qquad
    m \leftarrow \beta_1 m + \frac{g}{s + \lambda} + \gamma\theta, \qquad
    \theta \leftarrow \theta - \alpha m,

with :math:`s` initialised to one (not zero: there is no bias correction and no division by a
vanishing root), :math:`\lambda` the damping, :math:`\gamma` the weight decay and
:math:`\alpha` the learning rate. No root and no inverse of a matrix is taken, so it runs in
bfloat16.

:class:`IFShampoo` is inverse-free Shampoo: every parameter, viewed as a matrix :math:`W`
``[b, a]`` (``shape[0]`` rows; a vector is one column), keeps the factors :math:`K` ``[a, a]``,
:math:`C` ``[b, b]`` of the inverse of a Kronecker approximation of :math:`B\,\mathrm{vec}(G)
\mathrm{vec}(G)^\top`, updated without roots or inverses by SINGD's multiplicative step
(:func:`curvlab.optim.singd.riemannian_step`) with the curvature terms of the gradient matrix
:math:`G`:

.. math::

    Z = C^\top G K, \qquad T_K = B\, Z^\top Z, \qquad T_C = B\, Z Z^\top,

whose fixed point is :math:`b\,(K K^\top)^{-1} = B\, G^\top C C^\top G + \dots` (Shampoo's
:math:`G^\top G` and :math:`G G^\top` statistics, each weighted by the other factor, as the
KL fixed point of a Kronecker-factored :math:`B\, g g^\top`). The factors' step is
:math:`K \leftarrow K (I - \beta_1 m_K / \max(1, \|m_K\|_F))` (likewise :math:`C`): the
rate is divided by the momentum's Frobenius norm once that exceeds one, as both of the authors'
implementations do (``sirfshampoo.SIRFShampoo``; ``myoptim/ifshampoo.py`` of GitHub
``yorkerlin/remove-the-square-root``, the paper's experiments), so a large gradient (the RevMLP's first batches, loss about
10) cannot flip an eigenvalue of :math:`I - \beta_1 m_K` and blow :math:`K K^\top` up. The
parameters move by
:math:`m \leftarrow \alpha_2 m + C C^\top G K K^\top + \gamma\theta`,
:math:`\theta \leftarrow \theta - \alpha m`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from curvlab.optim.singd import Factors, check_structured_state, precondition, riemannian_step
from curvlab.optim.structures import Structure, StructuredMatrix, make_structure


def _check(condition: bool, who: str, name: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"{who}: {name} must be {requirement}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rootfree_direction(
    grad: Tensor, second_moment: Tensor, beta2: float, batch_size: int, damping: float
) -> Tensor:
    r"""Update :math:`s` in place and return the root-free direction :math:`g / (s + \lambda)`.

    Args:
        grad: :math:`g`, shaped like the parameter.
        second_moment: :math:`s`, same shape, updated in place to
            :math:`\beta_2 s + (1 - \beta_2) B g \odot g`.
        beta2: :math:`\beta_2 \in [0, 1)`.
        batch_size: :math:`B`.
        damping: :math:`\lambda`.

    Returns:
        :math:`g / (s + \lambda)`, shaped like ``grad``.
    """
    second_moment.mul_(beta2).addcmul_(grad, grad, value=(1 - beta2) * batch_size)
    return grad / (second_moment + damping)


class RootFreeAdam(torch.optim.Optimizer):
    r"""The square-root-free diagonal adaptive method (module docstring's equations).

    Args:
        params: Parameters or param groups (``lr``, ``betas``, ``damping``, ``weight_decay``,
            ``batch_size`` per group).
        lr: :math:`\alpha` (default ``1e-3``: the learning rate default of the authors'
            implementation of the paper's methods, ``sirfshampoo.SIRFShampoo``).
        betas: :math:`(\beta_1, \beta_2)`: the momentum and the decay of :math:`s` (default
            ``(0.9, 0.99)``: the momentum :math:`\alpha_1 = 0.9` of ``SIRFShampoo``, and
            :math:`\beta_2 = 0.99` of the authors' root-free RMSProp, ``myoptim/rfrmsprop.py`` of
            GitHub ``yorkerlin/remove-the-square-root``, whose ``alpha`` it is).
        damping: :math:`\lambda > 0` (default ``1e-8``: ``rfrmsprop.py``'s ``eps``; the paper
            searches :math:`0 < \lambda < 5\cdot 10^{-4}` only).
        weight_decay: :math:`\gamma \ge 0` (added to the momentum, not preconditioned, as in
            ``rfrmsprop.py``; default 0).
        batch_size: :math:`B`, the batch size the (mean) loss averages over; it scales the
            gradient outer product to the curvature of the per-sample loss (the paper's
            ``batch_averaged`` scaling; :math:`s` starts at one, ``rfrmsprop.py``'s
            :math:`1/B` in its unscaled units).

    Raises:
        ValueError: A bad hyperparameter (the message names it).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.99),
        damping: float = 1e-8,
        weight_decay: float = 0.0,
        batch_size: int = 128,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "damping": damping,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
        }
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        who = "RootFreeAdam"
        lr, betas = group["lr"], group["betas"]
        _check(_number(lr) and lr >= 0, who, "lr", lr, "a number >= 0")
        _check(
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(_number(b) and 0 <= b < 1 for b in betas),
            who,
            "betas",
            betas,
            "a pair in [0, 1)",
        )
        damping, decay, size = group["damping"], group["weight_decay"], group["batch_size"]
        _check(_number(damping) and damping > 0, who, "damping", damping, "> 0")
        _check(_number(decay) and decay >= 0, who, "weight_decay", decay, ">= 0")
        _check(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1,
            who,
            "batch_size",
            size,
            "a positive int",
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; ``closure`` (optional) re-evaluates the loss with gradients.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["second_moment"] = torch.ones_like(p)
                    state["momentum_buffer"] = torch.zeros_like(p)
                direction = rootfree_direction(
                    p.grad, state["second_moment"], beta2, group["batch_size"], group["damping"]
                )
                buffer = state["momentum_buffer"].mul_(beta1).add_(direction)
                if group["weight_decay"] != 0:
                    buffer.add_(p, alpha=group["weight_decay"])
                p.add_(buffer, alpha=-group["lr"])
        return loss


def _as_matrix(tensor: Tensor) -> Tensor:
    """A parameter or gradient as ``[1, b, a]`` (``shape[0]`` rows; a vector is one column)."""
    if tensor.ndim == 0:
        return tensor.reshape(1, 1, 1)
    if tensor.ndim == 1:
        return tensor.reshape(1, -1, 1)
    return tensor.reshape(1, tensor.shape[0], -1)


def shampoo_curvature(
    k: StructuredMatrix, c: StructuredMatrix, grad_matrix: Tensor, batch_size: int
) -> Factors:
    r"""IF-Shampoo's projected curvature terms :math:`\hat\Pi_K(B Z^\top Z)`, :math:`\hat\Pi_C(B Z Z^\top)`.

    With :math:`Z = C^\top G K`, by the factors' structured products; :math:`\hat\Pi` is
    SINGD's map of a symmetric matrix onto the structure
    (:meth:`~curvlab.optim.structures.StructuredMatrix.from_symmetric`).

    Args:
        k: :math:`K` ``[1, a, a]``, structured.
        c: :math:`C` ``[1, b, b]``, structured.
        grad_matrix: :math:`G` ``[1, b, a]``.
        batch_size: :math:`B`.

    Returns:
        ``[1, a, a]`` and ``[1, b, b]`` in the structures of ``k`` and ``c``.
    """
    z = c.tmatmul(k.rmatmul(grad_matrix.to(k.dtype)))
    return k.from_symmetric(batch_size * (z.mT @ z)), c.from_symmetric(batch_size * (z @ z.mT))


class IFShampoo(torch.optim.Optimizer):
    r"""Inverse-free Shampoo (module docstring's equations), for any parameters.

    Defaults are those of the authors' implementation of the paper's IF-Shampoo
    (``sirfshampoo.SIRFShampoo``, GitHub ``f-dangel/sirfshampoo``, in its notation): ``lr``
    ``1e-3`` (its ``lr``), ``momentum`` 0.9 (its ``alpha1``), ``alpha1`` 0.5 (its Riemannian
    momentum ``alpha2``), ``lr_cov`` 0.01 (its ``beta2``), ``damping`` ``1e-3`` (its ``lam``),
    ``weight_decay`` 0 (its ``kappa``) and ``update_interval`` 1 (its ``T``; the paper's
    experiments update every second step). ``batch_size`` is detected from the inputs there;
    here it is given.

    Args:
        params: Parameters or param groups (``lr``, ``momentum``, ``weight_decay`` per group).
        lr: :math:`\alpha`.
        momentum: :math:`\alpha_2 \in [0, 1)`.
        weight_decay: :math:`\gamma \ge 0` (added to the momentum, not preconditioned).
        damping: :math:`\lambda \ge 0`.
        alpha1: :math:`\alpha_1 \in [0, 1)`, the factors' Riemannian momentum.
        lr_cov: :math:`\beta_1 > 0`, the factors' learning rate.
        update_interval: Steps between factor updates.
        batch_size: :math:`B`, the batch size the (mean) loss averages over.
        structure: A structure name of :data:`curvlab.optim.STRUCTURES` (or object) for both
            factors, or a pair ``(K's, C's)``.

    Raises:
        ValueError: A bad hyperparameter (the message names it).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        lr_cov: float = 0.01,
        update_interval: int = 1,
        batch_size: int = 128,
        structure: str | Structure | tuple[str | Structure, str | Structure] = "dense",
    ) -> None:
        who = "IFShampoo"
        _check(_number(lr) and lr >= 0, who, "lr", lr, "a number >= 0")
        _check(_number(momentum) and 0 <= momentum < 1, who, "momentum", momentum, "in [0, 1)")
        _check(
            _number(weight_decay) and weight_decay >= 0, who, "weight_decay", weight_decay, ">= 0"
        )
        _check(_number(damping) and damping >= 0, who, "damping", damping, ">= 0")
        _check(_number(alpha1) and 0 <= alpha1 < 1, who, "alpha1", alpha1, "in [0, 1)")
        _check(_number(lr_cov) and lr_cov > 0, who, "lr_cov", lr_cov, "> 0")
        for name, value in (("update_interval", update_interval), ("batch_size", batch_size)):
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                who,
                name,
                value,
                "a positive int",
            )
        pair = structure if isinstance(structure, tuple) else (structure, structure)
        _check(len(pair) == 2, who, "structure", structure, "a name or a pair (K's, C's)")
        self.structures = tuple(make_structure(s) for s in pair)
        self.damping, self.alpha1, self.lr_cov = float(damping), float(alpha1), float(lr_cov)
        self.update_interval, self.batch_size = update_interval, batch_size
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check(0 <= group["momentum"] < 1, who, "momentum", group["momentum"], "in [0, 1)")
            _check(group["weight_decay"] >= 0, who, "weight_decay", group["weight_decay"], ">= 0")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (resumes bit for bit)."""
        check_structured_state(state_dict, "IFShampoo")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; ``closure`` (optional) re-evaluates the loss with gradients.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                g = _as_matrix(p.grad)
                pi_k, pi_c = self.structures
                if not state:
                    b, a = g.shape[-2:]
                    state["step"] = 0
                    k, c = pi_k.eye(1, a, p.dtype, p.device), pi_c.eye(1, b, p.dtype, p.device)
                    state["K"], state["C"] = k.tensors, c.tensors
                    state["m_K"], state["m_C"] = k.zeros_like().tensors, c.zeros_like().tensors
                    state["momentum_buffer"] = torch.zeros_like(p)
                factors = pi_k.wrap(tuple(state["K"])), pi_c.wrap(tuple(state["C"]))
                if state["step"] % self.update_interval == 0:
                    momenta = pi_k.wrap(tuple(state["m_K"])), pi_c.wrap(tuple(state["m_C"]))
                    curvature = shampoo_curvature(*factors, g, self.batch_size)
                    factors, momenta = riemannian_step(
                        factors,
                        momenta,
                        curvature,
                        self.damping,
                        self.alpha1,
                        self.lr_cov,
                        normalise=True,
                    )
                    state["K"], state["C"] = (f.tensors for f in factors)
                    state["m_K"], state["m_C"] = (m.tensors for m in momenta)
                state["step"] += 1
                direction = precondition(*factors, g).reshape(p.shape)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(direction)
                if group["weight_decay"] != 0:
                    buffer.add_(p, alpha=group["weight_decay"])
                p.add_(buffer, alpha=-group["lr"])
        return loss
