r"""Randomized trace estimators: Hutchinson, Hutch++ and XTrace.

Each takes a budget of ``num_matvecs`` products with :math:`A` ``[P, P]`` and spends it in as few
calls of ``A @ V`` as the method allows (one for Hutchinson, two for Hutch++ and XTrace). For
symmetric :math:`A` (every curvature matrix) all three are unbiased; Hutch++ and XTrace first
capture the dominant part of the spectrum with a randomized range finder, so on matrices with
decaying eigenvalues their error falls like :math:`1/m` instead of :math:`1/\sqrt{m}` in the
number :math:`m` of products.

References:
    Hutchinson, *A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines* (1989). Meyer, Musco, Musco & Woodruff, *Hutch++: optimal stochastic
    trace estimation* (SOSA 2021). Epperly, Tropp & Webber, *XTrace: making the most of every
    sample in stochastic trace estimation* (SIMAX 2024).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.operator import apply, check_count, probe_vectors


def hutchinson_trace(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson's estimate of :math:`\operatorname{tr}(A)` from ``num_matvecs`` products.

    .. math::
        \operatorname{tr}(A) \approx \frac{1}{m} \sum_{i=1}^m z_i^\top A z_i,
        \qquad \mathbb{E}[z_i z_i^\top] = I,

    with variance :math:`\frac{2}{m} (\|A\|_F^2 - \sum_i A_{ii}^2)` for Rademacher and
    :math:`\frac{2}{m} \|A\|_F^2` for normal :math:`z_i` (symmetric :math:`A`). One call of
    ``A @ Z`` with ``Z`` ``[P, m]``.

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
    return (Z * apply(A, Z)).sum() / m


def hutchpp_trace(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The Hutch++ estimate of :math:`\operatorname{tr}(A)` from ``num_matvecs`` products.

    With :math:`k = \lfloor m / 3 \rfloor` sketch vectors :math:`S` ``[P, k]`` and
    :math:`g = m - 2k` test vectors :math:`G` ``[P, g]``: :math:`Q` ``[P, k]`` is an orthonormal
    basis of :math:`A S`, the trace of :math:`A` on its range is exact, and Hutchinson estimates
    the rest,

    .. math::
        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
        + \frac{1}{g} \operatorname{tr}\bigl(G^\top (I - Q Q^\top) A (I - Q Q^\top) G\bigr).

    Two calls of ``A @ V``: ``[P, k]``, then ``[Q, (I - Q Q^\top) G]`` ``[P, k + g]``.

    Args:
        A: The square operator ``[P, P]``.
        num_matvecs: :math:`m \ge 3`.
        distribution: ``"rademacher"`` or ``"normal"`` sketch and test vectors.
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        The estimate, a scalar tensor.
    """
    m = check_count("num_matvecs", num_matvecs, 3)
    k = m // 3
    Q = torch.linalg.qr(apply(A, probe_vectors(A, k, distribution, generator))).Q  # [P, min(P, k)]
    G = probe_vectors(A, m - 2 * k, distribution, generator)
    G = G - Q @ (Q.T @ G)
    AW = apply(A, torch.cat([Q, G], dim=1))
    AQ, AG = AW[:, : Q.shape[1]], AW[:, Q.shape[1] :]
    return (Q * AQ).sum() + (G * AG).sum() / G.shape[1]


def xtrace(
    A: Any,
    num_matvecs: int,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The XTrace estimate of :math:`\operatorname{tr}(A)` (Epperly, Tropp & Webber 2024).

    With :math:`s = \lfloor m / 2 \rfloor` test vectors :math:`\Omega = [\omega_1, \dots,
    \omega_s]`, the exchangeable estimator averages, over :math:`i`, the Hutch++-type estimate
    that uses every vector but :math:`\omega_i` for the range finder and :math:`\omega_i` for
    the remainder:

    .. math::
        \operatorname{tr}(A) \approx \frac{1}{s} \sum_{i=1}^s
        \operatorname{tr}(Q_{(i)}^\top A Q_{(i)})
        + \omega_i^\top (I - Q_{(i)} Q_{(i)}^\top) A (I - Q_{(i)} Q_{(i)}^\top) \omega_i,

    :math:`Q_{(i)}` an orthonormal basis of :math:`A \Omega_{-i}`. The :math:`s` bases are not
    formed: with :math:`A \Omega = Q R`, :math:`Q_{(i)} Q_{(i)}^\top = Q (I - c_i c_i^\top)
    Q^\top` for :math:`c_i` the normalized :math:`i`-th column of :math:`R^{-\top}`. Two calls
    of ``A @ V`` (:math:`A \Omega`, :math:`A Q`), each ``[P, s]``, plus :math:`O(P s^2)` work.
    :math:`A` must be symmetric. When :math:`A \Omega` is rank-deficient (:math:`s` at least
    the rank of :math:`A`), its range holds the range of :math:`A` and the estimate is the
    exact :math:`\operatorname{tr}(Q^\top A Q)`.

    Args:
        A: The symmetric square operator ``[P, P]``.
        num_matvecs: :math:`m \ge 2` (an odd :math:`m` leaves one product unused).
        distribution: ``"normal"`` or ``"rademacher"`` test vectors.
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        The estimate, a scalar tensor.
    """
    s = check_count("num_matvecs", num_matvecs, 2) // 2
    Omega = probe_vectors(A, s, distribution, generator)  # [P, s]
    Y = apply(A, Omega)
    Q, R = torch.linalg.qr(Y)  # [P, r], [r, s] with r = min(P, s)
    Z = apply(A, Q)
    H = Q.T @ Z  # [r, r]
    W = Q.T @ Omega  # [r, s]
    S = _downdate_directions(R)  # [r, s]
    # Per column i: the part of omega_i outside range(Q) is u_i = omega_i - Q w_i, and the part
    # outside range(Q_(i)) is u_i + alpha_i Q s_i with alpha_i = s_i . w_i.
    alpha = (S * W).sum(0)
    sHs = (S * (H @ S)).sum(0)
    HW = H @ W
    uAu = (Omega * Y).sum(0) - 2 * (W * R).sum(0) + (W * HW).sum(0)
    sAu = (S * (R - HW)).sum(0)
    estimates = H.trace() - sHs + uAu + 2 * alpha * sAu + alpha**2 * sHs
    return estimates.mean()


def _downdate_directions(R: Tensor) -> Tensor:
    r"""Normalized columns of :math:`R^{-\top}` ``[s, s]``; zeros where :math:`R` is singular.

    Column :math:`i` gives the direction in :math:`\operatorname{range}(A \Omega)`, in the
    basis :math:`Q`, orthogonal to every :math:`A \omega_j`, :math:`j \ne i`. If :math:`R` is
    not square (more vectors than :math:`P`) or numerically singular, dropping one vector keeps
    the whole range, and there is nothing to remove.
    """
    r, s = R.shape
    diagonal = R.diagonal().abs()
    if r < s or diagonal.min() <= s * torch.finfo(R.dtype).eps * diagonal.max():
        return torch.zeros_like(R)
    identity = torch.eye(s, dtype=R.dtype, device=R.device)
    C = torch.linalg.solve_triangular(R.T, identity, upper=False)  # R^{-T}
    if not torch.isfinite(C).all():
        return torch.zeros_like(R)
    return C / torch.linalg.vector_norm(C, dim=0, keepdim=True)
