r"""Gram matrices :math:`U U^\top` at about 60 % of a general product's arithmetic.

A Gram matrix is symmetric, so only its lower block triangle needs products: with the rows of
``U`` in :math:`b` blocks, :math:`b (b + 1) / 2` of the :math:`b^2` block products are formed
and the upper blocks are mirrored. Kronecker factors (:math:`\sum_n x_n x_n^\top`, the
KFAC-expand factor of a convolution) are such products, with few rows and many columns.
"""

from __future__ import annotations

from torch import Tensor

MIN_BLOCK_ROWS = 144
"""Blocks are no smaller than this (smaller products run below peak speed)."""
MAX_BLOCKS = 4
"""More blocks save little arithmetic (the limit is one half) and cost speed per product."""
MIN_COLUMNS_PER_ROW = 4
"""Blocks only if ``K >= 4 D``: short products of thin blocks run too far below peak speed."""


def gram(u: Tensor) -> Tensor:
    r""":math:`U U^\top` of ``u`` ``[..., D, K]``, ``[..., D, D]``.

    Rows are split into :math:`b = \min(4, \lfloor D / 144 \rfloor)` blocks; one block (a
    single product) for :math:`D < 288` or :math:`K < 4 D`. The block products
    :math:`U_i U_j^\top` with :math:`j \le i` are formed and :math:`U_j U_i^\top =
    (U_i U_j^\top)^\top` is copied: :math:`b(b+1)/(2b^2)` of the arithmetic (62.5 % for four
    blocks).

    Args:
        u: ``[..., D, K]``; any strides (e.g. ``x.T`` for :math:`X^\top X`).

    Returns:
        The Gram matrix of the rows, a new tensor.
    """
    if u.dim() < 2:
        raise ValueError(f"gram needs a [..., D, K] tensor, got shape {tuple(u.shape)}")
    d = u.shape[-2]
    blocks = min(MAX_BLOCKS, d // MIN_BLOCK_ROWS)
    if blocks < 2 or u.shape[-1] < MIN_COLUMNS_PER_ROW * d:
        return u @ u.transpose(-1, -2)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    parts = [u[..., edges[i] : edges[i + 1], :] for i in range(blocks)]
    out = u.new_empty(*u.shape[:-1], d)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i + 1):
            cols = slice(edges[j], edges[j + 1])
            block = parts[i] @ parts[j].transpose(-1, -2)
            out[..., rows, cols] = block
            if i != j:
                out[..., cols, rows] = block.transpose(-1, -2)
    return out
