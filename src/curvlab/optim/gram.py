r"""Minimum-norm solves :math:`A X = R` through the Gram matrix :math:`A A^\top`.

Every trained matrix of a reversible block enters the network linearly, so an exact Gauss-Newton
step reduces to solves with a feature matrix :math:`A \in \mathbb{R}^{N \times h}` (``N`` samples,
``h`` features, ``h >= N`` for an exact solution). The minimum-norm solution is

.. math::
    X = A^{+} R = A^\top (A A^\top)^{+} R,

so only the small ``[N, N]`` Gram matrix is factorized. :class:`GramInverse` factorizes a batch of
Gram matrices once and hands out :math:`C = (A A^\top)^{+} R` ("coefficients"; then
:math:`X = A^\top C`). Solvers:

* ``"cholesky"`` -- fastest; a matrix whose Cholesky factor fails or has a pivot below the
  thresholds counts as rank-deficient and is solved by the thresholded eigendecomposition instead.
* ``"eigh"`` -- thresholded pseudo-inverse through the eigendecomposition of :math:`A A^\top`: keeps
  singular values :math:`\sigma_i = \sqrt{\lambda_i} > \max(\text{atol}, \text{rtol}\,\sigma_{\max})`,
  the same result as an SVD pseudo-inverse of :math:`A` with those thresholds.
* ``"svd"`` -- SVD of :math:`A` itself, as the authors' code does (slow; for reproduction and
  benchmarks).
* ``"damped"`` -- :math:`(A A^\top + \lambda I)^{-1}`: Tikhonov-damped least squares, defined at any
  width, never exact for :math:`\lambda > 0`.
"""

from __future__ import annotations

import torch
from torch import Tensor

SOLVERS = ("cholesky", "eigh", "svd", "damped")


def default_rtol(dtype: torch.dtype) -> float:
    r"""Relative singular-value threshold :math:`10 \sqrt{\varepsilon}` of ``dtype``."""
    return 10.0 * torch.finfo(dtype).eps ** 0.5


class GramInverse:
    r"""Batched (pseudo-)inverses of Gram matrices :math:`A_b A_b^\top`.

    Args:
        features: ``[B, N, h]`` feature matrices (only used by ``"svd"``; may be ``None`` else).
        grams: ``[B, N, N]`` Gram matrices :math:`A_b A_b^\top`.
        solver: One of :data:`SOLVERS`.
        rtol: Relative threshold on singular values of :math:`A_b`.
        atol: Absolute threshold on singular values of :math:`A_b`.
        damping: :math:`\lambda` of the ``"damped"`` solver (also added by the others if > 0).

    Attributes:
        full_rank: ``[B]`` bool, whether :math:`A_b` has full row rank ``N`` under the thresholds
            (always ``True`` for ``"damped"``, which solves every system).
    """

    def __init__(
        self,
        features: Tensor | None,
        grams: Tensor,
        solver: str,
        rtol: float,
        atol: float,
        damping: float = 0.0,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        if solver == "damped" and damping <= 0:
            raise ValueError("solver='damped' needs damping > 0")
        self.solver = solver
        self.rtol, self.atol = rtol, atol
        n = grams.shape[-1]
        eye = torch.eye(n, dtype=grams.dtype, device=grams.device)
        if damping > 0:
            grams = grams + damping * eye
        self._chol: Tensor | None = None
        self._eig: tuple[Tensor, Tensor] | None = None
        self._use_eig = torch.zeros(grams.shape[0], dtype=torch.bool, device=grams.device)
        if solver in ("cholesky", "damped"):
            chol, info = torch.linalg.cholesky_ex(grams)
            pivots = chol.diagonal(dim1=-2, dim2=-1)
            ok = info == 0
            if solver == "cholesky":
                # Cholesky pivots bound the singular values of A from above: sqrt(lambda_min) <= min pivot.
                scale = pivots.amax(dim=-1)
                ok = ok & (pivots.amin(dim=-1) > torch.clamp(rtol * scale, min=atol))
            self._chol = chol
            self._use_eig = ~ok
            self.full_rank = ok if solver == "cholesky" else torch.ones_like(ok)
            if solver == "damped" and not bool(ok.all()):
                raise torch.linalg.LinAlgError("damped Gram matrix is not positive definite")
            if bool(self._use_eig.any()):
                self._eig = self._thresholded_eigh(grams)
        elif solver == "eigh":
            self._use_eig[:] = True
            self._eig = self._thresholded_eigh(grams)
            self.full_rank = self._eig[1].gt(0).all(dim=-1)
        else:  # svd
            if features is None:
                raise ValueError("solver='svd' needs the feature matrices")
            u, s, _ = torch.linalg.svd(features, full_matrices=False)
            keep = s > torch.clamp(rtol * s.amax(dim=-1, keepdim=True), min=atol)
            inv = torch.where(keep, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny) ** 2, 0.0)
            self._eig = (u, inv)
            self._use_eig[:] = True
            self.full_rank = keep.all(dim=-1) & (s.shape[-1] == n)

    def _thresholded_eigh(self, grams: Tensor) -> tuple[Tensor, Tensor]:
        """Eigenvectors ``[B, N, N]`` and thresholded inverse eigenvalues ``[B, N]``."""
        evals, evecs = torch.linalg.eigh(grams)
        sigma = evals.clamp_min(0).sqrt()
        keep = sigma > torch.clamp(self.rtol * sigma.amax(dim=-1, keepdim=True), min=self.atol)
        inv = torch.where(keep, 1.0 / evals.clamp_min(torch.finfo(evals.dtype).tiny), 0.0)
        return evecs, inv

    def coefficients(self, index: int, rhs: Tensor) -> Tensor:
        r"""Return :math:`(A_b A_b^\top)^{+} R` for matrix ``index``; ``rhs`` is ``[N, m]``."""
        if bool(self._use_eig[index]):
            assert self._eig is not None
            evecs, inv = self._eig[0][index], self._eig[1][index]
            return evecs @ (inv[:, None] * (evecs.T @ rhs))
        assert self._chol is not None
        return torch.cholesky_solve(rhs, self._chol[index])
