r"""A dense SINGD: the reference of the structured one.

Every factor is a dense ``[G, d, d]`` tensor. Each structure has two maps:

* :meth:`Structure.project`, the orthogonal projection (a mask, or the super-diagonal means for
  triu-Toeplitz), for matrices already in the structure (products);
* :meth:`Structure.paper_map`, SINGD's map :math:`\hat\Pi` of a symmetric matrix (Lin et al.,
  ICML 2024), computed from its definition rather than from a closed form: the natural
  gradient of :math:`u \mapsto \langle M, u\rangle` over the structure's matrices :math:`u`
  (the Lie algebra of the factor's group, with a basis :math:`\{B_p\}`) under the Fisher
  metric of the local coordinates at the identity, :math:`g(u, v) = \tfrac12 \langle u +
  u^\top, v + v^\top\rangle`, the minimum-norm solution where the metric is degenerate, times
  2 (so that the dense map is the identity): :math:`\hat\Pi(M) = 2 \sum_p c_p B_p` with
  :math:`c = g^{+} r`, :math:`g_{pq} = g(B_p, B_q)`, :math:`r_p = \langle M, B_p\rangle`.

The update applies :math:`\hat\Pi` to the symmetric curvature terms and the orthogonal
projection after the product :math:`K (I - \beta_1 m_K)` (a no-op up to round-off, the
structures being groups). Independent of ``curvlab.optim.structures``' closed forms.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------ structures
class Structure:
    r"""A matrix structure: the orthogonal (Frobenius) projection :math:`\Pi` onto it.

    Subclasses implement :meth:`project` on batches of square matrices ``[G, d, d]``; the
    result has the structure and ``project(project(M)) == project(M)``.
    """

    name = "structure"

    def project(self, matrix: Tensor) -> Tensor:
        """The nearest structured matrices ``[G, d, d]`` to ``matrix`` ``[G, d, d]``."""
        raise NotImplementedError

    def basis(self, dim: int) -> Tensor:
        """A basis ``[P, d, d]`` (float64) of the structure's matrices."""
        raise NotImplementedError

    def paper_map(self, matrix: Tensor) -> Tensor:
        r""":math:`\hat\Pi(M)` ``[G, d, d]`` of symmetric ``matrix`` ``[G, d, d]`` (module docstring)."""
        basis = self.basis(matrix.shape[-1]).to(matrix)
        sym = (basis + basis.mT) / 2
        metric = 2 * torch.einsum("pij,qij->pq", sym, sym)
        rhs = torch.einsum("gij,pij->gp", matrix, basis)
        coefficients = rhs @ torch.linalg.pinv(metric, hermitian=True)
        return 2 * torch.einsum("gp,pij->gij", coefficients, basis)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _MaskStructure(Structure):
    """A structure given by a fixed pattern of free entries (zero elsewhere)."""

    def mask(self, dim: int, device: torch.device) -> Tensor:
        """The pattern ``[d, d]`` (bool) of the free entries."""
        return self._pattern(dim, device)

    def _pattern(self, dim: int, device: torch.device) -> Tensor:
        raise NotImplementedError

    def project(self, matrix: Tensor) -> Tensor:
        """``matrix`` with the entries outside :meth:`mask` set to zero ``[G, d, d]``."""
        mask = self.mask(matrix.shape[-1], matrix.device)
        return matrix * mask.to(matrix.dtype)

    def basis(self, dim: int) -> Tensor:
        """One unit matrix per free entry ``[P, d, d]``."""
        rows, cols = self.mask(dim, torch.device("cpu")).nonzero(as_tuple=True)
        basis = torch.zeros(len(rows), dim, dim, dtype=torch.float64)
        basis[torch.arange(len(rows)), rows, cols] = 1.0
        return basis


class Dense(_MaskStructure):
    """Every entry free (the projection is the identity)."""

    name = "dense"

    def _pattern(self, dim: int, device: torch.device) -> Tensor:
        return torch.ones(dim, dim, dtype=torch.bool, device=device)

    def project(self, matrix: Tensor) -> Tensor:
        """``matrix`` itself."""
        return matrix


class Diagonal(_MaskStructure):
    """Only the diagonal."""

    name = "diagonal"

    def _pattern(self, dim: int, device: torch.device) -> Tensor:
        return torch.eye(dim, dtype=torch.bool, device=device)


