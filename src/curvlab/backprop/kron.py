r"""Typed curvature blocks: Kronecker-factored (:class:`KronFactors`) and whole (:class:`DenseBlock`).

``KFAC``, ``KFLR`` and ``KFRA`` return one block per parameter (a block that covers a weight
and its bias jointly is the same object under both names). Every block offers the same
interface, so that an optimizer or an operator never needs to know the layer's layout:

* :meth:`~KronFactors.dense` — the ``[P, P]`` matrix in the row-major flattening of the
  covered parameters, concatenated in the order of :attr:`~KronFactors.names`;
* :meth:`~KronFactors.matvec` and :meth:`~KronFactors.solve` on parameter-shaped tensors;
* :meth:`~KronFactors.eigh` (the eigenbasis that EKFAC uses);
* ``a + b`` and ``s * a``, factor by factor, so that a running average
  ``avg = beta * avg + (1 - beta) * new`` is plain arithmetic.

**Kronecker convention.** Each layer's parameter is viewed, per group ``g`` of a grouped
layer, as a matrix :math:`M_g` ``[b, a]`` (output side by input side): ``Linear`` and ``Conv``
weights as ``weight.reshape(G, out/G, -1)``; a ``ConvTranspose`` weight ``[in, out/G, *K]`` as
``[out/G, in/G * K]`` per group; an ``Embedding`` weight ``[V, D]`` as its transpose
``[D, V]``; a bias as a column ``[out, 1]``; a weight with its bias (option
``separate_weight_and_bias=False``) as ``[W_g \mid b_g]`` ``[b, a + 1]``. The block is
:math:`\bigoplus_g A_g \otimes B_g` in the column-major :math:`\mathrm{vec}(M_g)`, i.e.
``torch.kron(B_g, A_g)`` in the row-major one, with :math:`A` the input factor ``[G, a, a]``
and :math:`B` the output factor ``[G, b, b]``; :meth:`~KronFactors.dense` maps it back to the
parameters' own flattening.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from curvlab.backprop.rules.base import KronSums

ParamValue = Tensor | Sequence[Tensor]
"""A parameter-shaped tensor (optionally with one leading batch dimension ``K``), or one such
tensor per covered parameter (joint blocks), in the order of the block's ``names``."""


# ------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    r"""How the covered parameters map to the per-group matrices :math:`M_g` ``[G, b, a]``.

    Attributes:
        kind: ``"rows"`` (``[out, in/G, *K]``: Linear, Conv), ``"transposed"`` (``[in, out/G,
            *K]``: ConvTranspose), ``"columns"`` (``[V, D]``: Embedding) or ``"bias"``.
        shapes: The covered parameters' shapes (a joint block: weight, then bias).
        groups: Number of groups ``G``.
    """

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    groups: int = 1

    @property
    def joint(self) -> bool:
        """Whether the block covers a weight and its bias (the bias is the last column)."""
        return len(self.shapes) == 2

    @property
    def numel(self) -> int:
        """Number of entries ``P`` of the covered parameters."""
        return sum(math.prod(s) for s in self.shapes)

    def weight_matrix(self, w: Tensor, lead: int) -> Tensor:
        """``w`` ``[*lead, *shape]`` as ``[*lead, G, b, a]``."""
        batch, shape, g = w.shape[:lead], w.shape[lead:], self.groups
        if self.kind == "rows":
            return w.reshape(*batch, g, shape[0] // g, -1)
        if self.kind == "transposed":
            k = math.prod(shape[2:])
            grouped = w.reshape(*batch, g, shape[0] // g, shape[1], k)
            return grouped.transpose(-3, -2).reshape(*batch, g, shape[1], -1)
        if self.kind == "columns":
            return w.transpose(-2, -1).unsqueeze(-3)
        return w.reshape(*batch, 1, -1, 1)  # bias

    def weight_from_matrix(self, m: Tensor, lead: int) -> Tensor:
        """Inverse of :meth:`weight_matrix` for the first covered shape."""
        batch, shape, g = m.shape[:lead], self.shapes[0], self.groups
        if self.kind == "transposed":
            k = math.prod(shape[2:])
            grouped = m.reshape(*batch, g, shape[1], shape[0] // g, k).transpose(-3, -2)
            return grouped.reshape(*batch, *shape)
        if self.kind == "columns":
            return m.squeeze(-3).transpose(-2, -1).reshape(*batch, *shape)
        return m.reshape(*batch, *shape)

    def to_matrix(self, tensors: Sequence[Tensor], lead: int) -> Tensor:
        """The covered parameters' values ``[*lead, *shape]`` as ``[*lead, G, b, a]``."""
        m = self.weight_matrix(tensors[0], lead)
        if not self.joint:
            return m
        bias = tensors[1].reshape(*m.shape[:-1], 1)
        return torch.cat([m, bias], dim=-1)

    def from_matrix(self, m: Tensor, lead: int) -> list[Tensor]:
        """Inverse of :meth:`to_matrix`: one tensor per covered parameter."""
        if not self.joint:
            return [self.weight_from_matrix(m, lead)]
        batch = m.shape[:lead]
        weight = self.weight_from_matrix(m[..., :-1], lead)
        return [weight, m[..., -1].reshape(*batch, *self.shapes[1])]

    def index_matrix(self, device: torch.device | None = None) -> Tensor:
        """``[G, b, a]``: the flat index (in the concatenated flattening) of each entry."""
        flat = torch.arange(self.numel, device=device)
        parts, start = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            parts.append(flat[start : start + size].reshape(shape))
            start += size
        return self.to_matrix(parts, 0)


