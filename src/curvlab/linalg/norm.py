r"""Hutchinson's estimate of the squared Frobenius norm of a matrix known by its products.

:math:`\|A\|_F^2 = \operatorname{tr}(A^\top A) = \mathbb{E}\,\|A z\|^2` for
:math:`\mathbb{E}[z z^\top] = I`, so the norm needs products with :math:`A` only, never with
:math:`A^\top`. For a symmetric :math:`A` it is :math:`\sum_i \lambda_i^2`, the second spectral
moment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.operator import apply, check_count, probe_vectors


def hutchinson_squared_fro(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson's estimate of :math:`\|A\|_F^2` from ``num_matvecs`` products.

    .. math::
        \|A\|_F^2 \approx \frac{1}{m} \sum_{i=1}^m \|A z_i\|^2,

    with variance :math:`\frac{2}{m} (\|B\|_F^2 - \sum_i B_{ii}^2)` for Rademacher and
    :math:`\frac{2}{m} \|B\|_F^2` for normal :math:`z_i`, where :math:`B = A^\top A`. One call
    of ``A @ Z``, ``Z`` ``[P, m]``.

    Args:
        A: The square operator ``[P, P]`` (``A @ V`` for ``V`` ``[P, K]``, and ``A.shape``).
        num_matvecs: :math:`m \ge 1`.
        distribution: ``"rademacher"`` or ``"normal"`` test vectors.
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        The estimate, a scalar tensor.
    """
    m = check_count("num_matvecs", num_matvecs, 1)
    Z = probe_vectors(A, m, distribution, generator)
    return apply(A, Z).square().sum() / m
