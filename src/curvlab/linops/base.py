r"""The one small interface of every curvature operator, and composition for free.

A :class:`CurvatureOperator` is a linear map :math:`A: \mathbb{R}^P \to \mathbb{R}^Q` between
spaces made of tensors of given shapes (parameter space: one shape per parameter; output space:
one shape per batch). A subclass implements **one batched product**, :meth:`_matmat` on a flat
``[P, K]`` tensor, and, unless it is self-adjoint, :meth:`_adjoint`. The base class gives
everything else:

* ``A @ v`` and ``A @ M`` on a flat ``[P]`` / ``[P, K]`` tensor or on a list of tensors shaped
  like :attr:`~CurvatureOperator.in_shapes` (a matrix with its ``K`` columns trailing:
  ``[*shape, K]``), returning the same form;
* ``v @ A`` (flat ``[Q]`` / ``[K, Q]``, or a list with ``K`` leading: ``[K, *shape]``);
* ``A + B``, ``A - B``, ``s * A``, ``A / s``, ``-A``, chaining ``A @ B``;
* :meth:`~CurvatureOperator.adjoint` (``A.T``), :meth:`~CurvatureOperator.dense`,
  :meth:`~CurvatureOperator.to_scipy`, :meth:`~CurvatureOperator.restrict`.

Flattening: each tensor row-major, concatenated in the order of the shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

Shapes = tuple[tuple[int, ...], ...]
"""The shapes of the tensors that make up a space, in flattening order."""

OperatorInput = Tensor | Sequence[Tensor]
"""A flat tensor ``[P]`` / ``[P, K]`` or a list of tensors, one per shape of the space."""


def _numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _as_shapes(shapes: Sequence[Sequence[int]]) -> Shapes:
    return tuple(tuple(int(d) for d in s) for s in shapes)


def _columns_from(value: OperatorInput, shapes: Shapes, who: str) -> tuple[Tensor, bool, bool]:
    """``value`` as flat columns ``[P, K]``; whether it was a list, whether it was a vector.

    List entries are ``[*shape]`` (a vector) or ``[*shape, K]`` (a matrix).
    """
    size = _numel(shapes)
    if isinstance(value, Tensor):
        if value.dim() not in (1, 2) or value.shape[0] != size:
            raise ValueError(
                f"{who}: expected a flat tensor [{size}] or [{size}, K], got {list(value.shape)}"
            )
        return (value[:, None] if value.dim() == 1 else value), False, value.dim() == 1
    tensors = list(value)
    if len(tensors) != len(shapes):
        raise ValueError(
            f"{who}: expected {len(shapes)} tensors shaped {[list(s) for s in shapes]}, "
            f"got {len(tensors)}"
        )
    vector = tuple(tensors[0].shape) == shapes[0]
    parts = []
    for t, shape in zip(tensors, shapes, strict=True):
        expected = shape if vector else (*shape, tensors[0].shape[-1])
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{who}: expected tensors shaped {[list(s) for s in shapes]} (with a trailing "
                f"column dimension for a matrix), got {[list(x.shape) for x in tensors]}"
            )
        parts.append(t.reshape(math.prod(shape), 1 if vector else t.shape[-1]))
    return torch.cat(parts), True, vector


def _columns_to(flat: Tensor, shapes: Shapes, as_list: bool, vector: bool) -> OperatorInput:
    """Inverse of :func:`_columns_from` for a result ``[Q, K]``."""
    if not as_list:
        return flat[:, 0] if vector else flat
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        part = flat[start : start + size]
        out.append(part.reshape(shape) if vector else part.reshape(*shape, flat.shape[1]))
        start += size
    return out


class CurvatureOperator:
    r"""A linear operator :math:`A` ``[Q, P]`` defined by one batched product.

    Subclasses call ``super().__init__`` with the spaces and implement :meth:`_matmat` (and
    :meth:`_adjoint` unless :attr:`self_adjoint`). Everything else (see the module docstring)
    comes from here.

    Args:
        in_shapes: Shapes of the tensors that make up the input space (``P`` entries in all).
        out_shapes: Shapes of the output space (``Q`` entries).
        dtype: The floating-point type of the products.
        device: Where the products run.
        in_names: Names of the input tensors (parameter names in parameter space) or ``None``.
        out_names: Names of the output tensors or ``None``.
    """

    #: Whether :math:`A^\top = A` (then :meth:`adjoint` returns the operator itself).
    self_adjoint: bool = False

    def __init__(
        self,
        in_shapes: Sequence[Sequence[int]],
        out_shapes: Sequence[Sequence[int]],
        dtype: torch.dtype,
        device: torch.device | str,
        in_names: Sequence[str] | None = None,
        out_names: Sequence[str] | None = None,
    ) -> None:
        self.in_shapes = _as_shapes(in_shapes)
        self.out_shapes = _as_shapes(out_shapes)
        self.dtype = dtype
        self.device = torch.device(device)
        self.in_names = None if in_names is None else tuple(in_names)
        self.out_names = None if out_names is None else tuple(out_names)

    # ------------------------------------------------------------------ the interface
    def _matmat(self, matrix: Tensor) -> Tensor:
        """The product with ``K`` columns at once: ``[P, K]`` to ``[Q, K]``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat")

    def _adjoint(self) -> CurvatureOperator:
        r"""The adjoint :math:`A^\top` as an operator (subclasses that are not self-adjoint)."""
        raise NotImplementedError(f"{type(self).__name__} has no adjoint")

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        """``(Q, P)``: the sizes of the output and input spaces."""
        return _numel(self.out_shapes), _numel(self.in_shapes)

    def __repr__(self) -> str:
        q, p = self.shape
        return f"{type(self).__name__}(shape=({q}, {p}), dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------ products
    def _prepare(self, matrix: Tensor) -> Tensor:
        return matrix.to(dtype=self.dtype, device=self.device)

    def __matmul__(self, other: OperatorInput | CurvatureOperator):
        """``A @ v``, ``A @ M`` (flat or as a list of tensors) or the chained operator ``A @ B``."""
        if isinstance(other, CurvatureOperator):
            return ProductOperator(self, other)
        columns, as_list, vector = _columns_from(other, self.in_shapes, f"{self!r} @ x")
        result = self._matmat(self._prepare(columns))
        return _columns_to(result, self.out_shapes, as_list, vector)

    def __rmatmul__(self, other: OperatorInput):
        """``v @ A`` for a flat ``[Q]`` / ``[K, Q]`` tensor or a list of ``[*s]`` / ``[K, *s]``."""
        if isinstance(other, Tensor):
            if other.dim() not in (1, 2):
                raise ValueError(f"x @ {self!r}: expected [Q] or [K, Q], got {list(other.shape)}")
            result = self.adjoint() @ other.T
            return result.T
        tensors = list(other)
        vector = len(tensors) > 0 and tuple(tensors[0].shape) == self.out_shapes[0]
        moved = [t if vector else t.movedim(0, -1) for t in tensors]
        result = self.adjoint() @ moved
        return result if vector else [t.movedim(-1, 0) for t in result]

    def dense(self) -> Tensor:
        """The matrix ``[Q, P]`` (``P`` products in one batched call: small problems only)."""
        _, p = self.shape
        return self._matmat(torch.eye(p, dtype=self.dtype, device=self.device))

    # ------------------------------------------------------------------ algebra
    def adjoint(self) -> CurvatureOperator:
        r"""The adjoint :math:`A^\top` ``[P, Q]``."""
        return self if self.self_adjoint else self._adjoint()

    @property
    def T(self) -> CurvatureOperator:  # noqa: N802 (as torch and numpy spell it)
        r"""The adjoint :math:`A^\top` (same as :meth:`adjoint`)."""
        return self.adjoint()

    def __add__(self, other: CurvatureOperator) -> CurvatureOperator:
        """The sum ``A + B`` of two operators between the same spaces."""
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return SumOperator([(1.0, self), (1.0, other)])

    def __sub__(self, other: CurvatureOperator) -> CurvatureOperator:
        """The difference ``A - B``."""
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return SumOperator([(1.0, self), (-1.0, other)])

    def __mul__(self, scale: float) -> CurvatureOperator:
        """``A * s`` for a scalar ``s``."""
        if isinstance(scale, Tensor) and scale.dim() == 0:
            scale = float(scale)
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return ScaledOperator(self, float(scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> CurvatureOperator:
        """``A / s`` for a scalar ``s``."""
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return ScaledOperator(self, 1.0 / scale)

    def __neg__(self) -> CurvatureOperator:
        """``-A``."""
        return ScaledOperator(self, -1.0)

    # ------------------------------------------------------------------ restriction
    def restrict(self, names: Sequence[str]) -> CurvatureOperator:
        r"""The block :math:`A_{SS}` of the named input (and output) tensors :math:`S`.

        Needs named spaces (parameter space). The generic form embeds the input with zeros and
        keeps the named rows; operators built from a model restrict their differentiation
        instead (no cost for the other parameters).

        Args:
            names: Names in :attr:`in_names`, in the order of the block's flattening.

        Returns:
            An operator between the spaces of the named tensors.
        """
        return Restriction(self, names)

    # ------------------------------------------------------------------ export
    def to_scipy(self, dtype: np.dtype | type | None = None):
        """A :class:`scipy.sparse.linalg.LinearOperator` that calls this operator.

        Args:
            dtype: NumPy dtype of the exported operator (default: the one of :attr:`dtype`).

        Returns:
            The SciPy operator with ``matvec``, ``matmat``, ``rmatvec`` and ``rmatmat``.
        """
        from scipy.sparse.linalg import LinearOperator

        np_dtype = (
            np.dtype(dtype) if dtype is not None else torch.empty(0, dtype=self.dtype).numpy().dtype
        )

        def wrap(op_fn: Callable[[], CurvatureOperator], transpose: bool):
            def apply(x: np.ndarray) -> np.ndarray:
                op = op_fn()
                flat = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
                vector = flat.dim() == 1
                columns = flat[:, None] if vector else flat
                result = op._matmat(columns)
                out = result[:, 0] if vector else result
                return out.detach().cpu().numpy().astype(np_dtype, copy=False)

            return apply

        return LinearOperator(
            self.shape,
            matvec=wrap(lambda: self, False),
            matmat=wrap(lambda: self, False),
            rmatvec=wrap(self.adjoint, True),
            rmatmat=wrap(self.adjoint, True),
            dtype=np_dtype,
        )


# ---------------------------------------------------------------------------- composition
def _check_same_spaces(a: CurvatureOperator, b: CurvatureOperator) -> None:
    if a.shape != b.shape:
        raise ValueError(f"cannot add {a!r} and {b!r}: shapes {a.shape} and {b.shape} differ")


class SumOperator(CurvatureOperator):
    r"""A linear combination :math:`\sum_i c_i A_i` of operators between the same spaces.

    Args:
        terms: Pairs ``(c_i, A_i)``.
    """

    def __init__(self, terms: Sequence[tuple[float, CurvatureOperator]]) -> None:
        flat: list[tuple[float, CurvatureOperator]] = []
        for coef, op in terms:
            if isinstance(op, SumOperator):
                flat += [(coef * c, o) for c, o in op.terms]
            else:
                flat.append((coef, op))
        first = flat[0][1]
        for _, op in flat[1:]:
            _check_same_spaces(first, op)
        super().__init__(
            first.in_shapes,
            first.out_shapes,
            first.dtype,
            first.device,
            first.in_names,
            first.out_names,
        )
        self.terms = flat
        self.self_adjoint = all(op.self_adjoint for _, op in flat)

    def _matmat(self, matrix: Tensor) -> Tensor:
        result = None
        for coef, op in self.terms:
            term = op._matmat(matrix)
            term = term if coef == 1.0 else coef * term
            result = term if result is None else result + term
        return result

    def _adjoint(self) -> CurvatureOperator:
        return SumOperator([(c, op.adjoint()) for c, op in self.terms])

    def restrict(self, names: Sequence[str]) -> CurvatureOperator:  # noqa: D102
        return SumOperator([(c, op.restrict(names)) for c, op in self.terms])


class ScaledOperator(CurvatureOperator):
    r"""The operator :math:`s A`.

    Args:
        operator: :math:`A`.
        scale: :math:`s`.
    """

    def __init__(self, operator: CurvatureOperator, scale: float) -> None:
        super().__init__(
            operator.in_shapes,
            operator.out_shapes,
            operator.dtype,
            operator.device,
            operator.in_names,
            operator.out_names,
        )
        self.operator, self.scale = operator, scale
        self.self_adjoint = operator.self_adjoint

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.scale * self.operator._matmat(matrix)

    def _adjoint(self) -> CurvatureOperator:
        return ScaledOperator(self.operator.adjoint(), self.scale)

    def restrict(self, names: Sequence[str]) -> CurvatureOperator:  # noqa: D102
        return ScaledOperator(self.operator.restrict(names), self.scale)


class ProductOperator(CurvatureOperator):
    r"""The chained operator :math:`A B` (first :math:`B`, then :math:`A`).

    Args:
        left: :math:`A` ``[Q, R]``.
        right: :math:`B` ``[R, P]``.
    """

    def __init__(self, left: CurvatureOperator, right: CurvatureOperator) -> None:
        if left.shape[1] != right.shape[0]:
            raise ValueError(
                f"cannot chain {left!r} @ {right!r}: inner sizes {left.shape[1]} "
                f"and {right.shape[0]} differ"
            )
        super().__init__(
            right.in_shapes,
            left.out_shapes,
            left.dtype,
            left.device,
            right.in_names,
            left.out_names,
        )
        self.left, self.right = left, right

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.left._matmat(self.right._matmat(matrix))

    def _adjoint(self) -> CurvatureOperator:
        return ProductOperator(self.right.adjoint(), self.left.adjoint())


class IdentityOperator(CurvatureOperator):
    """The identity on a space of tensors of the given shapes.

    Args:
        shapes: The space's tensor shapes.
        dtype: The floating-point type.
        device: The device.
        names: Optional names of the tensors (parameter names).
    """

    self_adjoint = True

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(shapes, shapes, dtype, device, names, names)

    def _matmat(self, matrix: Tensor) -> Tensor:
        return matrix

    def restrict(self, names: Sequence[str]) -> CurvatureOperator:  # noqa: D102
        index = _name_index(self, names)
        shapes = [self.in_shapes[i] for i in index]
        return IdentityOperator(shapes, self.dtype, self.device, names)


class DenseOperator(CurvatureOperator):
    """An explicit matrix ``[Q, P]`` as an operator (tests, small problems, preconditioners).

    Args:
        matrix: The matrix ``[Q, P]``.
        in_shapes: Input shapes (default ``[(P,)]``).
        out_shapes: Output shapes (default ``[(Q,)]``).
        names: Names of a square matrix's tensors (both sides), or ``None``.
    """

    def __init__(
        self,
        matrix: Tensor,
        in_shapes: Sequence[Sequence[int]] | None = None,
        out_shapes: Sequence[Sequence[int]] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        q, p = matrix.shape
        super().__init__(
            in_shapes or [(p,)], out_shapes or [(q,)], matrix.dtype, matrix.device, names, names
        )
        self.matrix = matrix

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.matrix @ matrix

    def _adjoint(self) -> CurvatureOperator:
        return DenseOperator(self.matrix.T, self.out_shapes, self.in_shapes, self.in_names)


def _name_index(op: CurvatureOperator, names: Sequence[str]) -> list[int]:
    if op.in_names is None or op.out_names != op.in_names:
        raise TypeError(
            f"{op!r} has no named parameter space to restrict "
            "(restrict needs equal named input and output spaces)"
        )
    unknown = [n for n in names if n not in op.in_names]
    if unknown or not names:
        raise KeyError(
            f"cannot restrict {op!r} to {list(names)}: unknown {unknown}; "
            f"known: {list(op.in_names)}"
        )
    return [op.in_names.index(n) for n in names]


def _offsets(shapes: Shapes) -> list[int]:
    starts, total = [], 0
    for s in shapes:
        starts.append(total)
        total += math.prod(s)
    return starts


class Restriction(CurvatureOperator):
    r"""The block :math:`A_{SS}` of a square, named operator (zero-embedding, then row selection).

    Args:
        operator: :math:`A` with ``in_names == out_names``.
        names: The names :math:`S` of the block, in its flattening order.
    """

    def __init__(self, operator: CurvatureOperator, names: Sequence[str]) -> None:
        index = _name_index(operator, names)
        shapes = [operator.in_shapes[i] for i in index]
        super().__init__(shapes, shapes, operator.dtype, operator.device, names, names)
        self.operator = operator
        self.self_adjoint = operator.self_adjoint
        starts = _offsets(operator.in_shapes)
        rows = [
            torch.arange(starts[i], starts[i] + math.prod(operator.in_shapes[i])) for i in index
        ]
        self._rows = torch.cat(rows).to(operator.device)

    def _matmat(self, matrix: Tensor) -> Tensor:
        full = matrix.new_zeros(self.operator.shape[1], matrix.shape[1])
        full[self._rows] = matrix
        return self.operator._matmat(full)[self._rows]

    def _adjoint(self) -> CurvatureOperator:
        return Restriction(self.operator.adjoint(), self.in_names)
