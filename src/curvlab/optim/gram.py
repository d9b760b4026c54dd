r"""Minimum-norm solves :math:`A X = R` through the Gram matrix :math:`A A^\top`.

Every trained matrix of a reversible block enters the network linearly, so an exact Gauss-Newton
step reduces to solves with a feature matrix :math:`A \in \mathbb{R}^{N \times h}` (``N`` samples,
``h`` features, ``h >= N`` for an exact solution). The minimum-norm solution is

.. math::
    X = A^{+} R = A^\top (A A^\top)^{+} R,

so only the small ``[N, N]`` Gram matrix is factorized. :class:`GramInverse` factorizes a batch of
Gram matrices once and hands out :math:`C = (A A^\top)^{+} R` ("coefficients"; then
:math:`X = A^\top C`), for one matrix (:meth:`GramInverse.coefficients`) or a batch of them in one
call (:meth:`GramInverse.solve`). Only the **lower triangle** of each Gram matrix is read, so a
caller may fill just that half. Solvers:

* ``"cholesky"`` -- fastest; a matrix whose Cholesky factor fails or has a pivot below the
  thresholds counts as rank-deficient and is solved by the thresholded eigendecomposition instead
  (computed on first use, for that matrix only).
* ``"eigh"`` -- thresholded pseudo-inverse through the eigendecomposition of :math:`A A^\top`: keeps
  singular values :math:`\sigma_i = \sqrt{\lambda_i} > \max(\text{atol}, \text{rtol}\,\sigma_{\max})`,
  the same result as an SVD pseudo-inverse of :math:`A` with those thresholds.
* ``"svd"`` -- SVD of :math:`A` itself, as the authors' code does (slow; for reproduction and
  benchmarks).
* ``"damped"`` -- :math:`(A A^\top + \lambda I)^{-1}`: Tikhonov-damped least squares, defined at any
  width, never exact for :math:`\lambda > 0`.

Cost for ``B`` matrices: Cholesky :math:`B N^3 / 3` flops, eigendecomposition about :math:`9 B N^3`,
SVD of the features :math:`O(B N^2 h)`; a solve with ``m`` right-hand sides :math:`2 B N^2 m`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        grams: ``[B, N, N]`` Gram matrices :math:`A_b A_b^\top` (only the lower triangle is read).
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
        if damping > 0:
            n = grams.shape[-1]
            grams = grams + damping * torch.eye(n, dtype=grams.dtype, device=grams.device)
        self._grams = grams
        self._chol: Tensor | None = None
        self._eig: dict[int, tuple[Tensor, Tensor]] = {}
        batch = grams.shape[0]
        if solver in ("cholesky", "damped"):
            chol, info = torch.linalg.cholesky_ex(grams)
            pivots = chol.diagonal(dim1=-2, dim2=-1)
            ok = info == 0
            if solver == "cholesky":
                # Cholesky pivots bound the singular values of A from above: sqrt(lambda_min) <= min pivot.
                scale = pivots.amax(dim=-1)
                ok = ok & (pivots.amin(dim=-1) > torch.clamp(rtol * scale, min=atol))
            self._chol = chol
            self._use_eig = (~ok).tolist()
            self.full_rank = ok if solver == "cholesky" else torch.ones_like(ok)
            if solver == "damped" and any(self._use_eig):
                raise torch.linalg.LinAlgError("damped Gram matrix is not positive definite")
        elif solver == "eigh":
            self._use_eig = [True] * batch
            evecs, inv = self._thresholded_eigh(grams)
            self._eig = {b: (evecs[b], inv[b]) for b in range(batch)}
            self.full_rank = inv.gt(0).all(dim=-1)
        else:  # svd
            if features is None:
                raise ValueError("solver='svd' needs the feature matrices")
            n = grams.shape[-1]
            u, s, _ = torch.linalg.svd(features, full_matrices=False)
            keep = s > torch.clamp(rtol * s.amax(dim=-1, keepdim=True), min=atol)
            inv = torch.where(keep, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny) ** 2, 0.0)
            self._use_eig = [True] * batch
            self._eig = {b: (u[b], inv[b]) for b in range(batch)}
            self.full_rank = keep.all(dim=-1) & (s.shape[-1] == n)

    def _thresholded_eigh(self, grams: Tensor) -> tuple[Tensor, Tensor]:
        """Eigenvectors ``[B, N, N]`` and thresholded inverse eigenvalues ``[B, N]``."""
        evals, evecs = torch.linalg.eigh(grams)
        sigma = evals.clamp_min(0).sqrt()
        keep = sigma > torch.clamp(self.rtol * sigma.amax(dim=-1, keepdim=True), min=self.atol)
        inv = torch.where(keep, 1.0 / evals.clamp_min(torch.finfo(evals.dtype).tiny), 0.0)
        return evecs, inv

    def _eigen(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Thresholded eigendecompositions of matrices ``indices`` (computed once, on demand)."""
        missing = [b for b in indices if b not in self._eig]
        if missing:
            evecs, inv = self._thresholded_eigh(self._grams[missing])
            self._eig.update({b: (evecs[i], inv[i]) for i, b in enumerate(missing)})
        return (
            torch.stack([self._eig[b][0] for b in indices]),
            torch.stack([self._eig[b][1] for b in indices]),
        )

    def solve(self, rhs: Tensor, indices: Sequence[int] | None = None) -> Tensor:
        r"""Return :math:`C_i = (A_{b_i} A_{b_i}^\top)^{+} R_i` for a batch of right-hand sides.

        Args:
            rhs: ``[B', N, m]`` right-hand sides :math:`R_i`.
            indices: Which matrix :math:`b_i` each right-hand side belongs to (default: all, in
                order, ``B' = B``).

        Returns:
            ``[B', N, m]`` coefficients; one batched triangular solve for the Cholesky-factorized
            matrices and one batched product for the eigendecomposed ones.
        """
        indices = list(range(rhs.shape[0])) if indices is None else list(indices)
        if len(indices) != rhs.shape[0]:
            raise ValueError(f"{len(indices)} indices for {rhs.shape[0]} right-hand sides")
        by_eig = [i for i, b in enumerate(indices) if self._use_eig[b]]
        by_chol = [i for i, b in enumerate(indices) if not self._use_eig[b]]
        if not by_eig:
            return torch.cholesky_solve(rhs, self._factors(indices))
        out = torch.empty_like(rhs)
        if by_chol:
            chol = self._factors([indices[i] for i in by_chol])
            out[by_chol] = torch.cholesky_solve(rhs[by_chol], chol)
        evecs, inv = self._eigen([indices[i] for i in by_eig])
        out[by_eig] = evecs @ (inv[..., None] * (evecs.mT @ rhs[by_eig]))
        return out

    def _factors(self, indices: list[int]) -> Tensor:
        """Cholesky factors ``[len(indices), N, N]`` (a view when the indices are consecutive)."""
        assert self._chol is not None
        start = indices[0]
        if indices == list(range(start, start + len(indices))):
            return self._chol[start : start + len(indices)]
        return self._chol[indices]

    def coefficients(self, index: int, rhs: Tensor) -> Tensor:
        r"""Return :math:`(A_b A_b^\top)^{+} R` for matrix ``index``; ``rhs`` is ``[N, m]``."""
        return self.solve(rhs[None], [index])[0]