class KronEigen(NamedTuple):
    r"""Eigendecompositions of the two factors of a :class:`KronFactors` (per group).

    The block's eigenvectors are :math:`Q^B_i \otimes Q^A_j` with eigenvalues
    :math:`\lambda^B_i \lambda^A_j` (EKFAC rescales them).
    """

    input_values: Tensor
    input_vectors: Tensor
    output_values: Tensor
    output_vectors: Tensor


# ---------------------------------------------------------------------------- the types
def _as_tensors(value: ParamValue, count: int, who: str) -> tuple[list[Tensor], bool]:
    """Normalize ``value`` to a list of ``count`` tensors; ``True`` if it was a bare tensor."""
    if isinstance(value, Tensor):
        if count != 1:
            raise ValueError(f"{who} covers {count} parameters: pass one tensor per parameter")
        return [value], True
    tensors = list(value)
    if len(tensors) != count:
        raise ValueError(f"{who} covers {count} parameters, got {len(tensors)} tensors")
    return tensors, False


def _lead(tensors: list[Tensor], shapes: tuple[tuple[int, ...], ...], who: str) -> int:
    """Number of leading batch dimensions (0 or 1) of parameter-shaped ``tensors``."""
    lead = tensors[0].dim() - len(shapes[0])
    for t, shape in zip(tensors, shapes, strict=True):
        if lead not in (0, 1) or tuple(t.shape[lead:]) != shape:
            raise ValueError(
                f"{who}: expected tensors shaped {[list(s) for s in shapes]} (optionally with one "
                f"leading batch dimension), got {[list(x.shape) for x in tensors]}"
            )
    return lead


