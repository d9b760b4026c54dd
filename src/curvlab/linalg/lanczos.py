r"""The Lanczos process with full reorthogonalisation, and the extreme eigenpairs it finds.

Lanczos builds an orthonormal basis :math:`V_j` ``[P, j]`` of the Krylov space
:math:`\operatorname{span}\{v, A v, \dots, A^{j-1} v\}` of a symmetric :math:`A` in which
:math:`V_j^\top A V_j = T_j` is tridiagonal. The eigenvalues of :math:`T_j` (Ritz values)
converge to the extreme eigenvalues of :math:`A` first. Each new vector is orthogonalised
against the whole basis (twice, classical Gram-Schmidt), which keeps the basis orthonormal in
floating point and so avoids spurious copies of converged eigenvalues.

:class:`LanczosProcess` runs :math:`b` independent processes at once, so each step is one call
of ``A @ V`` with ``V`` ``[P, b]`` (stochastic Lanczos quadrature runs one per probe vector).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.operator import (
    apply,
    check_count,
    operator_dtype_device,
    operator_size,
    random_vectors,
)

WHICH = ("largest", "smallest")
"""The ends of the spectrum :func:`lanczos_eigs` finds (algebraically largest or smallest)."""


class LanczosProcess:
    r""":math:`b` Lanczos processes for a symmetric :math:`A` ``[P, P]``, batched over columns.

    After :math:`j` calls of :meth:`step`, :attr:`alphas` ``[b, j]`` and :attr:`betas`
    ``[b, j]`` hold the diagonals and off-diagonals of :math:`T_j` (``betas[:, -1]`` is the
    norm of the residual that would start step :math:`j + 1`; it measures convergence). When a
    process breaks down (its Krylov space is invariant: :math:`\beta` at most the square root
    of the machine epsilon times the largest :math:`|\alpha|, \beta` so far), it restarts
    from a random vector orthogonal to its basis and records :math:`\beta = 0`: :math:`T_j`
    becomes block-diagonal and later Ritz values come from the new block.

    Args:
        A: The symmetric square operator ``[P, P]``.
        start: The start vectors ``[P, b]`` (normalized here).
        reorthogonalize: Orthogonalise each new vector against the stored basis (the basis
            ``[j, P, b]`` is then kept). Without it only three vectors are stored, and a
            breakdown continues with zero vectors.
        generator: The random number generator for restarts.
    """

    def __init__(
        self,
        A: Any,
        start: Tensor,
        *,
        reorthogonalize: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.A = A
        self.size = operator_size(A)
        if start.dim() != 2 or start.shape[0] != self.size:
            raise ValueError(f"start vectors must be [P={self.size}, b], got {tuple(start.shape)}")
        norms = torch.linalg.vector_norm(start, dim=0, keepdim=True)
        if (norms == 0).any():
            raise ValueError("Lanczos start vectors must be non-zero")
        self.reorthogonalize = reorthogonalize
        self.generator = generator
        self.current = start / norms  # [P, b]
        self.previous = torch.zeros_like(self.current)
        self.basis: Tensor | None = None  # [capacity, P, b]
        self.steps = 0
        self._alphas: list[Tensor] = []
        self._betas: list[Tensor] = []
        self._scale = torch.zeros(start.shape[1], dtype=start.dtype, device=start.device)
        self._breakdown_factor = torch.finfo(start.dtype).eps ** 0.5

    @property
    def alphas(self) -> Tensor:
        """The diagonals of :math:`T_j`, ``[b, j]``."""
        return torch.stack(self._alphas, dim=1)

    @property
    def betas(self) -> Tensor:
        """The off-diagonals of :math:`T_j` and the last residual norm, ``[b, j]``."""
        return torch.stack(self._betas, dim=1)

    def tridiagonal(self) -> Tensor:
        """:math:`T_j` ``[b, j, j]``."""
        off = self.betas[:, :-1]
        return (
            torch.diag_embed(self.alphas)
            + torch.diag_embed(off, offset=1)
            + torch.diag_embed(off, offset=-1)
        )

    def basis_matrix(self) -> Tensor:
        r"""The basis :math:`V_j` ``[b, P, j]`` (only with ``reorthogonalize``)."""
        if self.basis is None:
            raise RuntimeError("the Lanczos basis is kept only with reorthogonalize=True")
        return self.basis[: self.steps].permute(2, 1, 0)

    def step(self) -> None:
        """One Lanczos step for every column: one call of ``A @ V`` with ``V`` ``[P, b]``."""
        j = self.steps
        v = self.current
        if self.reorthogonalize:
            self._store(v)
        w = apply(self.A, v)
        alpha = (v * w).sum(0)
        w = w - alpha * v
        if j > 0:
            w = w - self._betas[-1] * self.previous
        if self.reorthogonalize:
            w = self._orthogonalize(w, j + 1)
            w = self._orthogonalize(w, j + 1)
        beta = torch.linalg.vector_norm(w, dim=0)
        self._scale = torch.maximum(self._scale, torch.maximum(alpha.abs(), beta))
        broken = beta <= self._breakdown_factor * self._scale
        nxt = w / torch.where(broken, torch.ones_like(beta), beta)
        if broken.any():
            beta = torch.where(broken, torch.zeros_like(beta), beta)
            nxt[:, broken] = self._restart(broken, j + 1)
        self._alphas.append(alpha)
        self._betas.append(beta)
        self.previous, self.current = v, nxt
        self.steps = j + 1

    def _store(self, v: Tensor) -> None:
        """Put ``v`` ``[P, b]`` at row ``steps`` of the basis, growing it by doubling."""
        j = self.steps
        if self.basis is None or j == self.basis.shape[0]:
            capacity = min(max(2 * j, 16), self.size + 1)
            grown = v.new_empty(capacity, *v.shape)
            if self.basis is not None:
                grown[:j] = self.basis[:j]
            self.basis = grown
        self.basis[j] = v

    def _orthogonalize(self, w: Tensor, count: int) -> Tensor:
        """``w`` ``[P, b]`` minus its projection on the first ``count`` basis vectors."""
        V = self.basis[:count]  # [j, P, b]
        coefficients = torch.einsum("jpb,pb->jb", V, w)
        return w - torch.einsum("jpb,jb->pb", V, coefficients)

    def _restart(self, broken: Tensor, count: int) -> Tensor:
        """Unit vectors ``[P, n]`` orthogonal to the bases of the ``n`` broken processes."""
        n = int(broken.sum())
        if not self.reorthogonalize or count >= self.size:
            return self.current.new_zeros(self.size, n)
        fresh = random_vectors(
            self.size,
            n,
            "normal",
            dtype=self.current.dtype,
            device=self.current.device,
            generator=self.generator,
        )
        V = self.basis[:count][:, :, broken]  # [j, P, n]
        for _ in range(2):
            fresh = fresh - torch.einsum("jpn,jn->pn", V, torch.einsum("jpn,pn->jn", V, fresh))
        return fresh / torch.linalg.vector_norm(fresh, dim=0, keepdim=True)


def lanczos_eigs(
    A: Any,
    k: int,
    which: str = "largest",
    *,
    tol: float | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The :math:`k` largest or smallest eigenpairs of a symmetric :math:`A` by Lanczos.

    The Krylov space grows (one product ``A @ v`` per step, full reorthogonalisation) until the
    :math:`k` wanted Ritz pairs :math:`(\theta_i, u_i)` of :math:`T_j` have residuals
    :math:`\|A u_i - \theta_i u_i\| = |\beta_j s_{ji}| \le \text{tol} \cdot \max_i |\theta_i|`,
    or ``max_steps`` is reached (a warning then says how far it got). The eigenvalue error is
    about the squared residual over the gap to the rest of the spectrum; the eigenvector angle,
    the residual over the gap. An eigenvalue of multiplicity :math:`> 1` is found once per
    breakdown of the process (each restart, from a random vector orthogonal to the basis, finds
    another copy; convergence is not tested at a breakdown): the copies of a multiple eigenvalue
    may be missed unless its Krylov space is exhausted first, and the zero eigenvalues of a
    low-rank :math:`A` can take up to :math:`P` steps.

    Args:
        A: The symmetric square operator ``[P, P]`` (``A @ V`` and ``A.shape``).
        k: The number of eigenpairs, :math:`1 \le k \le P`.
        which: ``"largest"`` or ``"smallest"`` (algebraically, not in magnitude).
        tol: The relative residual at which a Ritz pair counts as converged; the square root
            of the dtype's machine epsilon if ``None`` (:math:`1.5 \cdot 10^{-8}` in float64).
        max_steps: The most Lanczos steps (the basis is ``[P, max_steps]``); :math:`P` if
            ``None``, where the process is exact.
        generator: The random number generator for the start vector and restarts.

    Returns:
        ``(eigenvalues, eigenvectors)``: ``[k]`` in descending order for ``"largest"`` and in
        ascending order for ``"smallest"``, and the orthonormal eigenvectors ``[P, k]`` as
        columns in the same order (each up to sign).
    """
    P = operator_size(A)
    k = check_count("k", k, 1)
    if k > P:
        raise ValueError(f"k={k} eigenpairs asked of a {P} x {P} operator")
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}; choose one of {WHICH}")
    max_steps = P if max_steps is None else min(check_count("max_steps", max_steps, k), P)
    dtype, device = operator_dtype_device(A)
    tol = torch.finfo(dtype).eps ** 0.5 if tol is None else tol
    start = random_vectors(P, 1, "normal", dtype=dtype, device=device, generator=generator)
    process = LanczosProcess(A, start, generator=generator)
    last_check = 0
    while True:
        process.step()
        j = process.steps
        if j < max_steps and (j < k or j - last_check < max(1, j // 10)):
            continue
        if j < max_steps and bool(process.betas[0, -1] == 0):
            continue  # a breakdown: the block just completed is exact, the rest is unexplored
        last_check = j
        values, vectors = torch.linalg.eigh(process.tridiagonal()[0])
        wanted = torch.arange(j - 1, j - 1 - k, -1) if which == "largest" else torch.arange(k)
        wanted = wanted.to(values.device)
        residuals = (process.betas[0, -1] * vectors[-1, wanted]).abs()
        bound = tol * values.abs().max().clamp_min(torch.finfo(dtype).tiny)
        converged = bool((residuals <= bound).all())
        if converged or j >= max_steps:
            break
    if not converged:
        warnings.warn(
            f"lanczos_eigs: {k} {which} eigenpairs not converged in max_steps={max_steps} "
            f"steps (largest relative residual {float(residuals.max() / bound * tol):.2e} > "
            f"tol={tol:.1e}); raise max_steps",
            RuntimeWarning,
            stacklevel=2,
        )
    eigenvectors = process.basis_matrix()[0] @ vectors[:, wanted]
    eigenvectors = eigenvectors / torch.linalg.vector_norm(eigenvectors, dim=0, keepdim=True)
    return values[wanted], eigenvectors
