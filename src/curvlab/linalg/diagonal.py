r"""Hutchinson's estimate of the diagonal of a matrix known by its products.

The diagonal of a curvature matrix is what diagonal preconditioners and Cockpit-style trace
instruments need; when no exact rule gives it, random products do: entry :math:`i` of
:math:`z \odot A z` has mean :math:`A_{ii}` when :math:`\mathbb{E}[z z^\top] = I`.

Reference:
    Bekas, Kokiopoulou & Saad, *An estimator for the diagonal of a matrix* (2007).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.operator import apply, check_count, probe_vectors


def hutchinson_diag(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson's estimate of the diagonal :math:`\operatorname{diag}(A)` ``[P]``.

    .. math::
        \operatorname{diag}(A) \approx \frac{1}{m} \sum_{i=1}^m z_i \odot A z_i,

    entry :math:`j` with variance :math:`\frac{1}{m} \sum_{l \ne j} A_{jl}^2` for Rademacher
    :math:`z_i` (exact for a diagonal :math:`A`) and :math:`\frac{1}{m} (\sum_l A_{jl}^2 +
    A_{jj}^2)` for normal ones (symmetric :math:`A`). One call of ``A @ Z``, ``Z`` ``[P, m]``.

    Args:
        A: The square operator ``[P, P]`` (``A @ V`` for ``V`` ``[P, K]``, and ``A.shape``).
        num_matvecs: :math:`m \ge 1`.
        distribution: ``"rademacher"`` or ``"normal"`` test vectors.
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        The estimate ``[P]``.
    """
    m = check_count("num_matvecs", num_matvecs, 1)
    Z = probe_vectors(A, m, distribution, generator)
    return (Z * apply(A, Z)).sum(1) / m