@dataclass
class KronFactors:
    r"""A Kronecker-factored curvature block :math:`\bigoplus_g A_g \otimes B_g`.

    Attributes:
        input_factor: :math:`A` ``[G, a, a]``: for KFAC-expand
            :math:`\frac{1}{NT}\sum_{n,t} u_{nt} u_{nt}^\top` (``u``: the layer input at the
            ``T`` positions that share the weight, with a trailing ``1`` for a joint bias);
            ``[[1]]`` for a bias alone.
        output_factor: :math:`B` ``[G, b, b]``, the output side, including the batch factor
            :math:`r`.
        layout: How the covered parameters map to the factors (:class:`Layout`).
        names: The covered parameters' names in ``model.named_parameters()``.
        num_samples: ``N``, the samples behind the statistics.
        input_count: The number of rows behind :math:`A` (``N * T`` for expand, ``N`` for
            reduce), so that ``input_factor * input_count`` is the unnormalized sum.
        batch_factor: :math:`r` (``1/N`` for a mean loss, ``1`` for a sum), so that
            ``output_factor / batch_factor`` is the unnormalized sum.
    """

    input_factor: Tensor
    output_factor: Tensor
    layout: Layout
    names: tuple[str, ...]
    num_samples: int
    input_count: int
    batch_factor: float
    _eigen: KronEigen | None = field(default=None, repr=False, compare=False)

    @property
    def groups(self) -> int:
        """Number of groups ``G`` (one factor pair per group)."""
        return self.input_factor.shape[0]

    @property
    def input_sum(self) -> Tensor:
        r"""The unnormalized input statistic :math:`\sum u u^\top` (``input_factor * count``)."""
        return self.input_factor * self.input_count

    @property
    def output_sum(self) -> Tensor:
        r"""The unnormalized output statistic :math:`\sum s s^\top` (``output_factor / r``)."""
        return self.output_factor / self.batch_factor

    def dense(self) -> Tensor:
        """The block ``[P, P]`` in the covered parameters' concatenated row-major flattening."""
        a, b = self.input_factor, self.output_factor
        g, na, nb = a.shape[0], a.shape[-1], b.shape[-1]
        blocks = torch.einsum("gij,gkl->gikjl", b, a).reshape(g, nb * na, nb * na)
        index = self.layout.index_matrix(a.device).reshape(g, -1)
        out = a.new_zeros(self.layout.numel, self.layout.numel)
        out[index[:, :, None], index[:, None, :]] = blocks
        return out

    def _apply(self, value: ParamValue, left: Tensor, right: Tensor) -> ParamValue:
        tensors, bare = _as_tensors(value, len(self.names), f"block of {self.names}")
        lead = _lead(tensors, self.layout.shapes, f"block of {self.names}")
        m = self.layout.to_matrix(tensors, lead)
        out = self.layout.from_matrix(left @ m @ right, lead)
        return out[0] if bare else out

    def matvec(self, value: ParamValue) -> ParamValue:
        r"""The block times ``value``: :math:`B_g M_g A_g` per group, shaped like ``value``."""
        return self._apply(value, self.output_factor, self.input_factor)

    def eigh(self) -> KronEigen:
        """Eigendecompositions of :math:`A` and :math:`B` per group (computed once)."""
        if self._eigen is None:
            la, qa = torch.linalg.eigh(self.input_factor)
            lb, qb = torch.linalg.eigh(self.output_factor)
            self._eigen = KronEigen(la, qa, lb, qb)
        return self._eigen

    def solve(
        self, value: ParamValue, damping: float = 0.0, pi_damping: bool = False
    ) -> ParamValue:
        r"""Apply the inverse of the damped block to ``value``.

        Args:
            value: Parameter-shaped tensor(s), see :data:`ParamValue`.
            damping: :math:`\lambda \ge 0`.
            pi_damping: ``False``: the exact :math:`(A \otimes B + \lambda I)^{-1}` through the
                factors' eigendecompositions. ``True``: the heuristic factored damping of
                Martens & Grosse (2015), :math:`(A + \pi\sqrt\lambda I)^{-1} \otimes
                (B + \frac{\sqrt\lambda}{\pi} I)^{-1}` with :math:`\pi^2 = \frac{\mathrm{tr}(A)
                / a}{\mathrm{tr}(B) / b}`.

        Returns:
            The solution, shaped like ``value``.
        """
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        la, qa, lb, qb = self.eigh()  # cached: every solve after the first is two rotations
        tensors, bare = _as_tensors(value, len(self.names), f"block of {self.names}")
        lead = _lead(tensors, self.layout.shapes, f"block of {self.names}")
        m = self.layout.to_matrix(tensors, lead)
        if pi_damping:  # the factored damping, in the same eigenbases
            a, b = self.input_factor, self.output_factor
            ta = a.diagonal(dim1=-2, dim2=-1).mean(-1)
            tb = b.diagonal(dim1=-2, dim2=-1).mean(-1)
            pi = (ta / tb).sqrt()[:, None]
            root = math.sqrt(damping)
            denominator = (lb + root / pi)[..., :, None] * (la + pi * root)[..., None, :]
        else:
            denominator = lb[..., :, None] * la[..., None, :] + damping
        rotated = (qb.transpose(-2, -1) @ m @ qa) / denominator
        out = self.layout.from_matrix(qb @ rotated @ qa.transpose(-2, -1), lead)
        return out[0] if bare else out

    def _check_same(self, other: KronFactors) -> None:
        if not isinstance(other, KronFactors) or other.layout != self.layout:
            raise TypeError(f"cannot combine the block of {self.names} with {other!r}")

    def __add__(self, other: KronFactors) -> KronFactors:
        """Factor-wise sum (the statistics of both, not the sum of the two products)."""
        self._check_same(other)
        return replace(
            self,
            input_factor=self.input_factor + other.input_factor,
            output_factor=self.output_factor + other.output_factor,
            num_samples=self.num_samples + other.num_samples,
            input_count=self.input_count + other.input_count,
            _eigen=None,
        )

    def __mul__(self, scale: float) -> KronFactors:
        """Factor-wise scaling (``dense()`` of the result scales by ``scale ** 2``)."""
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return replace(
            self,
            input_factor=self.input_factor * scale,
            output_factor=self.output_factor * scale,
            _eigen=None,
        )

    __rmul__ = __mul__


