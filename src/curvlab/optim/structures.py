r"""Structured square matrices for SINGD's factors: only the free entries are stored.

A :class:`StructuredMatrix` is a batch of :math:`G` matrices :math:`S` ``[G, d, d]`` of one
structure, held by its parameters only (a diagonal is ``[G, d]``, a triu-Toeplitz matrix its
first row ``[G, d]``, block-diagonal its blocks ``[G, n, b, b]``, ...). Every structure is a
matrix group (closed under products, with the identity), so SINGD's multiplicative update
:math:`K \leftarrow K (I - \beta m)` stays in it. The operations SINGD needs are

* :meth:`~StructuredMatrix.matmul` :math:`S M` and :meth:`~StructuredMatrix.tmatmul`
  :math:`S^\top M` for dense ``M`` ``[G, d, n]`` (and from the right, :meth:`rmatmul`
  :math:`M S`, :meth:`rtmatmul` :math:`M S^\top`);
* :meth:`from_dense`, the free entries of a dense matrix (the orthogonal, Frobenius,
  projection; the means of the super-diagonals for triu-Toeplitz), for matrices already in
  the structure (products, the identity);
* :meth:`from_symmetric`, SINGD's structure-preserving map :math:`\hat\Pi` of a *symmetric*
  matrix (Lin et al., ICML 2024): the natural gradient in the structure's local coordinates,
  which counts an off-diagonal entry from both triangles where its mirror image is not free,

  .. math::

      \hat\Pi(M)_{ij} = \begin{cases} M_{ij} & \text{(i, j) and (j, i) free (or } i = j),\\
      2 M_{ij} & \text{(i, j) free, (j, i) not} \end{cases}

  (for triu-Toeplitz the row :math:`t_k = 2\,\mathrm{mean}_{j - i = k} M_{ij}`, :math:`k \ge
  1`): the orthogonal projection for dense, diagonal and block-diagonal, twice its
  off-diagonal part for triangular, hierarchical (the blocks right of the first :math:`k_1`
  columns and below the diagonal part) and triu-Toeplitz, as the authors' package ``singd``;
* :meth:`congruence` :math:`\hat\Pi(S^\top A S)` with :math:`\mathrm{tr}(S^\top A S)` and
  :meth:`gram` :math:`\hat\Pi(S^\top S)` with :math:`\mathrm{tr}(S^\top S)`, and both at
  once, :math:`\hat\Pi(S^\top (\alpha A + \beta I) S)`, in two phases
  (:meth:`congruence_parts`, then :meth:`damped_congruence`);
* :meth:`product` :math:`S S'` within the structure, sums, scalings by a number or one per
  group (``[G]``), :meth:`eye_like` and :meth:`to_dense` ``[G, d, d]``.

The recipes that name the structures (``"dense"``, ``"diagonal"``, ...) and build these
matrices are :class:`Structure` and :data:`STRUCTURES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def trace(matrix: Tensor) -> Tensor:
    r""":math:`\mathrm{tr}` of each matrix of ``[G, d, d]``, shape ``[G]``."""
    return matrix.diagonal(dim1=-2, dim2=-1).sum(-1)


def _per_group(factor: float | Tensor, tensor: Tensor) -> float | Tensor:
    """``factor`` (a number or ``[G]``) shaped to broadcast against ``tensor`` ``[G, ...]``."""
    if isinstance(factor, Tensor):
        return factor.to(tensor.dtype).reshape(-1, *([1] * (tensor.ndim - 1)))
    return factor


class _DenseBacked:
    """The two-phase damped congruence through a dense :math:`S` (two products in all)."""

    def to_dense(self) -> Tensor:  # noqa: D102 - provided by the StructuredMatrix
        raise NotImplementedError

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:  # noqa: D102 - idem
        raise NotImplementedError

    def from_symmetric(self, matrix: Tensor) -> StructuredMatrix:  # noqa: D102 - idem
        return self.from_dense(matrix)

    def congruence_parts(self, symmetric: Tensor) -> tuple[object, Tensor]:
        r""":math:`A S` ``[G, d, d]`` and :math:`\mathrm{tr}(S^\top A S) = \sum A S \odot S`."""
        dense = self.to_dense()
        product = symmetric @ dense
        return product, (product * dense).sum((-2, -1))

    def damped_congruence(
        self, parts: object, alpha: float | Tensor, beta: float | Tensor
    ) -> StructuredMatrix:
        r""":math:`\hat\Pi\big(S^\top (\alpha A S + \beta S)\big)` with ``parts`` :math:`= A S`."""
        if not isinstance(parts, Tensor):
            raise TypeError(f"{type(self).__name__}.damped_congruence: parts of another kind")
        dense = self.to_dense()
        inner = parts * _per_group(alpha, parts) + dense * _per_group(beta, dense)
        return self.from_symmetric(dense.mT @ inner)


def _own(tensor: Tensor) -> Tensor:
    """A contiguous copy (a view would keep the dense matrix it came from alive)."""
    return tensor.clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------ the base
class StructuredMatrix:
    r"""A batch of structured matrices ``[G, d, d]`` held by its parameters ``tensors``.

    Subclasses implement :attr:`dim`, :meth:`to_dense`, :meth:`from_dense`, :meth:`matmul` and
    :meth:`tmatmul`; :meth:`product`, :meth:`congruence`, :meth:`gram` and the two-phase
    :meth:`damped_congruence` fall back to dense products projected by :meth:`from_dense` where
    a subclass has nothing cheaper.
    Operations return new matrices (the parameters are never changed in place).

    Args:
        *tensors: The parameters, each with the groups first (``[G, ...]``).
    """

    name = "structured"

    def __init__(self, *tensors: Tensor) -> None:
        self.tensors = tensors

    # ------------------------------------------------------------------ to implement
    @property
    def dim(self) -> int:
        """:math:`d`, the matrices' size."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The matrices as dense tensors ``[G, d, d]`` (zeros outside the structure)."""
        raise NotImplementedError

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)`: the orthogonal projection of ``matrix`` ``[G, d, d]`` (free entries)."""
        raise NotImplementedError

    def from_symmetric(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\hat\Pi(M)`, SINGD's map of a symmetric ``matrix`` ``[G, d, d]`` (module docstring).

        By default :meth:`from_dense`, which it equals where every free entry's mirror image is
        free too (dense, diagonal, block-diagonal, a projection of one's own).
        """
        return self.from_dense(matrix)

    def matmul(self, matrix: Tensor) -> Tensor:
        """:math:`S M` for ``matrix`` ``[G, d, n]``, shape ``[G, d, n]``."""
        raise NotImplementedError

    def tmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`S^\top M` for ``matrix`` ``[G, d, n]``, shape ``[G, d, n]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ derived
    @property
    def groups(self) -> int:
        """:math:`G`, the number of matrices."""
        return self.tensors[0].shape[0]

    @property
    def shape(self) -> torch.Size:
        """``[G, d, d]``, the shape of :meth:`to_dense`."""
        return torch.Size((self.groups, self.dim, self.dim))

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.tensors[0].dtype

    def like(self, *tensors: Tensor) -> StructuredMatrix:
        """A matrix of this class (and configuration) from new parameters."""
        return type(self)(*tensors)

    def eye_like(self) -> StructuredMatrix:
        """The identity in this structure, same groups, size, dtype and device."""
        dense = torch.eye(self.dim, dtype=self.dtype, device=self.tensors[0].device)
        return self.from_dense(dense.expand(self.groups, self.dim, self.dim))

    def zeros_like(self) -> StructuredMatrix:
        """The zero matrix in this structure."""
        return self.like(*(torch.zeros_like(t) for t in self.tensors))

    def rmatmul(self, matrix: Tensor) -> Tensor:
        """:math:`M S` for ``matrix`` ``[G, n, d]``, shape ``[G, n, d]``."""
        return self.tmatmul(matrix.mT).mT

    def rtmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`M S^\top` for ``matrix`` ``[G, n, d]``, shape ``[G, n, d]``."""
        return self.matmul(matrix.mT).mT

    def product(self, other: StructuredMatrix) -> StructuredMatrix:
        r""":math:`S S'` for ``other`` of the same structure (exact: the structure is a group)."""
        return self.from_dense(self.matmul(other.to_dense()))

    def congruence(self, symmetric: Tensor) -> tuple[StructuredMatrix, Tensor]:
        r""":math:`\hat\Pi(S^\top A S)` and :math:`\mathrm{tr}(S^\top A S)` ``[G]``.

        Args:
            symmetric: :math:`A` ``[G, d, d]``, symmetric.
        """
        full = self.tmatmul(self.tmatmul(symmetric.mT).mT)  # S^T (A S)
        return self.from_symmetric(full), trace(full)

    def gram(self) -> tuple[StructuredMatrix, Tensor]:
        r""":math:`\hat\Pi(S^\top S)` and :math:`\mathrm{tr}(S^\top S) = \|S\|_F^2` ``[G]``."""
        full = self.tmatmul(self.to_dense())
        return self.from_symmetric(full), trace(full)

    def frobenius_sq(self) -> Tensor:
        r""":math:`\|S\|_F^2 = \mathrm{tr}(S^\top S)` ``[G]``."""
        return self.to_dense().square().sum((-2, -1))

    def congruence_parts(self, symmetric: Tensor) -> tuple[object, Tensor]:
        r"""Phase one of :meth:`damped_congruence`: what it needs of ``symmetric`` and the trace.

        Returns the parts and :math:`\mathrm{tr}(S^\top A S)` ``[G]``. Two phases because
        SINGD weighs one factor's term by the other factor's trace. By default the parts are
        :meth:`congruence`'s projection; the dense-backed structures keep :math:`A S`, which
        saves the product :math:`S^\top S`.
        """
        projected, full_trace = self.congruence(symmetric)
        return projected, full_trace

    def damped_congruence(
        self, parts: object, alpha: float | Tensor, beta: float | Tensor
    ) -> StructuredMatrix:
        r""":math:`\hat\Pi\big(S^\top (\alpha A + \beta I) S\big)` from :meth:`congruence_parts`.

        Args:
            parts: :meth:`congruence_parts`' first result for :math:`A`.
            alpha: :math:`\alpha`, a number or ``[G]``.
            beta: :math:`\beta`, a number or ``[G]``.
        """
        if not isinstance(parts, StructuredMatrix):
            raise TypeError(f"{type(self).__name__}.damped_congruence: parts of another kind")
        return parts.scale(alpha) + self.gram()[0].scale(beta)

    def scale(self, factor: float | Tensor) -> StructuredMatrix:
        """:math:`c S` for a number or one factor per group (``[G]``)."""
        return self.like(*(t * _per_group(factor, t) for t in self.tensors))

    def __add__(self, other: StructuredMatrix) -> StructuredMatrix:
        return self.like(*(s + o for s, o in zip(self.tensors, other.tensors, strict=True)))

    def __sub__(self, other: StructuredMatrix) -> StructuredMatrix:
        return self.like(*(s - o for s, o in zip(self.tensors, other.tensors, strict=True)))

    def numel(self) -> int:
        """The number of stored entries (all groups)."""
        return sum(t.numel() for t in self.tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


# -------------------------------------------------------------------------- structures
class DenseMatrix(_DenseBacked, StructuredMatrix):
    """Every entry free: ``matrix`` ``[G, d, d]``."""

    name = "dense"

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(matrix)
        self.matrix = matrix

    @property
    def dim(self) -> int:
        """:math:`d`."""
        return self.matrix.shape[-1]

    def to_dense(self) -> Tensor:
        """Dense ``[G, d, d]``."""
        return self.matrix

    def from_dense(self, matrix: Tensor) -> DenseMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return DenseMatrix(matrix)

    def matmul(self, matrix: Tensor) -> Tensor:
        """:math:`S M`, ``[G, d, n]``."""
        return self.matrix @ matrix

    def tmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`S^\top M`, ``[G, d, n]``."""
        return self.matrix.mT @ matrix

    def rmatmul(self, matrix: Tensor) -> Tensor:
        """:math:`M S`, ``[G, n, d]``."""
        return matrix @ self.matrix

    def rtmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`M S^\top`, ``[G, n, d]``."""
        return matrix @ self.matrix.mT

    def product(self, other: StructuredMatrix) -> DenseMatrix:
        """:math:`S S'` in the structure."""
        return DenseMatrix(self.matrix @ other.to_dense())

    def congruence(self, symmetric: Tensor) -> tuple[DenseMatrix, Tensor]:
        r""":math:`\Pi(S^\top A S)` and its trace ``[G]``."""
        full = self.matrix.mT @ symmetric @ self.matrix
        return DenseMatrix(full), trace(full)

    def frobenius_sq(self) -> Tensor:
        r""":math:`\|S\|_F^2` ``[G]``."""
        return self.matrix.square().sum((-2, -1))

    def gram(self) -> tuple[DenseMatrix, Tensor]:
        r""":math:`\Pi(S^\top S)` and its trace ``[G]``."""
        return DenseMatrix(self.matrix.mT @ self.matrix), self.matrix.square().sum((-2, -1))


class DiagonalMatrix(StructuredMatrix):
    """Only the diagonal: ``diagonal`` ``[G, d]``."""

    name = "diagonal"

    def __init__(self, diagonal: Tensor) -> None:
        super().__init__(diagonal)
        self.diagonal = diagonal

    @property
    def dim(self) -> int:
        """:math:`d`."""
        return self.diagonal.shape[-1]

    def to_dense(self) -> Tensor:
        """Dense ``[G, d, d]``."""
        return torch.diag_embed(self.diagonal)

    @staticmethod
    def build(matrix: Tensor) -> DiagonalMatrix:
        r""":math:`\Pi(M)` of ``matrix`` ``[G, d, d]``: its diagonal."""
        return DiagonalMatrix(_own(matrix.diagonal(dim1=-2, dim2=-1)))

    def from_dense(self, matrix: Tensor) -> DiagonalMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return self.build(matrix)

    def matmul(self, matrix: Tensor) -> Tensor:
        """:math:`S M`, ``[G, d, n]``."""
        return self.diagonal[..., :, None] * matrix

    tmatmul = matmul

    def rmatmul(self, matrix: Tensor) -> Tensor:
        """:math:`M S`, ``[G, n, d]``."""
        return matrix * self.diagonal[..., None, :]

    rtmatmul = rmatmul

    def eye_like(self) -> DiagonalMatrix:
        """The identity in this structure."""
        return DiagonalMatrix(torch.ones_like(self.diagonal))

    def product(self, other: StructuredMatrix) -> DiagonalMatrix:
        """:math:`S S'` in the structure."""
        return DiagonalMatrix(self.diagonal * other.tensors[0])

    def congruence(self, symmetric: Tensor) -> tuple[DiagonalMatrix, Tensor]:
        r""":math:`\Pi(S^\top A S)` and its trace ``[G]``."""
        diagonal = self.diagonal.square() * symmetric.diagonal(dim1=-2, dim2=-1)
        return DiagonalMatrix(diagonal), diagonal.sum(-1)

    def frobenius_sq(self) -> Tensor:
        r""":math:`\|S\|_F^2` ``[G]``."""
        return self.diagonal.square().sum(-1)

    def gram(self) -> tuple[DiagonalMatrix, Tensor]:
        r""":math:`\Pi(S^\top S)` and its trace ``[G]``."""
        square = self.diagonal.square()
        return DiagonalMatrix(square), square.sum(-1)


class BlockDiagonalMatrix(StructuredMatrix):
    r"""Dense diagonal blocks: ``blocks`` ``[G, n, b, b]`` and the remainder ``last`` ``[G, r, r]``.

    :math:`d = n b + r` with :math:`0 \le r < b` (``last`` is ``[G, 0, 0]`` when :math:`b`
    divides :math:`d`).
    """

    name = "block_diagonal"

    def __init__(self, blocks: Tensor, last: Tensor) -> None:
        super().__init__(blocks, last)
        self.blocks, self.last = blocks, last

    @property
    def block_size(self) -> int:
        """:math:`b`."""
        return self.blocks.shape[-1]

    @property
    def dim(self) -> int:
        """:math:`d`."""
        return self.blocks.shape[1] * self.block_size + self.last.shape[-1]

    @staticmethod
    def split(matrix: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
        """The diagonal blocks ``[G, n, b, b]`` and remainder ``[G, r, r]`` of ``[G, d, d]``."""
        groups, dim = matrix.shape[0], matrix.shape[-1]
        n = dim // block_size
        cut = n * block_size
        square = matrix[:, :cut, :cut].reshape(groups, n, block_size, n, block_size)
        blocks = square.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        return blocks, matrix[:, cut:, cut:]

    def to_dense(self) -> Tensor:
        """Dense ``[G, d, d]``."""
        groups, n, b = self.blocks.shape[0], self.blocks.shape[1], self.block_size
        cut = n * b
        eye = torch.eye(n, dtype=self.dtype, device=self.blocks.device)
        square = self.blocks[:, :, :, None, :] * eye[None, :, None, :, None]  # [G, n, b, n, b]
        dense = self.blocks.new_zeros(groups, self.dim, self.dim)
        dense[:, :cut, :cut] = square.reshape(groups, cut, cut)
        dense[:, cut:, cut:] = self.last
        return dense

    @classmethod
    def build(cls, matrix: Tensor, block_size: int) -> BlockDiagonalMatrix:
        r""":math:`\Pi(M)` of ``matrix`` ``[G, d, d]``: its diagonal blocks of ``block_size``."""
        return cls(*(_own(t) for t in cls.split(matrix, block_size)))

    def from_dense(self, matrix: Tensor) -> BlockDiagonalMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return self.build(matrix, self.block_size)

    def _apply(self, blocks: Tensor, last: Tensor, matrix: Tensor) -> Tensor:
        groups, n, b = blocks.shape[0], blocks.shape[1], self.block_size
        cut = n * b
        columns = matrix.shape[-1]
        top = blocks @ matrix[:, :cut].reshape(groups, n, b, columns)
        top = top.reshape(groups, cut, columns)
        return torch.cat([top, last @ matrix[:, cut:]], dim=1)

    def matmul(self, matrix: Tensor) -> Tensor:
        """:math:`S M`, ``[G, d, n]``."""
        return self._apply(self.blocks, self.last, matrix)

    def tmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`S^\top M`, ``[G, d, n]``."""
        return self._apply(self.blocks.mT, self.last.mT, matrix)

    def product(self, other: StructuredMatrix) -> BlockDiagonalMatrix:
        """:math:`S S'` in the structure."""
        blocks, last = other.tensors
        return BlockDiagonalMatrix(self.blocks @ blocks, self.last @ last)

    def congruence(self, symmetric: Tensor) -> tuple[BlockDiagonalMatrix, Tensor]:
        r""":math:`\Pi(S^\top A S)` and its trace ``[G]``."""
        blocks, last = self.split(symmetric, self.block_size)  # only A's diagonal blocks matter
        new = BlockDiagonalMatrix(
            self.blocks.mT @ blocks @ self.blocks, self.last.mT @ last @ self.last
        )
        return new, trace(new.blocks).sum(-1) + trace(new.last)

    def gram(self) -> tuple[BlockDiagonalMatrix, Tensor]:
        r""":math:`\Pi(S^\top S)` and its trace ``[G]``."""
        new = BlockDiagonalMatrix(self.blocks.mT @ self.blocks, self.last.mT @ self.last)
        return new, trace(new.blocks).sum(-1) + trace(new.last)


class _TriangularMatrix(_DenseBacked, StructuredMatrix):
    """Packed triangular matrices: the free entries row by row, ``packed`` ``[G, d (d+1) / 2]``."""

    lower: bool

    def __init__(self, packed: Tensor) -> None:
        super().__init__(packed)
        self.packed = packed

    @property
    def dim(self) -> int:
        """:math:`d`."""
        return (math.isqrt(8 * self.packed.shape[-1] + 1) - 1) // 2

    @classmethod
    def indices(cls, dim: int, device: torch.device) -> Tensor:
        """The (row, column) indices ``[2, d (d+1) / 2]`` of the free entries."""
        make = torch.tril_indices if cls.lower else torch.triu_indices
        return make(dim, dim, device=device)

    def to_dense(self) -> Tensor:
        """Dense ``[G, d, d]``."""
        dim = self.dim
        rows, cols = self.indices(dim, self.packed.device)
        dense = self.packed.new_zeros(self.groups, dim, dim)
        dense[:, rows, cols] = self.packed
        return dense

    @classmethod
    def build(cls, matrix: Tensor) -> _TriangularMatrix:
        r""":math:`\Pi(M)` of ``matrix`` ``[G, d, d]``: its triangle, packed."""
        rows, cols = cls.indices(matrix.shape[-1], matrix.device)
        return cls(matrix[:, rows, cols])

    def from_dense(self, matrix: Tensor) -> _TriangularMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return self.build(matrix)

    @classmethod
    def build_symmetric(cls, matrix: Tensor) -> _TriangularMatrix:
        r""":math:`\hat\Pi(M)` of a symmetric ``matrix``: the triangle, off-diagonal doubled."""
        rows, cols = cls.indices(matrix.shape[-1], matrix.device)
        return cls(matrix[:, rows, cols] * (1.0 + (rows != cols).to(matrix.dtype)))

    def from_symmetric(self, matrix: Tensor) -> _TriangularMatrix:
        r""":math:`\hat\Pi(M)` for a symmetric ``matrix`` ``[G, d, d]``."""
        return self.build_symmetric(matrix)

    def matmul(self, matrix: Tensor) -> Tensor:
        """:math:`S M`, ``[G, d, n]``."""
        return self.to_dense() @ matrix

    def tmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`S^\top M`, ``[G, d, n]``."""
        return self.to_dense().mT @ matrix

    def product(self, other: StructuredMatrix) -> _TriangularMatrix:
        """:math:`S S'` in the structure."""
        return self.from_dense(self.to_dense() @ other.to_dense())

    def congruence(self, symmetric: Tensor) -> tuple[_TriangularMatrix, Tensor]:
        r""":math:`\hat\Pi(S^\top A S)` and its trace ``[G]``."""
        dense = self.to_dense()
        full = dense.mT @ symmetric @ dense
        return self.from_symmetric(full), trace(full)

    def frobenius_sq(self) -> Tensor:
        r""":math:`\|S\|_F^2` ``[G]``."""
        return self.packed.square().sum(-1)

    def gram(self) -> tuple[_TriangularMatrix, Tensor]:
        r""":math:`\hat\Pi(S^\top S)` and its trace ``[G]``."""
        dense = self.to_dense()
        return self.from_symmetric(dense.mT @ dense), self.packed.square().sum(-1)


class LowerTriangularMatrix(_TriangularMatrix):
    """Entries on and below the diagonal, packed ``[G, d (d+1) / 2]``."""

    name = "lower_triangular"
    lower = True


class UpperTriangularMatrix(_TriangularMatrix):
    """Entries on and above the diagonal, packed ``[G, d (d+1) / 2]``."""

    name = "upper_triangular"
    lower = False


class HierarchicalMatrix(StructuredMatrix):
    r"""SINGD's hierarchical structure, by its three parts.

    .. math::

        S = \begin{pmatrix} S_{11} & S_{12} & S_{13} \\ 0 & D & 0 \\ 0 & S_{32} & S_{33}
        \end{pmatrix}

    ``top`` ``[G, k1, d]`` (the first :math:`k_1` rows), ``diagonal`` ``[G, d - k1 - k2]``
    (:math:`D`) and ``bottom`` ``[G, k2, d - k1]`` (the last :math:`k_2` rows right of the
    first :math:`k_1` columns).
    """

    name = "hierarchical"

    def __init__(self, top: Tensor, diagonal: Tensor, bottom: Tensor) -> None:
        super().__init__(top, diagonal, bottom)
        self.top, self.diagonal, self.bottom = top, diagonal, bottom

    @property
    def dim(self) -> int:
        """:math:`d`."""
        return self.top.shape[-1]

    @property
    def sizes(self) -> tuple[int, int]:
        """:math:`(k_1, k_2)`."""
        return self.top.shape[1], self.bottom.shape[1]

    @staticmethod
    def split(matrix: Tensor, k1: int, k2: int) -> tuple[Tensor, Tensor, Tensor]:
        """``top``, ``diagonal``, ``bottom`` of ``[G, d, d]`` (sizes clipped to ``d``)."""
        dim = matrix.shape[-1]
        k1 = min(k1, dim)
        k2 = min(k2, dim - k1)
        middle = matrix.diagonal(dim1=-2, dim2=-1)[:, k1 : dim - k2]
        return matrix[:, :k1], middle, matrix[:, dim - k2 :, k1:]

    def to_dense(self) -> Tensor:
        """Dense ``[G, d, d]``."""
        (k1, k2), dim = self.sizes, self.dim
        dense = self.top.new_zeros(self.groups, dim, dim)
        dense[:, :k1] = self.top
        dense[:, dim - k2 :, k1:] = self.bottom
        index = torch.arange(k1, dim - k2, device=self.top.device)
        dense[:, index, index] = self.diagonal
        return dense

    @classmethod
    def build(cls, matrix: Tensor, k1: int, k2: int) -> HierarchicalMatrix:
        r""":math:`\Pi(M)` of ``matrix`` ``[G, d, d]``: its three parts."""
        return cls(*(_own(p) for p in cls.split(matrix, k1, k2)))

    def from_dense(self, matrix: Tensor) -> HierarchicalMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return self.build(matrix, *self.sizes)

    @classmethod
    def build_symmetric(cls, matrix: Tensor, k1: int, k2: int) -> HierarchicalMatrix:
        r""":math:`\hat\Pi(M)` of a symmetric ``matrix``: the parts whose mirror is not free doubled.

        Doubled: the top rows right of column :math:`k_1` and the bottom rows' middle columns;
        the two dense diagonal blocks and :math:`D` are kept.
        """
        top, middle, bottom = cls.split(matrix, k1, k2)
        k1, k2 = top.shape[1], bottom.shape[1]
        top = torch.cat([top[..., :k1], 2 * top[..., k1:]], dim=-1)
        inner = bottom.shape[-1] - k2
        bottom = torch.cat([2 * bottom[..., :inner], bottom[..., inner:]], dim=-1)
        return cls(top, _own(middle), bottom)

    def from_symmetric(self, matrix: Tensor) -> HierarchicalMatrix:
        r""":math:`\hat\Pi(M)` for a symmetric ``matrix`` ``[G, d, d]``."""
        return self.build_symmetric(matrix, *self.sizes)

    def matmul(self, matrix: Tensor) -> Tensor:
        """:math:`S M`, ``[G, d, n]``."""
        (k1, k2), dim = self.sizes, self.dim
        middle = self.diagonal[..., :, None] * matrix[:, k1 : dim - k2]
        return torch.cat([self.top @ matrix, middle, self.bottom @ matrix[:, k1:]], dim=1)

    def tmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`S^\top M`, ``[G, d, n]``."""
        (k1, k2), dim = self.sizes, self.dim
        out = self.top.mT @ matrix[:, :k1]  # [G, d, n]
        columns = matrix.shape[-1]
        middle = self.diagonal[..., :, None] * matrix[:, k1 : dim - k2]
        pad = matrix.new_zeros(self.groups, k1, columns)
        right = torch.cat([middle, matrix.new_zeros(self.groups, k2, columns)], dim=1)
        right = right + self.bottom.mT @ matrix[:, dim - k2 :]  # rows k1: of S^T M
        return out + torch.cat([pad, right], dim=1)


class TriuToeplitzMatrix(_DenseBacked, StructuredMatrix):
    r"""Upper-triangular Toeplitz, :math:`S_{ij} = t_{j-i}` for :math:`j \ge i`: ``row`` ``[G, d]``.

    These are the polynomials in the shift matrix, so products are truncated convolutions of
    the rows and stay in the structure.
    """

    name = "triu_toeplitz"

    def __init__(self, row: Tensor) -> None:
        super().__init__(row)
        self.row = row

    @property
    def dim(self) -> int:
        """:math:`d`."""
        return self.row.shape[-1]

    @staticmethod
    def offsets(dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``j - i`` clipped at zero ``[d, d]`` and the mask ``j >= i`` ``[d, d]``."""
        index = torch.arange(dim, device=device)
        offset = index[None, :] - index[:, None]
        return offset.clamp_min(0), offset >= 0

    def to_dense(self) -> Tensor:
        """Dense ``[G, d, d]``."""
        offset, upper = self.offsets(self.dim, self.row.device)
        return self.row[:, offset] * upper.to(self.dtype)

    @classmethod
    def build(cls, matrix: Tensor) -> TriuToeplitzMatrix:
        r""":math:`\Pi(M)` of ``matrix`` ``[G, d, d]``: the mean of each super-diagonal."""
        dim = matrix.shape[-1]
        offset, upper = cls.offsets(dim, matrix.device)
        flat = (matrix * upper.to(matrix.dtype)).reshape(matrix.shape[0], dim * dim)
        sums = flat.new_zeros(matrix.shape[0], dim).index_add_(-1, offset.reshape(-1), flat)
        counts = torch.arange(dim, 0, -1, device=matrix.device).to(matrix.dtype)
        return cls(sums / counts)

    def from_dense(self, matrix: Tensor) -> TriuToeplitzMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return self.build(matrix)

    @classmethod
    def build_symmetric(cls, matrix: Tensor) -> TriuToeplitzMatrix:
        r""":math:`\hat\Pi(M)` of a symmetric ``matrix``: the row of :math:`\Pi(M + M^\top)`, t_0 halved.

        :math:`t_0` is the diagonal's mean and :math:`t_k` twice the k-th super-diagonal's.
        """
        row = cls.build(matrix + matrix.mT).row
        return cls(torch.cat([row[:, :1] / 2, row[:, 1:]], dim=-1))

    def from_symmetric(self, matrix: Tensor) -> TriuToeplitzMatrix:
        r""":math:`\hat\Pi(M)` for a symmetric ``matrix`` ``[G, d, d]``."""
        return self.build_symmetric(matrix)

    def eye_like(self) -> TriuToeplitzMatrix:
        """The identity in this structure."""
        row = torch.zeros_like(self.row)
        row[:, 0] = 1
        return TriuToeplitzMatrix(row)

    def matmul(self, matrix: Tensor) -> Tensor:
        """:math:`S M`, ``[G, d, n]``."""
        return self.to_dense() @ matrix

    def tmatmul(self, matrix: Tensor) -> Tensor:
        r""":math:`S^\top M`, ``[G, d, n]``."""
        return self.to_dense().mT @ matrix

    def product(self, other: StructuredMatrix) -> TriuToeplitzMatrix:
        r"""The first row of :math:`S S'`: :math:`t \ast t'` truncated to :math:`d`."""
        return TriuToeplitzMatrix((self.row[:, None, :] @ other.to_dense())[:, 0])


class ProjectedDenseMatrix(DenseMatrix):
    """Dense storage with a user's projection (a :class:`Structure` with only ``project``)."""

    name = "projected"

    def __init__(self, matrix: Tensor, projection: Callable[[Tensor], Tensor]) -> None:
        super().__init__(matrix)
        self.projection = projection

    def like(self, *tensors: Tensor) -> ProjectedDenseMatrix:
        """A matrix of this class from new parameters."""
        return ProjectedDenseMatrix(tensors[0], self.projection)

    def from_dense(self, matrix: Tensor) -> ProjectedDenseMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return ProjectedDenseMatrix(self.projection(matrix), self.projection)

    def product(self, other: StructuredMatrix) -> ProjectedDenseMatrix:
        """:math:`S S'` in the structure."""
        return self.from_dense(self.matrix @ other.to_dense())

    def congruence(self, symmetric: Tensor) -> tuple[ProjectedDenseMatrix, Tensor]:
        r""":math:`\Pi(S^\top A S)` and its trace ``[G]``."""
        full = self.matrix.mT @ symmetric @ self.matrix
        return self.from_dense(full), trace(full)

    def gram(self) -> tuple[ProjectedDenseMatrix, Tensor]:
        r""":math:`\Pi(S^\top S)` and its trace ``[G]``."""
        return self.from_dense(self.matrix.mT @ self.matrix), self.matrix.square().sum((-2, -1))


# ----------------------------------------------------------------------------- recipes
def _check_size(value: object, label: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        requirement = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"SINGD: {label} must be {requirement}, got {value!r}")


class Structure:
    r"""A named structure: builds its :class:`StructuredMatrix` (identity, projection, wrap).

    A structure of your own needs only :meth:`project` on dense ``[G, d, d]`` (the result has
    the structure and ``project(project(M)) == project(M)``); it is then stored densely
    (:class:`ProjectedDenseMatrix`). The built-in ones store their parameters only.
    """

    name = "structure"

    def project(self, matrix: Tensor) -> Tensor:
        r""":math:`\Pi(M)` as a dense ``[G, d, d]`` for ``matrix`` ``[G, d, d]``."""
        raise NotImplementedError

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` as a structured matrix, for ``matrix`` ``[G, d, d]``."""
        return ProjectedDenseMatrix(self.project(matrix), self.project)

    def from_symmetric(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\hat\Pi(M)`, SINGD's map of a symmetric ``matrix`` ``[G, d, d]``.

        :meth:`StructuredMatrix.from_symmetric` of this structure's matrices (not on SINGD's
        path, which calls the matrices' own).
        """
        return self.from_dense(matrix).from_symmetric(matrix)

    def eye(
        self, groups: int, dim: int, dtype: torch.dtype, device: torch.device
    ) -> StructuredMatrix:
        """The identity ``[G, d, d]`` in this structure."""
        return self.from_dense(torch.eye(dim, dtype=dtype, device=device).expand(groups, dim, dim))

    def wrap(self, tensors: tuple[Tensor, ...]) -> StructuredMatrix:
        """The matrix whose parameters are ``tensors`` (a :attr:`StructuredMatrix.tensors`)."""
        return ProjectedDenseMatrix(tensors[0], self.project)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Builtin(Structure):
    matrix: type[StructuredMatrix]

    def project(self, matrix: Tensor) -> Tensor:
        return self.from_dense(matrix).to_dense()

    def wrap(self, tensors: tuple[Tensor, ...]) -> StructuredMatrix:
        return self.matrix(*tensors)


class Dense(_Builtin):
    """Every entry free (:class:`DenseMatrix`)."""

    name, matrix = "dense", DenseMatrix

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return DenseMatrix(matrix)


class Diagonal(_Builtin):
    """Only the diagonal (:class:`DiagonalMatrix`)."""

    name, matrix = "diagonal", DiagonalMatrix

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return DiagonalMatrix.build(matrix)


class BlockDiagonal(_Builtin):
    """Dense diagonal blocks of ``block_size``, the last one smaller if ``d`` is no multiple."""

    name, matrix = "block_diagonal", BlockDiagonalMatrix

    def __init__(self, block_size: int = 30) -> None:
        _check_size(block_size, "block_size", 1)
        self.block_size = block_size

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return BlockDiagonalMatrix.build(matrix, self.block_size)

    def __repr__(self) -> str:
        return f"BlockDiagonal(block_size={self.block_size})"


class LowerTriangular(_Builtin):
    """Entries on and below the diagonal (:class:`LowerTriangularMatrix`)."""

    name, matrix = "lower_triangular", LowerTriangularMatrix

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return LowerTriangularMatrix.build(matrix)


class UpperTriangular(_Builtin):
    """Entries on and above the diagonal (:class:`UpperTriangularMatrix`)."""

    name, matrix = "upper_triangular", UpperTriangularMatrix

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return UpperTriangularMatrix.build(matrix)


class Hierarchical(_Builtin):
    r"""SINGD's hierarchical structure (:class:`HierarchicalMatrix`).

    .. math::

        \begin{pmatrix} A_{11} & A_{12} & A_{13} \\ 0 & D & 0 \\ 0 & A_{32} & A_{33}
        \end{pmatrix}

    with the first ``k1`` rows dense, a diagonal :math:`D` in the middle and the last ``k2``
    rows dense right of the first ``k1`` columns (both sizes clipped to ``d``).
    """

    name, matrix = "hierarchical", HierarchicalMatrix

    def __init__(self, k1: int = 15, k2: int = 15) -> None:
        _check_size(k1, "hierarchical k1", 0)
        _check_size(k2, "hierarchical k2", 0)
        self.k1, self.k2 = k1, k2

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return HierarchicalMatrix.build(matrix, self.k1, self.k2)

    def __repr__(self) -> str:
        return f"Hierarchical(k1={self.k1}, k2={self.k2})"


class TriuToeplitz(_Builtin):
    r"""Upper-triangular Toeplitz, :math:`M_{ij} = t_{j - i}` for :math:`j \ge i`, 0 below.

    The projection averages each super-diagonal (:class:`TriuToeplitzMatrix`).
    """

    name, matrix = "triu_toeplitz", TriuToeplitzMatrix

    def from_dense(self, matrix: Tensor) -> StructuredMatrix:
        r""":math:`\Pi(M)` for ``matrix`` ``[G, d, d]``."""
        return TriuToeplitzMatrix.build(matrix)


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
"""The structures of SINGD's factors by name."""


def make_structure(
    name: str | Structure, block_size: int = 30, hierarchical_sizes: tuple[int, int] = (15, 15)
) -> Structure:
    """The structure object for a name of :data:`STRUCTURES` (or the object itself).

    Raises:
        ValueError: An unknown name (the message lists the known ones).
    """
    if isinstance(name, Structure):
        return name
    if name not in STRUCTURES:
        raise ValueError(f"SINGD: unknown structure {name!r}; known: {sorted(STRUCTURES)}")
    if name == "block_diagonal":
        return BlockDiagonal(block_size)
    if name == "hierarchical":
        return Hierarchical(*hierarchical_sizes)
    return STRUCTURES[name]()
