r"""Inverses of damped operators, :math:`(A + \delta I)^{-1}`, as operators.

* :class:`CGInverse`: (preconditioned) conjugate gradients, all ``K`` right-hand sides at once
  (each column its own step sizes; one batched product of :math:`A` per iteration). For
  symmetric positive (semi-)definite :math:`A` with :math:`\delta > 0` where :math:`A` is singular.
* :class:`NeumannInverse`: the truncated Neumann series
  :math:`\alpha \sum_{i=0}^{n} (I - \alpha (A + \delta I))^i`, which converges for
  :math:`0 < \alpha < 2 / \lambda_{\max}(A + \delta I)`; without ``scale``,
  :math:`\alpha = 1 / \hat\lambda_{\max}` from a few power iterations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.linops.base import CurvatureOperator

Preconditioner = CurvatureOperator | Callable[[Tensor], Tensor]
r"""An approximation of :math:`(A + \delta I)^{-1}`: an operator, or a function ``[P, K] -> [P, K]``."""


@dataclass
class CGInfo:
    r"""What the last CG solve did.

    Attributes:
        iterations: Iterations run (products with the operator).
        residual_norms: :math:`\lVert b - (A + \delta I) x\rVert` per column, ``[K]``.
        converged: Whether every column reached the tolerance.
    """

    iterations: int
    residual_norms: Tensor
    converged: bool


class CGInverse(CurvatureOperator):
    r"""The operator :math:`(A + \delta I)^{-1}` applied by conjugate gradients.

    Column ``k`` stops when :math:`\lVert r_k\rVert \le \max(\text{tol}\,\lVert b_k\rVert,
    \text{atol})`. :attr:`info` describes the last solve; a solve that does not converge
    within ``maxiter`` warns.

    Args:
        operator: A symmetric positive (semi-)definite :math:`A` ``[P, P]``.
        damping: :math:`\delta \ge 0`.
        tol: Relative tolerance on the residual norm.
        atol: Absolute tolerance on the residual norm.
        maxiter: Iteration limit (default ``10 P``).
        preconditioner: An approximation :math:`M \approx (A + \delta I)^{-1}`, symmetric
            positive definite (e.g. :meth:`KFACOperator.inverse <curvlab.linops.KFACOperator.inverse>`).
    """

    self_adjoint = True

    def __init__(
        self,
        operator: CurvatureOperator,
        damping: float = 0.0,
        tol: float = 1e-6,
        atol: float = 0.0,
        maxiter: int | None = None,
        preconditioner: Preconditioner | None = None,
    ) -> None:
        if operator.shape[0] != operator.shape[1]:
            raise ValueError(f"CG needs a square operator, got {operator!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        super().__init__(
            operator.in_shapes,
            operator.out_shapes,
            operator.dtype,
            operator.device,
            operator.in_names,
            operator.out_names,
        )
        self.operator, self.damping = operator, damping
        self.tol, self.atol = tol, atol
        self.maxiter = maxiter if maxiter is not None else 10 * operator.shape[0]
        self.preconditioner = preconditioner
        self.info: CGInfo | None = None

    def _precondition(self, residual: Tensor) -> Tensor:
        if self.preconditioner is None:
            return residual
        if isinstance(self.preconditioner, CurvatureOperator):
            return self.preconditioner._matmat(residual)
        return self.preconditioner(residual)

    def _apply(self, x: Tensor) -> Tensor:
        out = self.operator._matmat(x)
        return out + self.damping * x if self.damping else out

    def _matmat(self, matrix: Tensor) -> Tensor:
        b = matrix
        x = torch.zeros_like(b)
        residual = b.clone()
        bound = torch.clamp(self.tol * b.norm(dim=0), min=self.atol)
        done = residual.norm(dim=0) <= bound
        z = self._precondition(residual)
        direction = z.clone()
        rz = (residual * z).sum(0)
        iterations = 0
        while not bool(done.all()) and iterations < self.maxiter:
            iterations += 1
            product = self._apply(direction)
            curvature = (direction * product).sum(0)
            safe = torch.where(done | (curvature == 0), torch.ones_like(curvature), curvature)
            alpha = torch.where(done, torch.zeros_like(rz), rz / safe)
            x = x + alpha * direction
            residual = residual - alpha * product
            done = done | (residual.norm(dim=0) <= bound)
            z = self._precondition(residual)
            rz_new = (residual * z).sum(0)
            beta = torch.where(done, torch.zeros_like(rz), rz_new / torch.where(rz == 0, 1.0, rz))
            direction = z + beta * direction
            rz = rz_new
        norms = residual.norm(dim=0)  # the recursive residual (no extra product)
        converged = bool(done.all())
        self.info = CGInfo(iterations, norms, converged)
        if not converged:
            warnings.warn(
                f"CG did not converge in {self.maxiter} iterations (largest residual "
                f"{float(norms.max()):.3g}); raise maxiter or damping",
                stacklevel=3,
            )
        return x


def power_iteration(operator: CurvatureOperator, iterations: int = 30, seed: int = 0) -> float:
    r"""An estimate of the largest eigenvalue magnitude of a symmetric operator.

    Args:
        operator: A symmetric :math:`A` ``[P, P]``.
        iterations: Power iterations.
        seed: Seed of the start vector.

    Returns:
        The Rayleigh quotient :math:`v^\top A v` of the last iterate (a lower bound for PSD
        :math:`A`).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(operator.shape[1], 1, generator=generator, dtype=operator.dtype)
    v = (v / v.norm()).to(operator.device)
    value = 0.0
    for _ in range(iterations):
        w = operator._matmat(v)
        value = float((v * w).sum())
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return abs(value)


class NeumannInverse(CurvatureOperator):
    r"""The truncated Neumann series :math:`\alpha \sum_{i=0}^{n} (I - \alpha (A + \delta I))^i`.

    Applied by the recursion :math:`x_{i+1} = b + (I - \alpha (A + \delta I))\, x_i`,
    :math:`x_0 = b`, result :math:`\alpha x_n`: ``num_terms`` products with :math:`A`. The error
    shrinks like :math:`(1 - \alpha \lambda_{\min})^{n+1}`.

    Args:
        operator: A symmetric positive semi-definite :math:`A` ``[P, P]``.
        damping: :math:`\delta \ge 0`.
        num_terms: :math:`n`.
        scale: :math:`\alpha`; default :math:`1 / \hat\lambda_{\max}(A + \delta I)` from
            :func:`power_iteration` (estimated once, at construction).
    """

    self_adjoint = True

    def __init__(
        self,
        operator: CurvatureOperator,
        damping: float = 0.0,
        num_terms: int = 100,
        scale: float | None = None,
    ) -> None:
        if operator.shape[0] != operator.shape[1]:
            raise ValueError(f"the Neumann series needs a square operator, got {operator!r}")
        super().__init__(
            operator.in_shapes,
            operator.out_shapes,
            operator.dtype,
            operator.device,
            operator.in_names,
            operator.out_names,
        )
        self.operator, self.damping, self.num_terms = operator, damping, num_terms
        if scale is None:
            top = power_iteration(operator) + damping
            if top <= 0:
                raise ValueError("the operator looks zero: pass scale")
            scale = 1.0 / top
        self.scale = scale

    def _matmat(self, matrix: Tensor) -> Tensor:
        x = matrix
        for _ in range(self.num_terms):
            x = matrix + x - self.scale * (self.operator._matmat(x) + self.damping * x)
        return self.scale * x