@dataclass
class DenseBlock:
    r"""A whole curvature block ``[P, P]`` (a layer without Kronecker structure).

    Normalization layers, and any module without a Kronecker rule, get the exact (or MC) GGN
    block of the parameter; it offers :class:`KronFactors`'s interface.

    Attributes:
        matrix: The block ``[P, P]`` in the parameter's row-major flattening (includes ``r``).
        shapes: The covered parameters' shapes.
        names: Their names.
        num_samples: ``N``.
        batch_factor: :math:`r`.
    """

    matrix: Tensor
    shapes: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    num_samples: int
    batch_factor: float
    _eigen: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def dense(self) -> Tensor:
        """The block ``[P, P]``."""
        return self.matrix

    def _flat(self, value: ParamValue) -> tuple[Tensor, int, bool]:
        tensors, bare = _as_tensors(value, len(self.names), f"block of {self.names}")
        lead = _lead(tensors, self.shapes, f"block of {self.names}")
        flat = torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=-1)
        return flat, lead, bare

    def _unflat(self, flat: Tensor, lead: int, bare: bool) -> ParamValue:
        out, start = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(flat[..., start : start + size].reshape(*flat.shape[:lead], *shape))
            start += size
        return out[0] if bare else out

    def matvec(self, value: ParamValue) -> ParamValue:
        """The block times ``value``, shaped like ``value``."""
        flat, lead, bare = self._flat(value)
        return self._unflat(flat @ self.matrix, lead, bare)  # symmetric

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``[P]`` and eigenvectors ``[P, P]`` (computed once)."""
        if self._eigen is None:
            self._eigen = torch.linalg.eigh(self.matrix)
        return self._eigen

    def solve(
        self, value: ParamValue, damping: float = 0.0, pi_damping: bool = False
    ) -> ParamValue:
        r"""Apply :math:`(G + \lambda I)^{-1}` (``pi_damping`` has no factors to split: ignored)."""
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        values, vectors = self.eigh()
        flat, lead, bare = self._flat(value)
        solved = ((flat @ vectors) / (values + damping)) @ vectors.T
        return self._unflat(solved, lead, bare)

    def __add__(self, other: DenseBlock) -> DenseBlock:
        """Sum of two blocks of the same parameters."""
        if not isinstance(other, DenseBlock) or other.shapes != self.shapes:
            raise TypeError(f"cannot combine the block of {self.names} with {other!r}")
        return replace(
            self,
            matrix=self.matrix + other.matrix,
            num_samples=self.num_samples + other.num_samples,
            _eigen=None,
        )

    def __mul__(self, scale: float) -> DenseBlock:
        """The block times ``scale``."""
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return replace(self, matrix=self.matrix * scale, _eigen=None)

    __rmul__ = __mul__


def kron_block(
    sums: KronSums,
    layout: Layout,
    names: tuple[str, ...],
    num_samples: int,
    batch_factor: float,
    output_scale: float | None = None,
) -> KronFactors:
    r"""The typed block from unnormalized statistics.

    Args:
        sums: The statistics (a joint block reads the weight's ``input_total``).
        layout: The covered parameters' layout.
        names: Their full names.
        num_samples: ``N``.
        batch_factor: :math:`r`.
        output_scale: The factor that turns ``sums.output_sum`` into ``B`` (default :math:`r`).

    Returns:
        :math:`A = \text{input sum} / \text{count}` (bias: ``[[1]]``; joint: the input with a
        trailing one), :math:`B = \text{output scale} \cdot \text{output sum}`.
    """
    out = sums.output_sum
    b = (batch_factor if output_scale is None else output_scale) * out
    b = b.unsqueeze(0) if b.dim() == 2 else b
    if layout.kind == "bias":
        a = out.new_ones(1, 1, 1)
    else:
        s = sums.input_sum.unsqueeze(0) if sums.input_sum.dim() == 2 else sums.input_sum
        if layout.joint:
            total = sums.input_total.reshape(s.shape[0], -1, 1)
            count = torch.full_like(total[:, :1], float(sums.input_count))
            top = torch.cat([s, total], dim=-1)
            s = torch.cat([top, torch.cat([total.transpose(1, 2), count], dim=-1)], dim=1)
        a = s / sums.input_count
    return KronFactors(a, b, layout, names, num_samples, sums.input_count, batch_factor)


CurvatureBlock = KronFactors | DenseBlock
"""What ``KFAC``, ``KFLR`` and ``KFRA`` return per parameter."""


def pool(blocks: Sequence[CurvatureBlock], batch_factor: float) -> CurvatureBlock:
    r"""The block of the union of several batches' data, from the blocks of the batches.

    ``+`` averages factors (running averages); pooling adds the *statistics*:
    :math:`A = \sum_b S^A_b / \sum_b c_b` over the batches' input sums and counts, and
    :math:`B = r \sum_b S^B_b` with :math:`r` the batch factor of the union (``1 / N`` of all
    the samples for a mean loss, ``1`` for a sum). For blocks of one batch each this gives the
    block of one pass over all the data (the data-loader and data-parallel case).

    Args:
        blocks: Blocks of the same parameters, one per batch.
        batch_factor: :math:`r` of the union.

    Returns:
        One block of the same type.
    """
    first = blocks[0]
    samples = sum(b.num_samples for b in blocks)
    if isinstance(first, DenseBlock):
        total = sum(b.matrix / b.batch_factor for b in blocks)
        return replace(
            first,
            matrix=batch_factor * total,
            num_samples=samples,
            batch_factor=batch_factor,
            _eigen=None,
        )
    if any(b.layout != first.layout for b in blocks):
        raise TypeError(f"cannot pool blocks of different layouts for {first.names}")
    count = sum(b.input_count for b in blocks)
    a = first.input_factor
    if first.layout.kind != "bias":
        a = sum(b.input_sum for b in blocks) / count
    return replace(
        first,
        input_factor=a,
        output_factor=batch_factor * sum(b.output_sum for b in blocks),
        num_samples=samples,
        input_count=count,
        batch_factor=batch_factor,
        _eigen=None,
    )
