r"""Reparametrization-invariant curvature: the spectrum of :math:`G^{-1} H` (C11).

The Hessian :math:`H` of the loss changes under a reparametrization :math:`\theta = \phi(\psi)`:
at a minimum, with :math:`J = \partial\theta/\partial\psi` ``[P, P]``, it becomes
:math:`J^\top H J`. A metric that transforms the same way, such as the GGN or the Fisher
:math:`G \mapsto J^\top G J`, cancels it: :math:`(J^\top G J)^{-1} J^\top H J = J^{-1} G^{-1} H J`
is similar to :math:`G^{-1} H`, so its trace and eigenvalues do not depend on the
parametrization. They are the eigenvalues :math:`\lambda` of the generalized problem

.. math::
    H v = \lambda (G + \delta I) v,

with a damping :math:`\delta \ge 0` that makes the metric positive definite. The damping itself
is not invariant (:math:`\delta I \mapsto \delta J^\top J` would be), so invariance holds up
to :math:`O(\delta)` on the directions where :math:`G` is positive definite; along the null
space of :math:`G` (softmax shift of cross-entropy, per-unit rescaling of ReLU layers) the
damping is all there is and invariance fails there (``docs/diagnostics.md``).

Routes:

* ``method="exact"`` (default, small :math:`P`): dense :math:`G` and :math:`H` from
  :mod:`curvlab.linops`, the Cholesky factor :math:`L L^\top = G + \delta I` and the
  symmetric matrix :math:`C = L^{-1} H L^{-\top}`, similar to :math:`(G + \delta I)^{-1} H`;
  its eigenvalues by ``eigh`` and its trace exactly. Same eigenvalues as
  ``scipy.linalg.eigh(H, G + delta I)``.
* ``method="hutchinson"`` / ``"hutch++"`` (trace only, matrix-free): the estimators of
  :mod:`curvlab.linalg.trace` on :math:`(G + \delta I)^{-1} H`, with the inverse applied by
  :class:`~curvlab.linops.CGInverse`. (The trace of a product is not symmetric-form dependent.)

:func:`invariant_eigs` always takes the dense symmetric route: top eigenvalues of the
generalized problem need :math:`G^{-1/2}`, which has no matrix-free product here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.linalg.trace import hutchinson_trace, hutchpp_trace
from curvlab.linops import GGN, CGInverse, CurvatureOperator, EmpiricalFisher, FisherMC, Hessian

METRICS = ("ggn", "fisher", "empirical-fisher")
"""Names of the built-in metrics; a :class:`~curvlab.linops.CurvatureOperator` also works."""

TRACE_METHODS = ("exact", "hutchinson", "hutch++")

DEFAULT_MAX_PARAMS = 4096
"""Largest :math:`P` for the dense route (two ``[P, P]`` matrices and a Cholesky)."""


def metric_operator(
    model: nn.Module,
    loss_func: nn.Module,
    data: Any,
    metric: str | CurvatureOperator = "ggn",
    params: Any = None,
    mc_samples: int = 1,
    seed: int = 0,
) -> CurvatureOperator:
    """The metric :math:`G` ``[P, P]`` as an operator.

    Args:
        model: The network.
        loss_func: Its loss (``nn.MSELoss``, ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``).
        data: Re-iterable ``(inputs, targets)`` batches.
        metric: ``"ggn"`` (exact GGN), ``"fisher"`` (MC Fisher, ``mc_samples`` labels per input,
            fixed by ``seed``), ``"empirical-fisher"``, or a user operator (returned as is).
        params: Parameters spanning the space (``None``: all trainable).
        mc_samples: Samples of the MC Fisher.
        seed: Seed of the MC Fisher.

    Returns:
        The operator.

    Raises:
        ValueError: If ``metric`` is an unknown name.
    """
    if isinstance(metric, CurvatureOperator):
        return metric
    if metric == "ggn":
        return GGN(model, loss_func, params, data)
    if metric == "fisher":
        return FisherMC(model, loss_func, params, data, mc_samples=mc_samples, seed=seed)
    if metric == "empirical-fisher":
        return EmpiricalFisher(model, loss_func, params, data)
    raise ValueError(f"metric must be one of {METRICS} or a CurvatureOperator, got {metric!r}")


def _symmetric_form(
    hessian: CurvatureOperator,
    metric: CurvatureOperator,
    damping: float,
    max_params: int,
    rcond: float | None = None,
) -> Tensor:
    r""":math:`C = L^{-1} H L^{-\top}` ``[P, P]`` with :math:`L L^\top = G + \delta I`.

    With ``rcond``: the pseudo-inverse instead, :math:`C = S^\top H S` ``[r, r]`` with
    :math:`S = V_r \Lambda_r^{-1/2}` from the eigenpairs of :math:`G + \delta I` above
    ``rcond`` times the largest; :math:`C` has the nonzero eigenvalues of
    :math:`(G + \delta I)^{+} H`.
    """
    size = hessian.shape[0]
    if metric.shape != hessian.shape:
        raise ValueError(
            f"metric: shape {metric.shape} does not match the Hessian's {hessian.shape}"
        )
    if size > max_params:
        raise ValueError(
            f"the dense route needs P <= max_params={max_params}, got P={size}; "
            "use invariant_trace(method='hutchinson') or raise max_params"
        )
    H = hessian.dense()
    G = metric.dense().to(H.dtype)
    G = (G + G.T) / 2 + damping * torch.eye(size, dtype=H.dtype, device=H.device)
    H = (H + H.T) / 2
    if rcond is not None:
        values, vectors = torch.linalg.eigh(G)
        keep = values > rcond * values.max()
        S = vectors[:, keep] / values[keep].sqrt()
        C = S.T @ H @ S
        return (C + C.T) / 2
    L, info = torch.linalg.cholesky_ex(G)
    if info.item() != 0:
        raise ValueError(f"damping: G + {damping} I is not positive definite; increase damping")
    X = torch.linalg.solve_triangular(L, H, upper=False)
    C = torch.linalg.solve_triangular(L, X.T, upper=False)
    return (C + C.T) / 2


def invariant_trace(
    model: nn.Module,
    loss_func: nn.Module,
    data: Any,
    metric: str | CurvatureOperator = "ggn",
    damping: float = 1e-4,
    params: Any = None,
    method: str = "exact",
    num_matvecs: int = 30,
    seed: int = 0,
    cg_tol: float = 1e-8,
    max_params: int = DEFAULT_MAX_PARAMS,
    mc_samples: int = 1,
    pinv_rcond: float | None = None,
) -> float:
    r""":math:`\operatorname{tr}\big((G + \delta I)^{-1} H\big)`, invariant to reparametrization.

    Args:
        model: The network.
        loss_func: Its loss.
        data: Re-iterable ``(inputs, targets)`` batches.
        metric: See :func:`metric_operator`.
        damping: :math:`\delta \ge 0` added to the metric.
        params: Parameters spanning the space (``None``: all trainable).
        method: ``"exact"`` (dense, :math:`P \le` ``max_params``), ``"hutchinson"`` or
            ``"hutch++"`` (``num_matvecs`` products with CG-inverted metric, seeded by ``seed``).
        num_matvecs: Products of the estimators.
        seed: Seed of the estimators' probe vectors.
        cg_tol: Relative tolerance of CG.
        max_params: Guard on the dense route.
        mc_samples: Samples of the MC Fisher (``metric="fisher"``).
        pinv_rcond: Exact route only: the pseudo-inverse of :math:`G + \delta I` instead of its
            inverse, dropping eigenvalues below ``pinv_rcond`` times the largest (``None``: the
            inverse).

    Returns:
        The trace.

    Raises:
        ValueError: On an unknown ``method``, a negative ``damping``, or a metric that the damping
            does not make positive definite.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    hessian = Hessian(model, loss_func, params, data)
    G = metric_operator(model, loss_func, data, metric, params, mc_samples, seed)
    if method == "exact":
        return torch.trace(_symmetric_form(hessian, G, damping, max_params, pinv_rcond)).item()
    if pinv_rcond is not None:
        raise ValueError(f"pinv_rcond needs method='exact', got method={method!r}")
    product = CGInverse(G, damping=damping, tol=cg_tol) @ hessian
    generator = torch.Generator().manual_seed(seed)
    estimator = hutchinson_trace if method == "hutchinson" else hutchpp_trace
    return float(estimator(product, num_matvecs, generator=generator))