class BlockDiagonal(_MaskStructure):
    """Dense diagonal blocks of ``block_size`` (the last one smaller if ``d`` is no multiple)."""

    name = "block_diagonal"

    def __init__(self, block_size: int = 30) -> None:
        if not _is_int(block_size) or block_size < 1:
            raise ValueError(f"SINGD: block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size

    def _pattern(self, dim: int, device: torch.device) -> Tensor:
        block = torch.arange(dim, device=device) // self.block_size
        return block[:, None] == block[None, :]

    def __repr__(self) -> str:
        return f"BlockDiagonal(block_size={self.block_size})"


class LowerTriangular(_MaskStructure):
    """Entries on and below the diagonal."""

    name = "lower_triangular"

    def _pattern(self, dim: int, device: torch.device) -> Tensor:
        return torch.ones(dim, dim, dtype=torch.bool, device=device).tril()


class UpperTriangular(_MaskStructure):
    """Entries on and above the diagonal."""

    name = "upper_triangular"

    def _pattern(self, dim: int, device: torch.device) -> Tensor:
        return torch.ones(dim, dim, dtype=torch.bool, device=device).triu()


class Hierarchical(_MaskStructure):
    r"""The hierarchical structure of SINGD.

    .. math::

        \begin{pmatrix} A_{11} & A_{12} & A_{13} \\ 0 & D & 0 \\ 0 & A_{32} & A_{33}
        \end{pmatrix}

    with the first ``k1`` rows dense, a diagonal :math:`D` in the middle and the last ``k2``
    rows dense right of the first ``k1`` columns (both sizes clipped to ``d``).
    """

    name = "hierarchical"

    def __init__(self, k1: int = 15, k2: int = 15) -> None:
        for label, value in (("k1", k1), ("k2", k2)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"SINGD: hierarchical {label} must be an int >= 0, got {value!r}")
        self.k1, self.k2 = k1, k2

    def _pattern(self, dim: int, device: torch.device) -> Tensor:
        k1 = min(self.k1, dim)
        k2 = min(self.k2, dim - k1)
        mask = torch.eye(dim, dtype=torch.bool, device=device)
        mask[:k1] = True
        mask[dim - k2 :, k1:] = True
        return mask

    def __repr__(self) -> str:
        return f"Hierarchical(k1={self.k1}, k2={self.k2})"


class TriuToeplitz(Structure):
    r"""Upper-triangular Toeplitz: :math:`M_{ij} = t_{j - i}` for :math:`j \ge i`, 0 below.

    The projection averages each super-diagonal.
    """

    name = "triu_toeplitz"

    def project(self, matrix: Tensor) -> Tensor:
        """Each super-diagonal replaced by its mean, zero below the diagonal ``[G, d, d]``."""
        dim = matrix.shape[-1]
        rows = torch.arange(dim, device=matrix.device)
        offset = rows[None, :] - rows[:, None]  # [d, d]: j - i
        upper = offset >= 0
        index = offset.clamp_min(0).reshape(-1)
        flat = (matrix * upper.to(matrix.dtype)).reshape(*matrix.shape[:-2], dim * dim)
        sums = flat.new_zeros(*matrix.shape[:-2], dim).index_add_(-1, index, flat)
        means = sums / torch.arange(dim, 0, -1, device=matrix.device).to(matrix.dtype)
        out = means[..., index].reshape(matrix.shape)
        return out * upper.to(matrix.dtype)

    def basis(self, dim: int) -> Tensor:
        """The powers of the shift, :math:`S^k` with ones on the k-th super-diagonal ``[d, d, d]``."""
        ones = torch.ones(dim, dtype=torch.float64)
        return torch.stack([torch.diag_embed(ones[k:], offset=k) for k in range(dim)])


STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls
    for cls in (
        Dense,
        Diagonal,
        BlockDiagonal,
        LowerTriangular,
        UpperTriangular,
        Hierarchical,
        TriuToeplitz,
    )
}
"""The structures of :math:`K` and :math:`C` by name."""


def _trace(matrix: Tensor) -> Tensor:
    r""":math:`\mathrm{tr}` per group ``[G, 1, 1]``."""
    return matrix.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]


