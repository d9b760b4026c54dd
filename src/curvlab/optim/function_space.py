r"""Losses of the exact Gauss-Newton optimizer and their function-space Newton steps.

For a batch loss :math:`L = \frac1N \sum_n \ell(f_n, y_n)` the Gauss-Newton step moves the outputs by
:math:`-\alpha\, s_n` with :math:`s_n = H_n^{+} g_n`, the Newton step of the per-sample loss in
function space (:math:`g_n, H_n` its gradient and Hessian w.r.t. the output :math:`f_n`). The
constant in front of :math:`\ell` cancels, so :math:`s` is the same for ``mean`` and ``sum``.

* MSE: :math:`s_n = f_n - y_n` (the residual; one step with :math:`\alpha = 1` interpolates).
* Cross-entropy, :math:`p = \operatorname{softmax}(f)`: :math:`H_n = \operatorname{diag}(p) - p p^\top`
  is singular along the constant direction :math:`\mathbf 1`, and the minimum-norm solution of
  :math:`H_n s = p - y` is :math:`s = (1 - y / p) - \operatorname{mean}(1 - y / p)\,\mathbf 1`.
  A constant shift of the logits leaves the loss unchanged.
* Cross-entropy with ``identity_hessian=True`` (the authors' ``use_identity``): :math:`s_n = p - y`.
* Cross-entropy with ``output_damping`` :math:`\lambda > 0` (Levenberg-Marquardt in function space):
  :math:`s_n = (H_n + \lambda I)^{-1} g_n`. The true Newton step grows like :math:`1/p_{y}` when a
  sample is confidently wrong; damping bounds it by :math:`\|g_n\| / \lambda` and moves it towards
  the gradient :math:`g_n / \lambda` as :math:`\lambda` grows. With
  :math:`D = \operatorname{diag}(p + \lambda)` and Sherman-Morrison,
  :math:`(D - p p^\top)^{-1} g = D^{-1} g + D^{-1} p\, \frac{p^\top D^{-1} g}{1 - p^\top D^{-1} p}`,
  where :math:`p^\top D^{-1} p < \sum_c p_c = 1`, so the step costs :math:`O(k)` per sample.

The loss values, the gradients :math:`g_n` and the Hessians :math:`H_n` come from
:class:`curvlab.backprop.loss.LossSpec` (for ``[N, k]`` outputs its per-sample scale is
:math:`c = 1/k` for MSE, 1 for cross-entropy); the steps above are written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from curvlab.backprop.loss import LossSpec

LOSSES = ("mse", "ce")

_SPECS = {name: LossSpec.from_name(name) for name in LOSSES}
"""The losses with ``mean`` reduction, as torch defines it."""


def _spec(loss: str) -> LossSpec:
    if loss not in _SPECS:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    return _SPECS[loss]


def as_targets(targets: Tensor, num_classes: int, loss: str, like: Tensor) -> Tensor:
    """Return targets as ``[N, k]`` values (MSE) or probabilities (CE).

    Integer class labels ``[N]`` become one-hot rows; float ``[N, k]`` targets pass through.
    """
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if targets.ndim != 1:
            raise ValueError(f"class-label targets must be [N], got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(f"class labels must lie in [0, {num_classes}), got {targets.unique()}")
        return F.one_hot(targets.long(), num_classes).to(like)
    if targets.shape != like.shape:
        raise ValueError(
            f"{loss} targets must be class labels [N] or match the outputs {tuple(like.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    return targets.to(like)


def loss_value(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """Batch loss (``mean`` reduction as torch defines it) for ``[N, k]`` outputs and targets."""
    return _spec(loss).value(outputs, targets)


def newton_step(
    outputs: Tensor,
    targets: Tensor,
    loss: str,
    identity_hessian: bool = False,
    output_damping: float = 0.0,
) -> Tensor:
    r"""Function-space Newton step :math:`s_n = H_n^{+} g_n`, ``[N, k]``.

    Args:
        outputs: Network outputs :math:`f`, ``[N, k]``.
        targets: ``[N, k]`` regression targets (MSE) or class probabilities (CE).
        loss: ``"mse"`` or ``"ce"``.
        identity_hessian: CE only: use :math:`H = I` (the authors' variant), :math:`s = p - y`.
        output_damping: CE only: :math:`\lambda \ge 0`; for :math:`\lambda > 0` the damped step
            :math:`(H_n + \lambda I)^{-1} g_n`.
    """
    if output_damping < 0:
        raise ValueError(f"output_damping must be >= 0, got {output_damping}")
    spec = _spec(loss)
    if loss == "mse":  # H = 2c I and g = 2c (f - y)
        return outputs - targets
    # cross-entropy on [N, k]: c = 1, H = diag(p) - p p^T, g = p - y
    grad = spec.per_sample_gradient(outputs, targets)
    if identity_hessian:
        return grad
    hessian = spec.hessian_terms(outputs)
    if output_damping > 0:
        p = hessian.rank_one
        inv_d = 1.0 / (hessian.diagonal + output_damping)
        coupling = (p * inv_d * grad).sum(-1, keepdim=True) / (
            1.0 - (p * p * inv_d).sum(-1, keepdim=True)
        )
        return inv_d * grad + inv_d * p * coupling
    # y / p computed in log space; clamp keeps exp finite (and 0 * exp not NaN) for probabilities
    # below the dtype's range: at most sqrt(max) of the dtype.
    max_log = 0.5 * math.log(torch.finfo(outputs.dtype).max)
    ratio = targets * torch.exp((-hessian.log_diagonal).clamp(max=max_log))
    step = 1.0 - ratio
    return step - step.mean(dim=-1, keepdim=True)
