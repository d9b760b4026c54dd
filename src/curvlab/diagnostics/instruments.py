r"""Cockpit's training instruments (Schneider, Dangel & Hennig, NeurIPS 2021): definitions.

Each instrument is a small object with a ``name`` (its key in :meth:`Monitor.latest
<curvlab.diagnostics.monitor.Monitor.latest>` and in the log), a default ``every`` (its
schedule: computed at the steps divisible by it), the engine quantities it ``needs`` from the
extended backward, and ``compute(data)`` that turns one step's :class:`StepData` into a number
(or a small dict of numbers). The :class:`~curvlab.diagnostics.monitor.Monitor` gathers the
needs of every instrument due at a step into one :func:`curvlab.backprop.capture`.

Notation (MISSION.md, "Conventions"): the batch loss is :math:`L = r \sum_{n=1}^N \ell_n`,
:math:`g_n = \nabla_\theta \ell_n` the per-sample gradients (no :math:`1/N`), and
:math:`\bar g = \frac1N \sum_n g_n` their mean (the gradient of the ``mean`` loss; ``grad / N``
for ``reduction="sum"``). All sums over parameters run over the trainable parameters in
``named_parameters()`` order, flattened into one vector :math:`\theta \in \mathbb{R}^P`.

=========================  ==================================================================
instrument                 definition
=========================  ==================================================================
``loss``                   :math:`L(\theta_t)` on the batch
``grad_norm``              :math:`\lVert \nabla L \rVert` of ``param.grad`` after the backward
``distance``               :math:`\lVert \theta_t - \theta_0 \rVert`
``update_size``            :math:`\lVert \theta_t - \theta_{t-1} \rVert` (the last update)
``learning_rate``          the optimizer's first parameter group's ``lr``
``batch_grad_norms``       mean, std, min, max over :math:`n` of :math:`\lVert g_n \rVert`
``norm_test``              Byrd et al. (2012), :func:`norm_test`
``inner_product_test``     Bollapragada et al. (2018), :func:`inner_product_test`
``orthogonality_test``     Bollapragada et al. (2018), :func:`orthogonality_test`
``mean_gsnr``              Liu et al. (2020), :func:`mean_gsnr`
``hessian_max_eig``        :math:`\lambda_{\max}(\nabla^2 L)` by Lanczos
``hessian_trace``          :math:`\operatorname{tr}(\nabla^2 L)` by Hutch++
=========================  ==================================================================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlab.backprop import GRAD, BatchL2, Quantity, Variance
from curvlab.linalg import hutchpp_trace, lanczos_eigs
from curvlab.linops import Hessian

Schedule = Callable[[int], bool]
Value = float | dict[str, float]


# ---------------------------------------------------------------------------------- schedules
def linear_schedule(interval: int, offset: int = 0) -> Schedule:
    """Due at the steps ``offset, offset + interval, offset + 2 interval, ...``.

    Args:
        interval: The distance between two due steps, at least 1.
        offset: The first due step.

    Returns:
        ``schedule(step) -> bool``.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a positive int, got {interval!r}")

    def schedule(step: int) -> bool:
        return step >= offset and (step - offset) % interval == 0

    return schedule


def logarithmic_schedule(start: float, end: float, steps: int = 300, base: float = 10) -> Schedule:
    r"""Due at the integer steps :math:`\lfloor b^{s} \rfloor`, ``steps`` points from ``start`` to ``end``.

    Dense early in training and sparse later (Cockpit's ``schedules.logarithmic``); step 0 is
    always due.

    Args:
        start: The first exponent.
        end: The last exponent.
        steps: The number of exponents, evenly spaced.
        base: The base :math:`b`.

    Returns:
        ``schedule(step) -> bool``.
    """
    exponents = torch.linspace(start, end, steps, dtype=torch.float64)
    due = {int(v) for v in (base**exponents).tolist()} | {0}
    return lambda step: step in due


# -------------------------------------------------------------------------------- quantities
class BatchGradDots(Quantity):
    r"""Per-parameter Gram matrix of the per-sample gradients :math:`g_n^\top g_m`, ``[N, N]``.

    Summed over parameters it gives :math:`g_n^\top \bar g = \frac1N \sum_m g_n^\top g_m` for
    the inner-product and orthogonality tests; its diagonal is :class:`~curvlab.backprop.BatchL2`.
    Computed inside the backward from each parameter's per-sample gradients ``[N, *p]``, which
    are freed at once (Cockpit's ``batch_dot`` transform). Scaling: none.
    """

    def sources(self) -> tuple:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view, ctx) -> Tensor:  # noqa: D102
        per_sample = view.jac_t(GRAD)[0].flatten(start_dim=1)
        return per_sample @ per_sample.T