def invariant_eigs(
    model: nn.Module,
    loss_func: nn.Module,
    data: Any,
    k: int,
    metric: str | CurvatureOperator = "ggn",
    damping: float = 1e-4,
    params: Any = None,
    max_params: int = DEFAULT_MAX_PARAMS,
    mc_samples: int = 1,
    seed: int = 0,
    pinv_rcond: float | None = None,
) -> Tensor:
    r"""The ``k`` largest eigenvalues of :math:`H v = \lambda (G + \delta I) v`, descending.

    Computed as the eigenvalues of the symmetric :math:`L^{-1} H L^{-\top}`,
    :math:`L L^\top = G + \delta I` (dense; :math:`P \le` ``max_params``).

    Args:
        model: The network.
        loss_func: Its loss.
        data: Re-iterable ``(inputs, targets)`` batches.
        k: How many eigenvalues, ``1 <= k <= P``.
        metric: See :func:`metric_operator`.
        damping: :math:`\delta \ge 0` added to the metric.
        params: Parameters spanning the space (``None``: all trainable).
        max_params: Guard on the dense route.
        mc_samples: Samples of the MC Fisher (``metric="fisher"``).
        seed: Seed of the MC Fisher.
        pinv_rcond: The pseudo-inverse instead of the inverse (see :func:`invariant_trace`);
            the :math:`P - r` eigenvalues of :math:`(G + \delta I)^{+} H` outside the kept
            range are zero.

    Returns:
        ``[k]`` eigenvalues, largest first.

    Raises:
        ValueError: On a ``k`` out of range or a negative ``damping``.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    hessian = Hessian(model, loss_func, params, data)
    if not isinstance(k, int) or not 1 <= k <= hessian.shape[0]:
        raise ValueError(f"k must be an int in [1, {hessian.shape[0]}], got {k!r}")
    G = metric_operator(model, loss_func, data, metric, params, mc_samples, seed)
    values = torch.linalg.eigvalsh(_symmetric_form(hessian, G, damping, max_params, pinv_rcond))
    zeros = values.new_zeros(hessian.shape[0] - len(values))
    return torch.cat([values, zeros]).sort(descending=True).values[:k]