def riemannian_step(
    factors: tuple[Tensor, Tensor],
    momenta: tuple[Tensor, Tensor],
    curvature: tuple[Tensor, Tensor],
    structures: tuple[Structure, Structure],
    damping: float,
    alpha1: float,
    beta1: float,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    r"""The multiplicative update of :math:`(K, C)` from the curvature terms :math:`(T_K, T_C)`.

    .. math::

        m_K \leftarrow \alpha_1 m_K + \tfrac{1}{2b}\hat\Pi_K\big(T_K + \lambda\,\mathrm{tr}(C^\top C)
        K^\top K - b I_a\big), \quad K \leftarrow \Pi_K\big(K (I_a - \beta_1 m_K)\big)

    and likewise for :math:`C` (with :math:`a` and :math:`b` swapped). SINGD's terms are
    :math:`T_K = \mathrm{tr}(H_C) H_K`, :math:`T_C = \mathrm{tr}(H_K) H_C`
    (:func:`inverse_free_update`); IF-Shampoo's come from the gradient matrix
    (:class:`curvlab.optim.IFShampoo`).

    Args:
        factors: :math:`K` ``[G, a, a]``, :math:`C` ``[G, b, b]``.
        momenta: :math:`m_K` ``[G, a, a]``, :math:`m_C` ``[G, b, b]``.
        curvature: :math:`T_K` ``[G, a, a]``, :math:`T_C` ``[G, b, b]``.
        structures: :math:`\Pi_K`, :math:`\Pi_C`.
        damping: :math:`\lambda \ge 0`.
        alpha1: Riemannian momentum :math:`\alpha_1 \in [0, 1)`.
        beta1: Factor learning rate :math:`\beta_1 > 0`.

    Returns:
        ``(K, C), (m_K, m_C)``, new tensors of the factors' dtype.
    """
    k, c = factors
    m_k, m_c = momenta
    t_k, t_c = curvature
    pi_k, pi_c = structures
    dim_a, dim_b = k.shape[-1], c.shape[-1]
    ktk, ctc = k.transpose(-2, -1) @ k, c.transpose(-2, -1) @ c
    eye_a = torch.eye(dim_a, dtype=k.dtype, device=k.device)
    eye_b = torch.eye(dim_b, dtype=c.dtype, device=c.device)
    step_k = (t_k + damping * _trace(ctc) * ktk - dim_b * eye_a) / (2 * dim_b)
    step_c = (t_c + damping * _trace(ktk) * ctc - dim_a * eye_b) / (2 * dim_a)
    m_k = alpha1 * m_k + pi_k.paper_map(step_k)
    m_c = alpha1 * m_c + pi_c.paper_map(step_c)
    k = pi_k.project(k @ (eye_a - beta1 * m_k))
    c = pi_c.project(c @ (eye_b - beta1 * m_c))
    return (k, c), (m_k, m_c)


def inverse_free_update(
    factors: tuple[Tensor, Tensor],
    momenta: tuple[Tensor, Tensor],
    statistics: tuple[Tensor, Tensor],
    structures: tuple[Structure, Structure],
    damping: float,
    alpha1: float,
    beta1: float,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    r"""SINGD's update of :math:`(K, C)` from the Kronecker statistics (module docstring).

    :func:`riemannian_step` with :math:`T_K = \mathrm{tr}(H_C) H_K`, :math:`T_C =
    \mathrm{tr}(H_K) H_C`, :math:`H_K = K^\top A K`, :math:`H_C = C^\top B C`.

    Args:
        factors: :math:`K` ``[G, a, a]``, :math:`C` ``[G, b, b]``.
        momenta: :math:`m_K` ``[G, a, a]``, :math:`m_C` ``[G, b, b]``.
        statistics: :math:`A` ``[G, a, a]`` (input side), :math:`B` ``[G, b, b]`` (output side).
        structures: :math:`\Pi_K`, :math:`\Pi_C`.
        damping: :math:`\lambda \ge 0`.
        alpha1: Riemannian momentum :math:`\alpha_1 \in [0, 1)`.
        beta1: Factor learning rate :math:`\beta_1 > 0`.

    Returns:
        ``(K, C), (m_K, m_C)``, new tensors of the factors' dtype.
    """
    k, c = factors
    a_stat, b_stat = (s.to(k.dtype) for s in statistics)
    h_k = k.transpose(-2, -1) @ a_stat @ k
    h_c = c.transpose(-2, -1) @ b_stat @ c
    curvature = (_trace(h_c) * h_k, _trace(h_k) * h_c)
    return riemannian_step(factors, momenta, curvature, structures, damping, alpha1, beta1)


def precondition(k: Tensor, c: Tensor, matrix: Tensor) -> Tensor:
    r""":math:`C C^\top M K K^\top` for the gradient matrices ``matrix`` ``[G, b, a]``."""
    m = matrix.to(k.dtype)
    out = c @ (c.transpose(-2, -1) @ m @ k) @ k.transpose(-2, -1)
    return out.to(matrix.dtype)


# ------------------------------------------------------------------------------ optimizer


def make_structure(name: str, block_size: int = 30, hierarchical_sizes=(15, 15)) -> Structure:
    """The mask structure of a name."""
    if name == "block_diagonal":
        return BlockDiagonal(block_size)
    if name == "hierarchical":
        return Hierarchical(*hierarchical_sizes)
    return STRUCTURES[name]()