ENGINE_QUANTITIES: dict[str, Callable[[], Quantity]] = {
    "BatchL2": BatchL2,
    "BatchGradDots": BatchGradDots,
    "Variance": Variance,
}
"""The engine quantities instruments may need, by name."""


# ------------------------------------------------------------------------------ step data
@dataclass
class StepData:
    r"""What the instruments of one step read.

    Attributes:
        step: The training step.
        model: The model.
        loss_func: The loss function.
        loss: The batch loss (detached), or ``None``.
        optimizer: The optimizer, or ``None``.
        params: Trainable parameters by name (detached), :math:`\theta_t`.
        initial: The parameters at the monitor's start, :math:`\theta_0`.
        previous: The parameters before the last update, :math:`\theta_{t-1}`, or ``None``.
        inputs: The batch's inputs (for curvature instruments), or ``None``.
        targets: The batch's targets, or ``None``.
        num_samples: :math:`N`, or ``None`` without an engine pass.
        grad: This backward's gradient of :math:`L` by name (from the engine), or ``None``.
        quantities: The engine's results by quantity name (each ``dict[str, Tensor]``).
        generator: Random numbers for the stochastic estimators.
    """

    step: int
    model: nn.Module
    loss_func: nn.Module
    loss: Tensor | None
    optimizer: Any
    params: dict[str, Tensor]
    initial: dict[str, Tensor]
    previous: dict[str, Tensor] | None = None
    inputs: Any = None
    targets: Tensor | None = None
    num_samples: int | None = None
    grad: dict[str, Tensor] | None = None
    quantities: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def mean_grad(self) -> dict[str, Tensor]:
        r""":math:`\bar g = \frac1N \sum_n g_n` by name (``grad / (r N)``)."""
        n = self.num_samples
        reduction = getattr(self.loss_func, "reduction", "mean")
        scale = 1.0 if reduction == "mean" else 1.0 / n
        return {k: g * scale for k, g in self.grad.items()}

    def sq_norms(self) -> Tensor:
        r""":math:`\lVert g_n \rVert^2` summed over parameters, ``[N]``."""
        if "BatchGradDots" in self.quantities:
            return self.dots().diagonal()
        return _total(self.quantities["BatchL2"])

    def dots(self) -> Tensor:
        r""":math:`g_n^\top g_m` summed over parameters, ``[N, N]``."""
        return _total(self.quantities["BatchGradDots"])


def _total(values: Mapping[str, Tensor]) -> Tensor:
    tensors = list(values.values())
    return sum(tensors[1:], tensors[0])


def _sq_norm(values: Mapping[str, Tensor]) -> Tensor:
    return sum(v.double().square().sum() for v in values.values())


