r"""Small parts that curvature optimizers are assembled from (MISSION.md, C7).

Each part does one thing and knows nothing of the optimizer that uses it, in the spirit of
optax's transformations:

* the curvature statistic from the engine: :func:`kronecker_quantity`;
* a running average of blocks (factor by factor): :func:`running_average`;
* the inverse: :class:`KronInverse`, the eigendecompositions of a block's factors, cached
  between inverse updates and applied with exact or heuristic (:math:`\pi`) damping;
* adaptive damping: :func:`levenberg_marquardt` from the reduction ratio :math:`\rho`;
* the update rule: :func:`momentum_direction` (learning rate, heavy-ball momentum) and
  :func:`with_weight_decay` (:math:`L_2` decay added to the gradient); Adam-style moments
  :func:`adam_moments` and :func:`bias_corrected_direction` (for AdaHesScale).

**Kronecker order.** A block is :math:`\bigoplus_g A_g \otimes B_g` in the column-major
:math:`\mathrm{vec}` of the per-group matrices :math:`M_g` ``[b, a]`` of
:class:`curvlab.backprop.Layout` (``docs/backprop.md``, Conventions); the parts work on those
matrices ``[G, b, a]``, so they hold for every layout the engine knows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from curvlab.backprop import KFAC, KFLR, KFACEmpirical, Layout, Quantity

FISHER_TYPES = ("mc", "type-2", "empirical")
"""``"mc"``: the MC-sampled Fisher (``KFAC``); ``"type-2"``: the exact loss Hessian (``KFLR``);
``"empirical"``: the gradients at the true labels (``KFACEmpirical``)."""

Block = TypeVar("Block")


# --------------------------------------------------------------------- curvature statistic
def kronecker_quantity(
    fisher_type: str = "mc",
    mc_samples: int = 1,
    kfac_approx: str = "expand",
    separate_weight_and_bias: bool = True,
) -> Quantity:
    """The engine quantity whose blocks a KFAC optimizer averages and inverts.

    Args:
        fisher_type: One of :data:`FISHER_TYPES`.
        mc_samples: Sampled labels per input (``"mc"`` only; must stay 1 otherwise).
        kfac_approx: ``"expand"`` or ``"reduce"`` (weight sharing, Eschenhagen et al. 2023).
        separate_weight_and_bias: ``False`` for one joint block per layer.

    Returns:
        ``KFAC(mc_samples, ...)``, ``KFLR(...)`` or ``KFACEmpirical(...)``.

    Raises:
        ValueError: An unknown ``fisher_type``, or ``mc_samples`` that does not fit it.
    """
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if fisher_type != "mc" and mc_samples != 1:
        raise ValueError(
            f"mc_samples={mc_samples} only applies to fisher_type='mc' (got {fisher_type!r})"
        )
    if fisher_type == "mc":
        return KFAC(mc_samples, kfac_approx, separate_weight_and_bias)
    cls = KFLR if fisher_type == "type-2" else KFACEmpirical
    return cls(kfac_approx, separate_weight_and_bias)


# ------------------------------------------------------------------------- running average
def running_average(average: Block | None, new: Block, decay: float) -> Block:
    r"""The exponential moving average :math:`\bar C \leftarrow \beta \bar C + (1 - \beta) C`.

    On :class:`~curvlab.backprop.KronFactors` the arithmetic acts factor by factor (both
    :math:`A` and :math:`B` are averaged, as in Martens & Grosse 2015); tensors work too.

    Args:
        average: The average so far, or ``None`` before the first statistic.
        new: This step's statistic.
        decay: :math:`\beta \in [0, 1)`, the weight of the old average.

    Returns:
        ``new`` at the first call, the average afterwards.
    """
    if average is None or decay == 0:
        return new
    return decay * average + (1 - decay) * new


# ----------------------------------------------------------------------------------- inverse
def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    r"""``torch.linalg.eigh`` of a symmetric ``[G, d, d]``, retried in float64 where it fails.

    LAPACK's divide-and-conquer solver can fail to converge on ill-conditioned factors with
    many repeated eigenvalues (3C3D's pooled convolution inputs in float32); the retry
    symmetrizes :math:`(M + M^\top)/2` in float64 and casts the result back.

    Returns:
        Eigenvalues ``[G, d]`` (ascending) and eigenvectors ``[G, d, d]``, in ``matrix``'s dtype.

    Raises:
        torch.linalg.LinAlgError: The float64 retry fails too (non-finite entries).
    """
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        wide = matrix.double()
        values, vectors = torch.linalg.eigh((wide + wide.transpose(-2, -1)) / 2)
        return values.to(matrix.dtype), vectors.to(matrix.dtype)


@dataclass
class KronInverse:
    r"""Eigendecompositions :math:`A_g = Q^A \Lambda^A Q^{A\top}`, :math:`B_g = Q^B \Lambda^B Q^{B\top}`.

    Kept between inverse updates; the damping enters only when the inverse is applied, so an
    adaptive damping needs no new decomposition. Eigenvalues are clipped at zero (round-off).

    Attributes:
        input_values: :math:`\Lambda^A` ``[G, a]``.
        input_vectors: :math:`Q^A` ``[G, a, a]``.
        output_values: :math:`\Lambda^B` ``[G, b]``.
        output_vectors: :math:`Q^B` ``[G, b, b]``.
    """

    input_values: Tensor
    input_vectors: Tensor
    output_values: Tensor
    output_vectors: Tensor

    @classmethod
    def from_factors(cls, input_factor: Tensor, output_factor: Tensor) -> KronInverse:
        """Decompose ``A`` ``[G, a, a]`` and ``B`` ``[G, b, b]`` (see :func:`symmetric_eigh`)."""
        la, qa = symmetric_eigh(input_factor)
        lb, qb = symmetric_eigh(output_factor)
        return cls(la.clamp_min(0), qa, lb.clamp_min(0), qb)

    def as_tensors(self) -> dict[str, Tensor]:
        """The four tensors by name (for an optimizer's state)."""
        return {
            "input_values": self.input_values,
            "input_vectors": self.input_vectors,
            "output_values": self.output_values,
            "output_vectors": self.output_vectors,
        }

    def pi(self) -> Tensor:
        r""":math:`\pi_g = \sqrt{(\mathrm{tr} A_g / a) / (\mathrm{tr} B_g / b)}` ``[G]``."""
        tiny = torch.finfo(self.input_values.dtype).tiny
        ta = self.input_values.mean(-1).clamp_min(tiny)
        tb = self.output_values.mean(-1).clamp_min(tiny)
        return (ta / tb).sqrt()

    def apply(self, matrix: Tensor, damping: float, pi_damping: bool = False) -> Tensor:
        r"""Solve with the damped block for the per-group matrices ``matrix`` ``[G, b, a]``.

        Args:
            matrix: :math:`M_g` ``[G, b, a]`` (see :meth:`curvlab.backprop.Layout.to_matrix`).
            damping: :math:`\lambda \ge 0`.
            pi_damping: ``False``: :math:`(A \otimes B + \lambda I)^{-1}`, exactly.
                ``True``: :math:`(A + \pi\sqrt\lambda I)^{-1} \otimes (B + \frac{\sqrt\lambda}{\pi}
                I)^{-1}` (Martens & Grosse 2015, Section 6.3).

        Returns:
            ``[G, b, a]``: :math:`Q^B \big((Q^{B\top} M Q^A) \oslash D\big) Q^{A\top}` with
            :math:`D_{ij} = \lambda^B_i \lambda^A_j + \lambda` or
            :math:`(\lambda^B_i + \sqrt\lambda/\pi)(\lambda^A_j + \pi\sqrt\lambda)`.
        """
        la, qa = self.input_values, self.input_vectors
        lb, qb = self.output_values, self.output_vectors
        rotated = qb.transpose(-2, -1) @ matrix @ qa
        if pi_damping:
            pi, root = self.pi()[:, None], math.sqrt(damping)
            denominator = (lb + root / pi)[:, :, None] * (la + pi * root)[:, None, :]
        else:
            denominator = lb[:, :, None] * la[:, None, :] + damping
        return qb @ (rotated / denominator) @ qa.transpose(-2, -1)


def kron_matvec(input_factor: Tensor, output_factor: Tensor, matrix: Tensor) -> Tensor:
    r""":math:`(A \otimes B)\,\mathrm{vec}(M)` per group: :math:`B_g M_g A_g` ``[G, b, a]``."""
    return output_factor @ matrix @ input_factor


def precondition(
    layout: Layout,
    inverse: KronInverse,
    grads: Sequence[Tensor],
    damping: float,
    pi_damping: bool = False,
) -> list[Tensor]:
    r"""The damped block's solve for the gradients of the parameters a block covers.

    Args:
        layout: The block's :class:`~curvlab.backprop.Layout`.
        inverse: Its factors' decompositions.
        grads: One gradient per covered parameter, shaped like it (weight, then bias).
        damping: :math:`\lambda`.
        pi_damping: See :meth:`KronInverse.apply`.

    Returns:
        One direction per covered parameter, shaped like its gradient.
    """
    matrix = layout.to_matrix(list(grads), 0)
    return layout.from_matrix(inverse.apply(matrix, damping, pi_damping), 0)


# ------------------------------------------------------------------------ adaptive damping
def levenberg_marquardt(
    damping: float,
    ratio: float,
    factor: float,
    min_damping: float = 0.0,
    max_damping: float = math.inf,
) -> float:
    r"""The Levenberg-Marquardt rule (Martens & Grosse 2015, Section 6.5).

    With :math:`\rho = \frac{L(\theta + \delta) - L(\theta)}{q(\delta) - q(0)}` the ratio of
    the actual to the predicted change of the loss, :math:`\lambda \leftarrow \omega\lambda` if
    :math:`\rho > 3/4` (the quadratic model is good: trust it more), :math:`\lambda \leftarrow
    \lambda / \omega` if :math:`\rho < 1/4`, else unchanged, clipped to
    ``[min_damping, max_damping]``.

    Args:
        damping: :math:`\lambda`.
        ratio: :math:`\rho` (``nan`` leaves the damping unchanged).
        factor: :math:`\omega \in (0, 1)`.
        min_damping: Lower bound.
        max_damping: Upper bound.

    Returns:
        The new damping.
    """
    if math.isnan(ratio):
        return damping
    if ratio > 0.75:
        damping = damping * factor
    elif ratio < 0.25:
        damping = damping / factor
    return min(max(damping, min_damping), max_damping)


def reduction_ratio(actual: float, predicted: float) -> float:
    r""":math:`\rho` = actual / predicted change; ``nan`` when the model predicts no decrease."""
    if not predicted < 0 or not math.isfinite(actual):
        return math.nan if math.isfinite(actual) else -math.inf
    return actual / predicted


# ----------------------------------------------------------------------------- update rule
def with_weight_decay(grad: Tensor, param: Tensor, weight_decay: float) -> Tensor:
    r"""The gradient of the loss plus :math:`\frac{\eta}{2}\|\theta\|^2`: :math:`g + \eta\theta`."""
    return grad if weight_decay == 0 else grad + weight_decay * param


def momentum_direction(buffer: Tensor | None, direction: Tensor, momentum: float) -> Tensor:
    r"""Heavy-ball momentum :math:`m \leftarrow \mu m + d` (``d`` at the first step).

    The update is then :math:`\theta \leftarrow \theta - \alpha m`.

    Args:
        buffer: :math:`m` from the last step, or ``None``.
        direction: :math:`d`, the preconditioned gradient.
        momentum: :math:`\mu \in [0, 1)`.

    Returns:
        The new :math:`m` (``direction`` itself when ``momentum`` is 0).
    """
    if momentum == 0 or buffer is None:
        return direction
    return buffer.mul_(momentum).add_(direction)


def adam_moments(
    first: Tensor, second: Tensor, grad: Tensor, diagonal: Tensor, betas: tuple[float, float]
) -> None:
    r"""Update :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) h^2` in place.

    Args:
        first: :math:`m`, shaped like the parameter.
        second: :math:`v`, same shape.
        grad: :math:`g`, same shape.
        diagonal: :math:`h`, same shape.
        betas: :math:`(\beta_1, \beta_2)`.
    """
    beta1, beta2 = betas
    first.mul_(beta1).add_(grad, alpha=1 - beta1)
    second.mul_(beta2).addcmul_(diagonal, diagonal, value=1 - beta2)


def bias_corrected_direction(
    first: Tensor, second: Tensor, step: int, betas: tuple[float, float], eps: float
) -> Tensor:
    r"""Adam's direction :math:`\hat m / (\sqrt{\hat v} + \epsilon)` at step :math:`t` (from 1).

    Args:
        first: :math:`m`.
        second: :math:`v`.
        step: :math:`t \ge 1`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.

    Returns:
        The direction, shaped like ``first``.
    """
    beta1, beta2 = betas
    correction1, correction2 = 1 - beta1**step, 1 - beta2**step
    denominator = (second / correction2).sqrt_().add_(eps)
    return (first / correction1).div_(denominator)