def _difference_norm(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return math.sqrt(float(sum((a[k].double() - b[k].double()).square().sum() for k in a)))


# ---------------------------------------------------------------------------------- formulas
def norm_test(sq_norms: Tensor, mean_sq_norm: Tensor | float) -> float:
    r"""The norm test's statistic (Byrd et al. 2012; Cockpit's ``NormTest``).

    The batch is large enough for the tolerance :math:`\theta` when the sample variance of the
    gradient, over the batch size, is at most :math:`\theta^2 \lVert \bar g \rVert^2`; the
    statistic is the smallest :math:`\theta` that passes,

    .. math::
        \theta_{\text{norm}} = \sqrt{\frac{1}{N (N - 1)} \frac{\sum_n \lVert g_n - \bar g
        \rVert^2}{\lVert \bar g \rVert^2}}
        = \sqrt{\frac{1}{N (N - 1)} \Bigl(\frac{\sum_n \lVert g_n \rVert^2}{\lVert \bar g
        \rVert^2} - N\Bigr)}.

    Args:
        sq_norms: :math:`\lVert g_n \rVert^2`, ``[N]``.
        mean_sq_norm: :math:`\lVert \bar g \rVert^2`.

    Returns:
        :math:`\theta_{\text{norm}}` (``nan`` for ``N = 1``).
    """
    n = sq_norms.shape[0]
    if n < 2:
        return float("nan")
    value = (float(sq_norms.double().sum()) / float(mean_sq_norm) - n) / (n * (n - 1))
    return math.sqrt(max(value, 0.0))


def inner_product_test(dots_with_mean: Tensor, mean_sq_norm: Tensor | float) -> float:
    r"""The inner-product test's statistic (Bollapragada et al. 2018; Cockpit's ``InnerTest``).

    The variance of the projections :math:`g_n^\top \bar g` relative to
    :math:`\lVert \bar g \rVert^4`:

    .. math::
        \theta_{\text{inner}} = \sqrt{\frac{1}{N (N - 1)} \frac{\sum_n (g_n^\top \bar g -
        \lVert \bar g \rVert^2)^2}{\lVert \bar g \rVert^4}}
        = \sqrt{\frac{1}{N (N - 1)} \Bigl(\frac{\sum_n (g_n^\top \bar g)^2}{\lVert \bar g
        \rVert^4} - N\Bigr)}.

    Args:
        dots_with_mean: :math:`g_n^\top \bar g`, ``[N]``.
        mean_sq_norm: :math:`\lVert \bar g \rVert^2`.

    Returns:
        :math:`\theta_{\text{inner}}` (``nan`` for ``N = 1``).
    """
    n = dots_with_mean.shape[0]
    if n < 2:
        return float("nan")
    ratio = float(dots_with_mean.double().square().sum()) / float(mean_sq_norm) ** 2
    return math.sqrt(max((ratio - n) / (n * (n - 1)), 0.0))


def orthogonality_test(
    sq_norms: Tensor, dots_with_mean: Tensor, mean_sq_norm: Tensor | float
) -> float:
    r"""The orthogonality test's statistic (Bollapragada et al. 2018; Cockpit's ``OrthoTest``).

    The variance of the per-sample gradients' components orthogonal to :math:`\bar g`:

    .. math::
        \nu_{\text{ortho}} = \sqrt{\frac{1}{N (N - 1)} \frac{\sum_n \lVert g_n -
        \frac{g_n^\top \bar g}{\lVert \bar g \rVert^2} \bar g \rVert^2}{\lVert \bar g \rVert^2}}
        = \sqrt{\frac{1}{N (N - 1)} \Bigl(\frac{\sum_n \lVert g_n \rVert^2}{\lVert \bar g
        \rVert^2} - \frac{\sum_n (g_n^\top \bar g)^2}{\lVert \bar g \rVert^4}\Bigr)}.

    Args:
        sq_norms: :math:`\lVert g_n \rVert^2`, ``[N]``.
        dots_with_mean: :math:`g_n^\top \bar g`, ``[N]``.
        mean_sq_norm: :math:`\lVert \bar g \rVert^2`.

    Returns:
        :math:`\nu_{\text{ortho}}` (``nan`` for ``N = 1``).
    """
    n = sq_norms.shape[0]
    if n < 2:
        return float("nan")
    m = float(mean_sq_norm)
    value = (
        float(sq_norms.double().sum()) / m - float(dots_with_mean.double().square().sum()) / m**2
    )
    return math.sqrt(max(value / (n * (n - 1)), 0.0))


def mean_gsnr(
    mean_grad: Mapping[str, Tensor], variance: Mapping[str, Tensor], epsilon: float = 1e-5
) -> float:
    r"""The mean gradient signal-to-noise ratio (Liu et al. 2020; Cockpit's ``MeanGSNR``).

    Per parameter entry :math:`j`, the squared mean over the variance of the per-sample
    gradients, averaged over all :math:`P` entries:

    .. math::
        \operatorname{GSNR} = \frac1P \sum_j \frac{\bar g_j^2}{\sigma_j^2 + \epsilon},
        \qquad \sigma_j^2 = \frac1N \sum_n (g_{n,j} - \bar g_j)^2.

    Args:
        mean_grad: :math:`\bar g` by parameter name.
        variance: :math:`\sigma^2` by parameter name (the engine's ``Variance``).
        epsilon: :math:`\epsilon`, as Cockpit's default.

    Returns:
        The mean GSNR.
    """
    total = sum(
        (mean_grad[k].double().square() / (variance[k].double() + epsilon)).sum() for k in variance
    )
    count = sum(v.numel() for v in variance.values())
    return float(total) / count


# ------------------------------------------------------------------------------ instruments
class Instrument:
    """Base of the instruments: a name, a default schedule, engine needs and a computation.

    Attributes:
        name: The key in :meth:`Monitor.latest <curvlab.diagnostics.monitor.Monitor.latest>`.
        every: The default schedule: due at the steps divisible by ``every``.
        needs: Engine quantity names (:data:`ENGINE_QUANTITIES`) the extended backward must
            compute; ``"batch"`` for the batch's inputs and targets; ``"previous"`` for the
            parameters before the last update.
    """

    name: ClassVar[str] = ""
    every: ClassVar[int] = 1
    needs: ClassVar[frozenset[str]] = frozenset()

    def compute(self, data: StepData) -> Value | None:
        """The value at this step (``None``: not available, left out of the record)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Loss(Instrument):
    r"""The batch loss :math:`L(\theta_t)`."""

    name = "loss"

    def compute(self, data: StepData) -> float | None:  # noqa: D102
        return None if data.loss is None else float(data.loss)


class GradNorm(Instrument):
    r"""The gradient norm :math:`\lVert \nabla L \rVert` over the trainable parameters' ``.grad``.

    Cockpit's ``GradNorm``, summed over parameters; a parameter without ``.grad`` counts zero.
    """

    name = "grad_norm"

    def compute(self, data: StepData) -> float:  # noqa: D102
        grads = [p.grad for p in data.model.parameters() if p.requires_grad and p.grad is not None]
        return math.sqrt(float(sum(g.double().square().sum() for g in grads)))


class Distance(Instrument):
    r""":math:`\lVert \theta_t - \theta_0 \rVert`, from the parameters at the monitor's start."""

    name = "distance"

    def compute(self, data: StepData) -> float:  # noqa: D102
        return _difference_norm(data.params, data.initial)


class UpdateSize(Instrument):
    r"""The update size :math:`\lVert \theta_t - \theta_{t-1} \rVert`, of the update that led to step t.

    The monitor keeps :math:`\theta_{t-1}` at the end of step ``t - 1`` when this is due at
    ``t``; at a step whose predecessor was not monitored it is left out.
    """

    name = "update_size"
    needs = frozenset({"previous"})

    def compute(self, data: StepData) -> float | None:  # noqa: D102
        return None if data.previous is None else _difference_norm(data.params, data.previous)


class LearningRate(Instrument):
    """The optimizer's learning rate (its first parameter group's ``lr``)."""

    name = "learning_rate"

    def compute(self, data: StepData) -> float | None:  # noqa: D102
        if data.optimizer is None or "lr" not in data.optimizer.param_groups[0]:
            return None
        return float(data.optimizer.param_groups[0]["lr"])


class BatchGradNorms(Instrument):
    r"""Summary of the per-sample gradient norms :math:`\lVert g_n \rVert` over the batch.

    ``mean``, ``std`` (population), ``min``, ``max``, from :class:`~curvlab.backprop.BatchL2`.
    """

    name = "batch_grad_norms"
    needs = frozenset({"BatchL2"})

    def compute(self, data: StepData) -> dict[str, float]:  # noqa: D102
        norms = data.sq_norms().double().clamp_min(0).sqrt()
        return {
            "mean": float(norms.mean()),
            "std": float(norms.std(correction=0)),
            "min": float(norms.min()),
            "max": float(norms.max()),
        }


class NormTest(Instrument):
    """:func:`norm_test` from ``BatchL2`` and the gradient."""

    name = "norm_test"
    needs = frozenset({"BatchL2"})

    def compute(self, data: StepData) -> float:  # noqa: D102
        return norm_test(data.sq_norms(), _sq_norm(data.mean_grad()))


class InnerProductTest(Instrument):
    """:func:`inner_product_test` from the per-sample gradients' Gram matrix."""

    name = "inner_product_test"
    needs = frozenset({"BatchGradDots"})

    def compute(self, data: StepData) -> float:  # noqa: D102
        return inner_product_test(data.dots().mean(1), _sq_norm(data.mean_grad()))


class OrthogonalityTest(Instrument):
    """:func:`orthogonality_test` from the per-sample gradients' Gram matrix."""

    name = "orthogonality_test"
    needs = frozenset({"BatchGradDots"})

    def compute(self, data: StepData) -> float:  # noqa: D102
        dots = data.dots()
        return orthogonality_test(dots.diagonal(), dots.mean(1), _sq_norm(data.mean_grad()))


class MeanGSNR(Instrument):
    r""":func:`mean_gsnr` from the engine's ``Variance`` and the gradient.

    Args:
        epsilon: The :math:`\epsilon` in the denominator.
    """

    name = "mean_gsnr"
    needs = frozenset({"Variance"})

    def __init__(self, epsilon: float = 1e-5) -> None:
        self.epsilon = epsilon

    def compute(self, data: StepData) -> float:  # noqa: D102
        return mean_gsnr(data.mean_grad(), data.quantities["Variance"], self.epsilon)


def _batch_hessian(data: StepData) -> Hessian:
    """The Hessian of the batch loss as a :class:`curvlab.linops.Hessian` operator."""
    return Hessian(
        data.model, data.loss_func, None, [(data.inputs, data.targets)], check_deterministic=False
    )


class HessianMaxEig(Instrument):
    r""":math:`\lambda_{\max}(\nabla^2 L)` of the batch by Lanczos on :class:`curvlab.linops.Hessian`.

    At most ``max_steps`` Hessian-vector products (one reverse-over-reverse pass each); with
    fewer steps than needed to converge it is the largest Ritz value, a lower bound on
    :math:`\lambda_{\max}` (the non-convergence warning is silenced: a few steps are the point).
    Due every 10 steps by default.

    Args:
        max_steps: The most Lanczos steps.
        tol: The relative residual at which Lanczos stops early.
    """

    name = "hessian_max_eig"
    every = 10
    needs = frozenset({"batch"})

    def __init__(self, max_steps: int = 20, tol: float = 1e-3) -> None:
        self.max_steps, self.tol = max_steps, tol

    def compute(self, data: StepData) -> float:  # noqa: D102
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="lanczos_eigs", category=RuntimeWarning)
            values, _ = lanczos_eigs(
                _batch_hessian(data),
                1,
                "largest",
                tol=self.tol,
                max_steps=self.max_steps,
                generator=data.generator,
            )
        return float(values[0])


class HessianTrace(Instrument):
    r""":math:`\operatorname{tr}(\nabla^2 L)` of the batch by Hutch++ on :class:`~curvlab.linops.Hessian`.

    ``num_matvecs`` products in two batched passes; exact once ``num_matvecs / 3`` reaches
    :math:`P`. Due every 10 steps by default.

    Args:
        num_matvecs: Hutch++'s number of products, at least 3.
    """

    name = "hessian_trace"
    every = 10
    needs = frozenset({"batch"})

    def __init__(self, num_matvecs: int = 30) -> None:
        self.num_matvecs = num_matvecs

    def compute(self, data: StepData) -> float:  # noqa: D102
        return float(
            hutchpp_trace(_batch_hessian(data), self.num_matvecs, generator=data.generator)
        )


INSTRUMENTS: dict[str, type[Instrument]] = {
    cls.name: cls
    for cls in (
        Loss,
        GradNorm,
        Distance,
        UpdateSize,
        LearningRate,
        BatchGradNorms,
        NormTest,
        InnerProductTest,
        OrthogonalityTest,
        MeanGSNR,
        HessianMaxEig,
        HessianTrace,
    )
}
"""Every instrument class by name."""

_ECONOMY = (
    "loss",
    "grad_norm",
    "distance",
    "update_size",
    "learning_rate",
    "batch_grad_norms",
    "norm_test",
    "inner_product_test",
    "orthogonality_test",
)
PRESETS: dict[str, tuple[str, ...]] = {
    "economy": _ECONOMY,
    "business": (*_ECONOMY, "hessian_trace"),
    "full": (*_ECONOMY, "hessian_trace", "hessian_max_eig", "mean_gsnr"),
}
"""The instruments of each preset (Cockpit's economy, business, full, less what is missing)."""


def resolve_instruments(preset: str | list) -> list[Instrument]:
    """Instrument objects from a preset name or a list of names and instrument objects.

    Raises:
        ValueError: For an unknown preset or instrument name (listing the valid ones), or a
            name given twice.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = list(PRESETS[preset])
    out: list[Instrument] = []
    for item in preset:
        if isinstance(item, str):
            if item not in INSTRUMENTS:
                raise ValueError(
                    f"unknown instrument {item!r}; valid names: {', '.join(INSTRUMENTS)}"
                )
            item = INSTRUMENTS[item]()
        if not isinstance(item, Instrument):
            raise TypeError(f"instruments are names or Instrument objects, got {item!r}")
        if item.name in {i.name for i in out}:
            raise ValueError(f"instrument {item.name!r} given twice")
        out.append(item)
    return out
