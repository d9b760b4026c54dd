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
``alpha``                  Cockpit's noise-aware step-length fit, :class:`Alpha`
``cabs``                   Balles et al. (2017), :func:`cabs`
``early_stopping``         Mahsereci et al. (2017), :func:`early_stopping`
``gradient_histogram_1d``  counts of :math:`g_{n,j}`, :class:`GradientHistogram1d`
``gradient_histogram_2d``  counts of :math:`(g_{n,j}, \theta_j)`, :class:`GradientHistogram2d`
``tic_diag``               Thomas et al. (2020), :func:`tic` (diagonal)
``tic_trace``              Thomas et al. (2020), :func:`tic` (trace)
=========================  ==================================================================
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlab.backprop import (
    GRAD,
    BatchL2,
    DiagGGN,
    DiagHessian,
    Quantity,
    SumGradSquared,
    Variance,
    compute,
)
from curvlab.diagnostics.per_sample import (
    HISTOGRAM_BUDGET,
    PARALLEL_TOLERANCE,
    HistogramRequest,
    KeptGradients,
    bin_index,
    total,
)
from curvlab.linalg import hutchpp_trace, lanczos_eigs
from curvlab.linops import Hessian

Schedule = Callable[[int], bool]
Value = float | dict[str, Any]


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
    Computed inside the backward by the rules' Gram primitive (factored for ``Linear``,
    :math:`(x_n^\top x_m)(\delta_n^\top \delta_m)`; for a convolution the cheaper of the
    position-pair and the per-sample form; Cockpit's ``batch_dot`` transform). The monitor's
    instruments read :class:`~curvlab.diagnostics.per_sample.PerSampleStatistics` instead, which
    needs only :math:`g_n^\top \bar g`. Scaling: none.
    """

    def sources(self) -> tuple:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view, ctx) -> Tensor:  # noqa: D102
        return view.gram(GRAD)[0, :, 0]


# ------------------------------------------------------------------- in-pass quantities
class BatchGradProjections(Quantity):
    r"""Per-sample projections :math:`g_n^\top (\theta - \theta_{\text{ref}})` per parameter, ``[N]``.

    ``reference`` maps parameter names to :math:`\theta_{\text{ref}}`; the direction is formed
    from the parameter's value when the backward runs (after the optimizer step that led to
    it), so it is the last update. Each parameter's per-sample gradients ``[N, *p]`` are
    reduced at once and freed. Parameters missing from ``reference`` give zeros. Scaling: none.
    """

    def __init__(self, reference: Mapping[str, Tensor] | None = None) -> None:
        self.reference: Mapping[str, Tensor] = {} if reference is None else reference

    def sources(self) -> tuple:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view, ctx) -> Tensor:  # noqa: D102
        per_sample = view.jac_t(GRAD)[0].flatten(start_dim=1)
        start = self.reference.get(view.name)
        if start is None:
            return per_sample.new_zeros(per_sample.shape[0])
        direction = (view.param.detach() - start).flatten()
        return per_sample @ direction.to(per_sample.dtype)


class GradHistogram1d(Quantity):
    r"""Histogram counts of the per-sample gradient elements :math:`g_{n,j}`, ``[bins]``.

    Values outside ``range`` are clipped into the outer bins (Cockpit's ``GradHist1d``). The
    per-sample gradients ``[N, *p]`` exist for one parameter at a time inside the backward and
    are freed after binning. Sum over parameters for the whole network.

    Args:
        bins: The number of equal bins.
        range: ``(low, high)``.
    """

    def __init__(self, bins: int = 100, range: tuple[float, float] = (-2.0, 2.0)) -> None:
        self.bins, self.range = bins, (float(range[0]), float(range[1]))

    @property
    def name(self) -> str:  # noqa: D102
        return f"GradHistogram1d(bins={self.bins}, range={self.range})"

    def sources(self) -> tuple:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view, ctx) -> Tensor:  # noqa: D102
        low, high = self.range
        values = view.jac_t(GRAD)[0].clamp(low, high)
        return torch.histc(values, self.bins, low, high)


class GradHistogram2d(Quantity):
    r"""Joint counts of per-sample gradient elements :math:`g_{n,j}` and parameters :math:`\theta_j`.

    Shape ``[bins_g, bins_theta]``: entry :math:`(a, b)` counts the pairs :math:`(n, j)` with
    :math:`g_{n,j}` in gradient bin :math:`a` and :math:`\theta_j` in parameter bin :math:`b`;
    values outside the ranges are clipped into the outer bins (Cockpit's ``GradHist2d``). Inside
    the backward, one parameter at a time: its per-sample gradients ``[N, *p]`` and one
    ``int64`` index per element (``N p`` of them) are formed and freed.

    Args:
        bins: ``(bins_g, bins_theta)``.
        range: ``((low_g, high_g), (low_theta, high_theta))``.
    """

    def __init__(
        self,
        bins: tuple[int, int] = (40, 50),
        range: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0)),
    ) -> None:
        self.bins = (int(bins[0]), int(bins[1]))
        self.range = tuple((float(lo), float(hi)) for lo, hi in range)

    @property
    def name(self) -> str:  # noqa: D102
        return f"GradHistogram2d(bins={self.bins}, range={self.range})"

    def sources(self) -> tuple:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view, ctx) -> Tensor:  # noqa: D102
        (bg, bt), ((lg, hg), (lt, ht)) = self.bins, self.range
        per_sample = view.jac_t(GRAD)[0].flatten(start_dim=1)  # [N, p]
        grad_index = bin_index(per_sample, bg, lg, hg)
        param_index = bin_index(view.param.detach().flatten(), bt, lt, ht)
        joint = (grad_index * bt + param_index).flatten()
        counts = torch.bincount(joint, minlength=bg * bt)
        return counts.reshape(bg, bt).to(per_sample.dtype)


ENGINE_QUANTITIES: dict[str, Callable[[], Quantity]] = {
    "BatchL2": BatchL2,
    "BatchGradDots": BatchGradDots,
    "Variance": Variance,
    "SumGradSquared": SumGradSquared,
    "DiagHessian": DiagHessian,
    "DiagGGNMC": lambda: DiagGGN(mc_samples=1),
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
        output: The model's output on the batch (from the engine), ``[N, ...]``, or ``None``.
        num_samples: :math:`N`, or ``None`` without an engine pass.
        grad: This backward's gradient of :math:`L` by name (from the engine), or ``None``.
        quantities: The engine's results by quantity name (each ``dict[str, Tensor]``).
        per_sample: The step's :class:`~curvlab.diagnostics.per_sample.PerSampleStatistics` by
            parameter name, or ``None``.
        generator: Random numbers for the stochastic estimators.
        sample_index: The subsample (``[S]`` indices of the batch) that ``per_sample``'s
            per-sample entries belong to, or ``None`` for all :math:`N` samples.
        seed_step: The monitor's ``seed + step`` (seeds :meth:`subsample_diag_ggn`).
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
    output: Tensor | None = None
    num_samples: int | None = None
    grad: dict[str, Tensor] | None = None
    quantities: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    per_sample: dict[str, dict[str, Any]] | None = None
    generator: torch.Generator | None = None
    sample_index: Tensor | None = None
    update_buffers: dict[str, Tensor] | None = field(default=None, repr=False)
    _mean_grad: dict[str, Tensor] | None = field(default=None, repr=False)
    _mean_sq_norm: float | None = field(default=None, repr=False)
    _update: dict[str, Tensor] | None = field(default=None, repr=False)
    _update_sq_norm: float | None = field(default=None, repr=False)
    _subsample_diag: dict[str, Tensor] | None = field(default=None, repr=False)
    seed_step: int = 0

    def mean_grad(self) -> dict[str, Tensor]:
        r""":math:`\bar g = \frac1N \sum_n g_n` by name (``grad / (r N)``; computed once)."""
        if self._mean_grad is None:
            scale = self.mean_scale()
            self._mean_grad = {k: g if scale == 1.0 else g * scale for k, g in self.grad.items()}
        return self._mean_grad

    def update(self) -> dict[str, Tensor]:
        r"""The last update :math:`\theta_t - \theta_{t-1}` by name (needs ``previous``; computed once)."""
        if self._update is None:
            self._update = _differences(self.params, self.previous, self.update_buffers)
        return self._update

    def mean_sq_norm(self) -> float:
        r""":math:`\lVert \bar g \rVert^2` (computed once)."""
        if self._mean_sq_norm is None:
            self._mean_sq_norm = _sq_norm(self.mean_grad())
        return self._mean_sq_norm

    def update_sq_norm(self) -> float:
        r""":math:`\lVert \theta_t - \theta_{t-1} \rVert^2` (needs ``previous``; computed once)."""
        if self._update_sq_norm is None:
            self._update_sq_norm = _sq_norm(self.update())
        return self._update_sq_norm

    def subsample_diag_ggn(self) -> dict[str, Tensor]:
        r"""An unbiased estimate of :math:`\operatorname{diag}(G)` of :math:`L` from the subsample (computed once).

        One extra forward and backward of the subsample's :math:`S` samples
        (``sample_index``; the whole batch without one) by :func:`curvlab.backprop.compute`
        with ``DiagGGN(mc_samples=1)``, seeded by ``seed + step``:
        :math:`\operatorname{diag}(G_{\mathcal S})` of the subsample's loss
        :math:`L_{\mathcal S} = r_{\mathcal S} \sum_{n \in \mathcal S} \ell_n`, times
        :math:`\frac{r N}{r_{\mathcal S} S}` (``1`` for a ``"mean"`` loss, :math:`N / S` for
        ``"sum"``). Each sample's MC term is unbiased for its GGN diagonal and the subsample is
        uniform, so the product is unbiased for :math:`\operatorname{diag}(G)`. Costs
        :math:`S / N` of a training step's forward and backward (plus the MC column), not a
        column through the whole batch.
        """
        if self._subsample_diag is None:
            inputs, targets, index = self.inputs, self.targets, self.sample_index
            if not isinstance(inputs, Tensor):
                raise TypeError(
                    "the 'mc-subsample' curvature selects samples of the model's input, which "
                    f"must be one tensor, got {type(inputs).__name__}"
                )
            n = inputs.shape[0]
            if index is not None:
                inputs, targets = inputs[index.to(inputs.device)], targets[index.to(inputs.device)]
            generator = torch.Generator(inputs.device).manual_seed(self.seed_step * 7919 + 13)
            results = compute(
                self.model,
                self.loss_func,
                inputs,
                targets,
                [DiagGGN(mc_samples=1)],
                generator=generator,
            )
            reduction = getattr(self.loss_func, "reduction", "mean")
            factor = n / inputs.shape[0] if reduction == "sum" else 1.0
            values = results[DiagGGN(mc_samples=1).name]
            self._subsample_diag = {
                k: v if factor == 1.0 else v * factor for k, v in values.items()
            }
        return self._subsample_diag

    def sampled(self) -> int | None:
        """:math:`S`, the subsample's size, or ``None`` when the statistics hold all samples."""
        return None if self.sample_index is None else self.sample_index.numel()

    def mean_scale(self) -> float:
        r"""The factor from :math:`L` to the mean loss :math:`\frac1N \sum_n \ell_n`: 1 or 1/N."""
        reduction = getattr(self.loss_func, "reduction", "mean")
        return 1.0 if reduction == "mean" else 1.0 / self.num_samples

    def mean_loss(self) -> float:
        r"""The mean loss :math:`\bar L = \frac1N \sum_n \ell_n` (``loss`` times :meth:`mean_scale`)."""
        return float(self.loss) * self.mean_scale()

    def per_sample_losses(self) -> Tensor:
        r"""The per-sample losses :math:`\ell_n` from ``output`` and ``targets``, ``[N]``.

        The loss function applied to one sample with its own reduction (MISSION.md's
        :math:`\ell_n`, :math:`L = r \sum_n \ell_n`): computed with a copy at
        ``reduction="none"`` whose elements of one sample are averaged (``"mean"``) or summed
        (``"sum"``).
        """
        reduction = getattr(self.loss_func, "reduction", "mean")
        per_element = copy.copy(self.loss_func)
        per_element.reduction = "none"
        with torch.no_grad():
            values = per_element(self.output, self.targets).reshape(self.output.shape[0], -1)
        values = values.double()
        return values.mean(1) if reduction == "mean" else values.sum(1)

    def sq_norms(self) -> Tensor:
        r""":math:`\lVert g_n \rVert^2` summed over parameters, ``[N]``."""
        if self.per_sample is not None and _has(self.per_sample, "sq_norms"):
            return total(self.per_sample, "sq_norms")
        return _total(self.quantities["BatchL2"])

    def dots_with_mean(self) -> Tensor:
        r""":math:`g_n^\top \bar g` summed over parameters, ``[N]``."""
        return total(self.per_sample, "dots_with_mean")

    def dots(self) -> Tensor:
        r""":math:`g_n^\top g_m` summed over parameters, ``[N, N]`` (needs ``BatchGradDots``)."""
        return _total(self.quantities["BatchGradDots"])

    def sum_sq(self) -> dict[str, Tensor]:
        r""":math:`\sum_n g_n^{\odot 2}` by name."""
        return {k: v["sum_sq"] for k, v in self.per_sample.items()}

    def variance(self) -> dict[str, Tensor]:
        r""":math:`\sigma^2 = \frac1N \sum_n g_n^{\odot 2} - \bar g^{\odot 2}` by name (clamped at zero)."""
        mean = self.mean_grad()
        n = self.num_samples
        return {
            k: (v["sum_sq"] / n - mean[k].to(v["sum_sq"].dtype).square()).clamp_min_(0)
            for k, v in self.per_sample.items()
        }


def _has(stats: Mapping[str, Mapping[str, Any]], key: str) -> bool:
    return bool(stats) and all(key in v for v in stats.values())


def _total(values: Mapping[str, Tensor]) -> Tensor:
    tensors = list(values.values())
    return sum(tensors[1:], tensors[0])


def copy_into(values: Mapping[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of ``values`` in the buffers of ``out`` (kept across steps, filled on first use)."""
    for k, v in values.items():
        buffer = out.get(k)
        if buffer is None or buffer.shape != v.shape or buffer.dtype != v.dtype:
            out[k] = buffer = torch.empty_like(v)
        buffer.copy_(v)
    return {k: out[k] for k in values}


def _sq_norm(values: Mapping[str, Tensor]) -> float:
    r""":math:`\sum_k \lVert v_k \rVert^2` (norms in the tensors' dtype, summed in float64)."""
    norms = [torch.linalg.vector_norm(v) for v in values.values()]
    return float(torch.stack(norms).double().square().sum()) if norms else 0.0


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    r""":math:`\sum_k a_k^\top b_k` over the keys of ``a`` (in ``a``'s dtypes)."""
    dots = [torch.dot(a[k].flatten(), b[k].flatten().to(a[k].dtype)) for k in a]
    return float(torch.stack(dots).double().sum()) if dots else 0.0


def _difference_norm(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], out: dict[str, Tensor] | None = None
) -> float:
    r""":math:`\lVert a - b \rVert`; ``out`` keeps the differences' buffers between calls."""
    return math.sqrt(_sq_norm(_differences(a, b, out)))


def _differences(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], out: dict[str, Tensor] | None
) -> dict[str, Tensor]:
    """``a - b`` by name, into the buffers of ``out`` (filled on first use) if given.

    Parameter-sized temporaries are a visible share of a small model's step on the CPU (each is
    fresh memory the system must map); buffers kept across steps avoid them.
    """
    if out is None:
        return {k: a[k] - b[k].to(a[k].dtype) for k in a}
    for k in a:
        buffer = out.get(k)
        if buffer is None or buffer.shape != a[k].shape or buffer.dtype != a[k].dtype:
            out[k] = buffer = torch.empty_like(a[k])
        torch.sub(a[k], b[k].to(a[k].dtype), out=buffer)
    return {k: out[k] for k in a}


# ---------------------------------------------------------------------------------- formulas
def norm_test(
    sq_norms: Tensor, mean_sq_norm: Tensor | float, num_samples: int | None = None
) -> float:
    r"""The norm test's statistic (Byrd et al. 2012; Cockpit's ``NormTest``).

    The batch is large enough for the tolerance :math:`\theta` when the sample variance of the
    gradient, over the batch size, is at most :math:`\theta^2 \lVert \bar g \rVert^2`; the
    statistic is the smallest :math:`\theta` that passes,

    .. math::
        \theta_{\text{norm}} = \sqrt{\frac{1}{N (N - 1)} \frac{\sum_n \lVert g_n - \bar g
        \rVert^2}{\lVert \bar g \rVert^2}}
        = \sqrt{\frac{1}{N (N - 1)} \Bigl(\frac{\sum_n \lVert g_n \rVert^2}{\lVert \bar g
        \rVert^2} - N\Bigr)}.

    From a subsample :math:`\mathcal S` of :math:`S` of the :math:`N` samples (drawn
    uniformly without replacement; ``sq_norms`` ``[S]``, ``num_samples`` :math:`N`),
    :math:`\sum_n \lVert g_n \rVert^2` is estimated by :math:`\frac NS \sum_{n \in \mathcal S}
    \lVert g_n \rVert^2`, unbiased, so :math:`\theta_{\text{norm}}^2` is unbiased too (the
    square root is not: by Jensen it is biased low, by little while the estimate's relative
    spread is small).

    Args:
        sq_norms: :math:`\lVert g_n \rVert^2`, ``[N]`` (or ``[S]`` of a subsample).
        mean_sq_norm: :math:`\lVert \bar g \rVert^2` (of the whole batch).
        num_samples: :math:`N`, for a subsample; ``None``: ``sq_norms`` has all of them.

    Returns:
        :math:`\theta_{\text{norm}}` (``nan`` for ``N = 1``).
    """
    n = sq_norms.shape[0] if num_samples is None else num_samples
    if n < 2:
        return float("nan")
    total_sq = _batch_sum(sq_norms, n)
    value = (total_sq / float(mean_sq_norm) - n) / (n * (n - 1))
    return math.sqrt(max(value, 0.0))


def inner_product_test(
    dots_with_mean: Tensor, mean_sq_norm: Tensor | float, num_samples: int | None = None
) -> float:
    r"""The inner-product test's statistic (Bollapragada et al. 2018; Cockpit's ``InnerTest``).

    The variance of the projections :math:`g_n^\top \bar g` relative to
    :math:`\lVert \bar g \rVert^4`:

    .. math::
        \theta_{\text{inner}} = \sqrt{\frac{1}{N (N - 1)} \frac{\sum_n (g_n^\top \bar g -
        \lVert \bar g \rVert^2)^2}{\lVert \bar g \rVert^4}}
        = \sqrt{\frac{1}{N (N - 1)} \Bigl(\frac{\sum_n (g_n^\top \bar g)^2}{\lVert \bar g
        \rVert^4} - N\Bigr)}.

    From a subsample (``[S]``, ``num_samples`` :math:`N`) the sum :math:`\sum_n (g_n^\top
    \bar g)^2` is :math:`\frac NS` times the subsample's (:math:`\bar g` of the whole batch),
    unbiased, as in :func:`norm_test`.

    Args:
        dots_with_mean: :math:`g_n^\top \bar g`, ``[N]`` (or ``[S]`` of a subsample).
        mean_sq_norm: :math:`\lVert \bar g \rVert^2`.
        num_samples: :math:`N`, for a subsample; ``None``: all of them.

    Returns:
        :math:`\theta_{\text{inner}}` (``nan`` for ``N = 1``).
    """
    n = dots_with_mean.shape[0] if num_samples is None else num_samples
    if n < 2:
        return float("nan")
    ratio = _batch_sum(dots_with_mean.double().square(), n) / float(mean_sq_norm) ** 2
    return math.sqrt(max((ratio - n) / (n * (n - 1)), 0.0))


def orthogonality_test(
    sq_norms: Tensor,
    dots_with_mean: Tensor,
    mean_sq_norm: Tensor | float,
    num_samples: int | None = None,
) -> float:
    r"""The orthogonality test's statistic (Bollapragada et al. 2018; Cockpit's ``OrthoTest``).

    The variance of the per-sample gradients' components orthogonal to :math:`\bar g`:

    .. math::
        \nu_{\text{ortho}} = \sqrt{\frac{1}{N (N - 1)} \frac{\sum_n \lVert g_n -
        \frac{g_n^\top \bar g}{\lVert \bar g \rVert^2} \bar g \rVert^2}{\lVert \bar g \rVert^2}}
        = \sqrt{\frac{1}{N (N - 1)} \Bigl(\frac{\sum_n \lVert g_n \rVert^2}{\lVert \bar g
        \rVert^2} - \frac{\sum_n (g_n^\top \bar g)^2}{\lVert \bar g \rVert^4}\Bigr)}.

    From a subsample both sums are estimated as in :func:`norm_test` (on the same samples),
    so the squared statistic is unbiased.

    Args:
        sq_norms: :math:`\lVert g_n \rVert^2`, ``[N]`` (or ``[S]`` of a subsample).
        dots_with_mean: :math:`g_n^\top \bar g`, ``[N]`` (or ``[S]``, the same samples).
        mean_sq_norm: :math:`\lVert \bar g \rVert^2`.
        num_samples: :math:`N`, for a subsample; ``None``: all of them.

    Returns:
        :math:`\nu_{\text{ortho}}` (``nan`` for ``N = 1``).
    """
    n = sq_norms.shape[0] if num_samples is None else num_samples
    if n < 2:
        return float("nan")
    m = float(mean_sq_norm)
    value = _batch_sum(sq_norms, n) / m - _batch_sum(dots_with_mean.double().square(), n) / m**2
    return math.sqrt(max(value / (n * (n - 1)), 0.0))


def _batch_sum(values: Tensor, n: int) -> float:
    r""":math:`\sum_n v_n` over the batch of ``n``: ``values`` holds all, or a uniform subsample.

    For a subsample :math:`\mathcal S` of size :math:`S` drawn without replacement,
    :math:`\frac NS \sum_{n \in \mathcal S} v_n` (unbiased: each sample is in
    :math:`\mathcal S` with probability :math:`S / N`).
    """
    total_value = float(values.double().sum())
    return total_value if values.shape[0] == n else total_value * n / values.shape[0]


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


def fit_quadratic(
    t: float,
    values: Sequence[float],
    slopes: Sequence[float],
    value_vars: Sequence[float],
    slope_vars: Sequence[float],
    eps: float = 1e-10,
) -> Tensor | None:
    r"""The noise-weighted quadratic fit along the step (Cockpit's ``Alpha``).

    With :math:`q(\tau) = \mu_0 + \mu_1 \tau + \mu_2 \tau^2` observed through
    :math:`f_0 = q(0)`, :math:`f_1 = q(t)`, :math:`f'_0 = q'(0)`, :math:`f'_1 = q'(t)`, i.e.
    :math:`y = \Phi^\top \mu` with :math:`\Phi^\top = \begin{pmatrix} 1 & 0 & 0 \\ 1 & t & t^2
    \\ 0 & 1 & 0 \\ 0 & 1 & 2t \end{pmatrix}`, the weighted least-squares estimate is

    .. math::
        \mu = (\Phi \Lambda^{-1} \Phi^\top)^{-1} \Phi \Lambda^{-1} y, \qquad
        \Lambda = \operatorname{diag}(\sigma_{f_0}^2, \sigma_{f_1}^2, \sigma_{f'_0}^2,
        \sigma_{f'_1}^2).

    Zero variances are replaced by ``eps``.

    Args:
        t: The step length :math:`t = \lVert \theta_1 - \theta_0 \rVert`.
        values: :math:`(f_0, f_1)`.
        slopes: :math:`(f'_0, f'_1)`, the directional derivatives along the step.
        value_vars: Their variances :math:`(\sigma_{f_0}^2, \sigma_{f_1}^2)`.
        slope_vars: :math:`(\sigma_{f'_0}^2, \sigma_{f'_1}^2)`.
        eps: The stand-in for a zero variance.

    Returns:
        :math:`\mu` ``[3]`` (float64), or ``None`` if the system is singular.
    """
    phi_t = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]],
        dtype=torch.float64,
    )
    variances = torch.tensor([*value_vars, *slope_vars], dtype=torch.float64)
    weights = 1.0 / torch.where(variances == 0, torch.full_like(variances, eps), variances)
    y = torch.tensor([*values, *slopes], dtype=torch.float64)
    normal = phi_t.T @ (weights[:, None] * phi_t)
    try:
        return torch.linalg.solve(normal, phi_t.T @ (weights * y))
    except RuntimeError:  # singular (t = 0)
        return None


def alpha_from_fit(mu: Tensor | None, t: float) -> float | None:
    r"""Cockpit's :math:`\alpha` from the fit :math:`\mu` and the step length :math:`t`.

    .. math::
        \alpha = \frac{2 t}{\bar\tau} - 1, \qquad \bar\tau = -\frac{\mu_1}{\mu_2},

    where :math:`\bar\tau` is the point of the parabola with the start's value on the other
    side of its minimum: :math:`\alpha = -1` stays at the start, :math:`0` lands on the
    minimum, :math:`1` on the other side at equal height (overshooting). A concave fit
    (:math:`\mu_2 < 0`, still going downhill) gives :math:`-1`, as in Cockpit; no fit gives
    ``-1`` for :math:`t = 0` and ``None`` otherwise.
    """
    if mu is None:
        return -1.0 if t == 0.0 else None
    if float(mu[2]) < 0:
        return -1.0
    return float(2 * t / (-mu[1] / mu[2]) - 1)


def cabs(learning_rate: float, variance_sum: float, mean_loss: float) -> float:
    r"""The CABS batch size (Balles, Romero & Hennig 2017, Eq. 22; Cockpit's ``CABS``).

    .. math::
        B_{\text{CABS}} = \frac{\eta \operatorname{tr}(\Sigma)}{\bar L}
        = \frac{\eta \sum_j \sigma_j^2}{\bar L}, \qquad
        \sigma_j^2 = \frac1N \sum_n (g_{n,j} - \bar g_j)^2,

    with :math:`\eta` the SGD learning rate and :math:`\bar L = \frac1N \sum_n \ell_n` the mean
    loss (the rule assumes plain SGD and a loss whose minimum is near zero).

    Args:
        learning_rate: :math:`\eta`.
        variance_sum: :math:`\sum_j \sigma_j^2`.
        mean_loss: :math:`\bar L`.

    Returns:
        The suggested batch size.
    """
    return learning_rate * variance_sum / mean_loss


def early_stopping(
    mean_grad: Mapping[str, Tensor],
    variance: Mapping[str, Tensor],
    num_samples: int,
    epsilon: float = 1e-5,
) -> float:
    r"""The evidence-based stopping criterion (Mahsereci et al. 2017, Eq. 7; Cockpit's ``EarlyStopping``).

    .. math::
        \operatorname{EB} = 1 - \frac{N}{P} \sum_j \frac{\bar g_j^2}{\hat\sigma_j^2 + \epsilon},
        \qquad \hat\sigma_j^2 = \frac{1}{N - 1} \sum_n (g_{n,j} - \bar g_j)^2
        = \frac{N}{N - 1} \sigma_j^2;

    training should stop once it is positive (the gradient is explained by its noise).

    Args:
        mean_grad: :math:`\bar g` by parameter name.
        variance: :math:`\sigma^2` by parameter name (the engine's ``Variance``).
        num_samples: :math:`N`, at least 2.
        epsilon: :math:`\epsilon`, as Cockpit's default.

    Returns:
        :math:`\operatorname{EB}` (``nan`` for ``N = 1``).
    """
    n = num_samples
    if n < 2:
        return float("nan")
    total = sum(
        (mean_grad[k].double().square() / (variance[k].double() * n / (n - 1) + epsilon)).sum()
        for k in variance
    )
    count = sum(v.numel() for v in variance.values())
    return 1.0 - n * float(total) / count


def tic(
    second_moment: Mapping[str, Tensor],
    hessian_diagonal: Mapping[str, Tensor],
    kind: str = "diag",
    epsilon: float = 1e-7,
) -> float:
    r"""The Takeuchi information criterion :math:`\operatorname{tr}(H^{-1} C)` (Thomas et al. 2020).

    Cockpit's ``TICDiag`` and ``TICTrace``, with :math:`C = \frac1N \sum_n g_n g_n^\top` the
    uncentered gradient covariance and :math:`H` the Hessian of the mean loss
    :math:`\frac1N \sum_n \ell_n`, both replaced by their diagonals (``"diag"``) or their traces
    (``"trace"``):

    .. math::
        \operatorname{TIC}_{\text{diag}} = \sum_j \frac{C_{jj}}{H_{jj} + \epsilon}, \qquad
        \operatorname{TIC}_{\text{trace}} = \frac{\sum_j C_{jj}}{\sum_j H_{jj} + \epsilon}.

    Args:
        second_moment: :math:`C_{jj} = \frac1N \sum_n g_{n,j}^2` by parameter name.
        hessian_diagonal: :math:`H_{jj}` by parameter name.
        kind: ``"diag"`` or ``"trace"``.
        epsilon: :math:`\epsilon`, as Cockpit's default.

    Returns:
        The TIC.
    """
    return _scaled_tic(second_moment, hessian_diagonal, 1.0, 1.0, kind, epsilon)


def _scaled_tic(
    second_sums: Mapping[str, Tensor],
    diagonal: Mapping[str, Tensor],
    second_scale: float,
    diagonal_scale: float,
    kind: str,
    epsilon: float,
) -> float:
    r""":func:`tic` of :math:`C = a\, s` and :math:`H = b\, h`, without scaled copies.

    :math:`\sum_j a s_j / (b h_j + \epsilon) = \frac ab \sum_j s_j / (h_j + \epsilon / b)`: one
    temporary per parameter (in its dtype; the sums in float64), as parameter-sized float64
    copies cost a visible share of a small model's step.
    """
    a, b = second_scale, diagonal_scale
    if kind == "diag":
        total_ratio = 0.0
        for k, second in second_sums.items():
            ratio = diagonal[k].to(second.dtype) + epsilon / b
            ratio.reciprocal_().mul_(second)
            total_ratio += float(ratio.sum(dtype=torch.float64))
        return total_ratio * a / b
    if kind == "trace":
        c = sum(float(v.sum(dtype=torch.float64)) for v in second_sums.values())
        h = sum(float(v.sum(dtype=torch.float64)) for v in diagonal.values())
        return a * c / (b * h + epsilon)
    raise ValueError(f"kind must be 'diag' or 'trace', got {kind!r}")


# ------------------------------------------------------------------------------ instruments
class Instrument:
    """Base of the instruments: a name, a default schedule, engine needs and a computation.

    Attributes:
        name: The key in :meth:`Monitor.latest <curvlab.diagnostics.monitor.Monitor.latest>`.
        every: The default schedule: due at the steps divisible by ``every``.
        needs: Engine quantity names (:data:`ENGINE_QUANTITIES`) the extended backward must
            compute; ``"batch"`` for the batch's inputs and targets; ``"previous"`` for the
            parameters before the last update.
        remembers: ``True`` for instruments that keep something of the step before a due
            step (:meth:`remember`), like :class:`Alpha`.
        per_sample: Per-sample statistics (:data:`~curvlab.diagnostics.per_sample.STATISTICS`)
            read from the step's shared
            :class:`~curvlab.diagnostics.per_sample.PerSampleStatistics` when due.
    """

    name: ClassVar[str] = ""
    every: ClassVar[int] = 1
    needs: ClassVar[frozenset[str]] = frozenset()
    remembers: ClassVar[bool] = False
    per_sample: ClassVar[frozenset[str]] = frozenset()

    @property
    def subsampled(self) -> bool:
        """Whether it reads the monitor's subsample (per-sample statistics, or curvature on it)."""
        return bool(self.per_sample) or self.remembers or getattr(self, "_on_subsample", False)

    def engine_quantities(self, due: bool, due_next: bool) -> dict[str, Quantity]:
        """The engine quantities by name for a step (``due``: at it; ``due_next``: at the next).

        The default: the :data:`ENGINE_QUANTITIES` named in :attr:`needs` when due.
        """
        if not due:
            return {}
        return {q: ENGINE_QUANTITIES[q]() for q in sorted(self.needs & set(ENGINE_QUANTITIES))}

    def per_sample_requests(self, due: bool, due_next: bool) -> tuple[str | HistogramRequest, ...]:
        """What the step's :class:`~curvlab.diagnostics.per_sample.PerSampleStatistics` must hold.

        The monitor merges the requests of every instrument of a step into one quantity, so
        that each statistic is computed once per backward. The default: :attr:`per_sample`
        when due.
        """
        return tuple(sorted(self.per_sample)) if due else ()

    def per_sample_hints(self, due: bool, due_next: bool) -> dict[str, Any]:
        """Extra inputs of the step's per-sample statistics (how, not what, they compute)."""
        return {}

    def remember(self, data: StepData) -> None:
        """Keep what the next step needs (called when due at the next step, if it remembers)."""

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
        return math.sqrt(_sq_norm(dict(enumerate(grads))))


class Distance(Instrument):
    r""":math:`\lVert \theta_t - \theta_0 \rVert`, from the parameters at the monitor's start."""

    name = "distance"

    def compute(self, data: StepData) -> float:  # noqa: D102
        return _difference_norm(data.params, data.initial, self._buffers)

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}


class UpdateSize(Instrument):
    r"""The update size :math:`\lVert \theta_t - \theta_{t-1} \rVert`, of the update that led to step t.

    The monitor keeps :math:`\theta_{t-1}` at the end of step ``t - 1`` when this is due at
    ``t``; at a step whose predecessor was not monitored it is left out.
    """

    name = "update_size"
    needs = frozenset({"previous"})

    def compute(self, data: StepData) -> float | None:  # noqa: D102
        return None if data.previous is None else math.sqrt(data.update_sq_norm())


class LearningRate(Instrument):
    """The optimizer's learning rate (its first parameter group's ``lr``)."""

    name = "learning_rate"

    def compute(self, data: StepData) -> float | None:  # noqa: D102
        if data.optimizer is None or "lr" not in data.optimizer.param_groups[0]:
            return None
        return float(data.optimizer.param_groups[0]["lr"])


class BatchGradNorms(Instrument):
    r"""Summary of the per-sample gradient norms :math:`\lVert g_n \rVert` over the batch.

    ``mean``, ``std`` (population), ``min``, ``max``, from the shared per-sample statistics
    (:math:`\lVert x_n \rVert^2 \lVert \delta_n \rVert^2` for a ``Linear`` layer). On a
    subsample (the monitor's ``samples``) they are the subsample's: the mean is unbiased for
    the batch's, the others are not (``min`` and ``max`` lie inside the batch's range).
    """

    name = "batch_grad_norms"
    per_sample = frozenset({"sq_norms"})

    def compute(self, data: StepData) -> dict[str, float]:  # noqa: D102
        norms = data.sq_norms().double().clamp_min(0).sqrt()
        return {
            "mean": float(norms.mean()),
            "std": float(norms.std(correction=0)),
            "min": float(norms.min()),
            "max": float(norms.max()),
        }


class NormTest(Instrument):
    """:func:`norm_test` from the per-sample squared norms and the gradient."""

    name = "norm_test"
    per_sample = frozenset({"sq_norms"})

    def compute(self, data: StepData) -> float:  # noqa: D102
        return norm_test(data.sq_norms(), data.mean_sq_norm(), data.num_samples)


class InnerProductTest(Instrument):
    r""":func:`inner_product_test` from the per-sample projections :math:`g_n^\top \bar g`."""

    name = "inner_product_test"
    per_sample = frozenset({"dots_with_mean"})

    def compute(self, data: StepData) -> float:  # noqa: D102
        return inner_product_test(data.dots_with_mean(), data.mean_sq_norm(), data.num_samples)


class OrthogonalityTest(Instrument):
    r""":func:`orthogonality_test` from the per-sample squared norms and :math:`g_n^\top \bar g`."""

    name = "orthogonality_test"
    per_sample = frozenset({"sq_norms", "dots_with_mean"})

    def compute(self, data: StepData) -> float:  # noqa: D102
        return orthogonality_test(
            data.sq_norms(), data.dots_with_mean(), data.mean_sq_norm(), data.num_samples
        )


class MeanGSNR(Instrument):
    r""":func:`mean_gsnr` from the per-sample second moment (:meth:`StepData.variance`) and the gradient.

    Args:
        epsilon: The :math:`\epsilon` in the denominator.
    """

    name = "mean_gsnr"
    per_sample = frozenset({"sum_sq"})

    def __init__(self, epsilon: float = 1e-5) -> None:
        self.epsilon = epsilon

    def compute(self, data: StepData) -> float:  # noqa: D102
        return mean_gsnr(data.mean_grad(), data.variance(), self.epsilon)


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
    r""":math:`\operatorname{tr}(\nabla^2 L)` of the batch, exact from the Hessian diagonal or by Hutch++.

    ``method="diagonal"`` (default, Cockpit's ``HessTrace``): the sum of the engine's exact
    ``DiagHessian`` (of the loss as the loss function reduces it, like the Hutch++ route), computed in the monitored backward and shared with
    :class:`TICDiag`/:class:`TICTrace` when they are due at the same step (the engine computes
    each quantity once). ``method="hutch++"``: Hutch++ on :class:`~curvlab.linops.Hessian` with
    ``num_matvecs`` products in two batched passes, exact once ``num_matvecs / 3`` reaches
    :math:`P`; the cheaper choice where the Hessian diagonal has no closed form on the graph (the
    engine then takes one Hessian-vector product per parameter, e.g. attention).
    ``method="mc"``: the sum of the engine's Monte-Carlo GGN diagonal (``DiagGGN(mc_samples=1)``,
    one sampled backward column inside the user's backward instead of one per output and the
    Hessian's residual terms): an unbiased estimate of :math:`\operatorname{tr}(G)`, which is
    :math:`\operatorname{tr}(\nabla^2 L)` only for networks whose layers are piecewise linear
    (ReLU, max-pooling, linear and convolution layers), and shared with ``TICDiag(curvature="mc")``.
    ``method="mc-subsample"``: the same estimate from the monitor's subsample only
    (:meth:`StepData.subsample_diag_ggn`: one extra forward and backward of :math:`S` samples
    instead of a sampled column through the whole batch; unbiased for :math:`\operatorname{tr}(G)`
    too, with the variance of :math:`S` samples), shared with
    ``TICDiag(curvature="mc-subsample")``. Due every 10 steps by default.

    Args:
        num_matvecs: Hutch++'s number of products, at least 3 (``method="hutch++"``).
        method: ``"diagonal"``, ``"hutch++"``, ``"mc"`` or ``"mc-subsample"``.

    Raises:
        ValueError: an unknown ``method``.
    """

    name = "hessian_trace"
    every = 10
    needs = frozenset({"DiagHessian"})

    def __init__(self, num_matvecs: int = 30, method: str = "diagonal") -> None:
        if method not in ("diagonal", "hutch++", "mc", "mc-subsample"):
            raise ValueError(
                "HessianTrace method must be 'diagonal', 'hutch++', 'mc' or 'mc-subsample', "
                f"got {method!r}"
            )
        self.num_matvecs = num_matvecs
        self.method = method
        if method in ("hutch++", "mc-subsample"):
            self.needs = frozenset({"batch"})
        elif method == "mc":
            self.needs = frozenset({"DiagGGNMC"})
        self._on_subsample = method == "mc-subsample"

    def compute(self, data: StepData) -> float:  # noqa: D102
        if self.method == "mc-subsample":
            return float(sum(v.sum() for v in data.subsample_diag_ggn().values()))
        if self.method != "hutch++":
            (name,) = self.needs
            return float(sum(v.sum() for v in data.quantities[name].values()))
        return float(
            hutchpp_trace(_batch_hessian(data), self.num_matvecs, generator=data.generator)
        )


class Alpha(Instrument):
    r"""Cockpit's :math:`\alpha`: where the last step landed on a noise-aware parabola.

    Due at step :math:`t`, it fits :func:`fit_quadratic` to the step from
    :math:`\theta_0 = \theta_{t-1}` to :math:`\theta_1 = \theta_t` (direction
    :math:`d = \theta_1 - \theta_0`, length :math:`t = \lVert d \rVert`) from the mean losses
    :math:`f_i = \frac1N \sum_n \ell_n(\theta_i)`, the directional derivatives
    :math:`f'_i = \frac1N \sum_n g_n(\theta_i)^\top d / t` and their sample variances over the
    batch (:math:`\frac{1}{N-1} \sum_n (\cdot_n - \text{mean})^2`, of :math:`\ell_n` and of
    :math:`g_n^\top d / t`), and reports :func:`alpha_from_fit`. Each point uses its own batch.
    Recorded at the end point :math:`t` (Cockpit files it under :math:`t - 1`); left out when
    step :math:`t - 1` was not monitored.

    Cost and memory: :math:`d` is known only after the optimizer step, so at :math:`t - 1` (the
    start) the shared per-sample statistics keep what :math:`g_n^\top d` needs
    (:class:`~curvlab.diagnostics.per_sample.KeptGradients`: a ``Linear`` layer's inputs and
    output gradients, ``N (in + out)`` numbers, whose projection at step :math:`t` is one
    product :math:`\delta_n^\top D x_n`; other layers' per-sample gradients); at :math:`t` the
    per-sample gradients are projected onto :math:`d` (``"projections"``, from the parameters
    :math:`\theta_{t-1}` that the monitor keeps for ``update_size`` too: one copy of
    :math:`\theta`). Any optimizer works (Cockpit's default ``Alpha`` assumes plain SGD); when
    the update is the start's mean gradient times a step (plain SGD, to
    :data:`PARALLEL_TOLERANCE`), the start's projections are :math:`\lambda\, g_n^\top \bar g`
    from its inner-product statistics, with no product at all. The inputs and output gradients kept from step :math:`t - 1` are the tensors of that forward
    and backward: do not modify a batch in place between two steps.

    On a subsample (the monitor's ``samples``, :math:`S` of the :math:`N` samples at each
    point): the slopes' means are the whole batches' :math:`\bar g_i^\top d / t` (exact, one
    dot product each), their variances the subsamples' sample variances
    :math:`\frac{1}{S-1} \sum_{n \in \mathcal S} (\cdot_n - \text{mean}_{\mathcal S})^2`,
    unbiased for the batch's :math:`\frac{1}{N-1} \sum_n (\cdot_n - \text{mean})^2` under
    sampling without replacement; the losses and their variances use every sample. The fit is
    a nonlinear function of these, so :math:`\alpha` itself is not unbiased either way.
    """

    name = "alpha"
    remembers = True
    needs = frozenset({"previous"})

    def __init__(self) -> None:
        self._start: dict[str, Any] | None = None
        self._mean_buffers: dict[str, Tensor] = {}

    def per_sample_requests(self, due: bool, due_next: bool) -> tuple[str, ...]:  # noqa: D102
        requests = []
        if due and self._start is not None:
            requests.append("projections")  # onto the last update (the monitor's previous)
        if due_next:
            requests += ["keep", "dots_with_mean"]
        return tuple(requests)

    def per_sample_hints(self, due: bool, due_next: bool) -> dict[str, Any]:  # noqa: D102
        # plain SGD: this step's projections by cross Gram matrices with the kept start
        return {"update_start": self._start} if due and self._start is not None else {}

    def remember(self, data: StepData) -> None:  # noqa: D102
        self._start = None
        stats = data.per_sample
        if not stats or not all("keep" in v for v in stats.values()) or data.output is None:
            return
        losses = data.per_sample_losses()
        self._start = {
            "step": data.step,
            "f": float(losses.mean()),
            "var_f": float(losses.var()),
            "kept": {k: v["keep"] for k, v in stats.items()},
            "dots_with_mean": data.dots_with_mean(),
            "mean_grad": copy_into(data.mean_grad(), self._mean_buffers),
            "mean_sq_norm": data.mean_sq_norm(),
            "sampled": data.sampled(),
        }

    def _start_projections(self, direction: dict[str, Tensor], t: float) -> tuple[Tensor, float]:
        r""":math:`g_n(\theta_{t-1})^\top d`, ``[N]`` (or the start's subsample's), and :math:`\bar g_{t-1}^\top d`.

        When :math:`d = \lambda \bar g_{t-1}` to :data:`PARALLEL_TOLERANCE` (plain SGD), it is
        :math:`\lambda\, g_n^\top \bar g_{t-1}`, from the start's inner-product statistics;
        otherwise one product per layer with the kept factors.
        """
        start = self._start
        mean, mean_sq = start["mean_grad"], start["mean_sq_norm"]
        along = _dot(direction, mean)
        if mean_sq > 0:
            residual_sq = t * t - along * along / mean_sq
            if residual_sq <= (PARALLEL_TOLERANCE * t) ** 2:
                return start["dots_with_mean"].double() * (along / mean_sq), along
        kept: dict[str, KeptGradients] = start["kept"]
        return sum(kept[k].dot(direction[k]).double() for k in kept), along

    def compute(self, data: StepData) -> float | None:  # noqa: D102
        start, stats = self._start, data.per_sample
        if (
            start is None
            or start["step"] != data.step - 1
            or not stats
            or not all("projections" in v for v in stats.values())
            or data.output is None
            or data.previous is None
        ):
            return None
        direction = data.update()
        t = math.sqrt(data.update_sq_norm())
        if t == 0.0:
            return -1.0
        start_proj, start_along = self._start_projections(direction, t)
        start_proj = start_proj / t
        end_proj = total(stats, "projections").double() / t
        # the slopes' means from the whole batches' mean gradients (the subsamples' projections
        # give the variances); with all samples both ways agree up to rounding
        start_mean = start_along / t if start["sampled"] else float(start_proj.mean())
        if data.sampled():
            end_mean = _dot(direction, data.mean_grad()) / t
        else:
            end_mean = float(end_proj.mean())
        losses = data.per_sample_losses()
        mu = fit_quadratic(
            t,
            (start["f"], float(losses.mean())),
            (start_mean, end_mean),
            (start["var_f"], float(losses.var())),
            (float(start_proj.var()), float(end_proj.var())),
        )
        return alpha_from_fit(mu, t)


class CABS(Instrument):
    r""":func:`cabs`, the CABS batch-size suggestion, from the gradient variance (:meth:`StepData.variance`).

    Args:
        learning_rate: :math:`\eta`; ``None`` reads the optimizer's first group's ``lr``.
    """

    name = "cabs"
    per_sample = frozenset({"sum_sq"})

    def __init__(self, learning_rate: float | None = None) -> None:
        self.learning_rate = learning_rate

    def compute(self, data: StepData) -> float | None:  # noqa: D102
        lr = self.learning_rate
        if lr is None:
            if data.optimizer is None or "lr" not in data.optimizer.param_groups[0]:
                return None
            lr = float(data.optimizer.param_groups[0]["lr"])
        variance_sum = float(sum(v.double().sum() for v in data.variance().values()))
        return cabs(lr, variance_sum, data.mean_loss())


class EarlyStopping(Instrument):
    r""":func:`early_stopping`, the EB criterion, from the gradient variance (:meth:`StepData.variance`).

    Args:
        epsilon: The :math:`\epsilon` in the denominator.
    """

    name = "early_stopping"
    per_sample = frozenset({"sum_sq"})

    def __init__(self, epsilon: float = 1e-5) -> None:
        self.epsilon = epsilon

    def compute(self, data: StepData) -> float:  # noqa: D102
        return early_stopping(data.mean_grad(), data.variance(), data.num_samples, self.epsilon)


def _histogram_record(data: StepData, request: HistogramRequest) -> dict[str, Any]:
    """Counts summed over parameters, whether they are estimated, and from how many elements."""
    parts = [v[request.key] for v in data.per_sample.values()]
    counts = sum(p["counts"] for p in parts[1:]) + parts[0]["counts"]
    elements, total_elements = sum(p["elements"] for p in parts), sum(p["total"] for p in parts)
    estimated = elements != total_elements
    rounded = counts.tolist() if counts.dim() == 1 else counts.tolist()

    def value(c: float) -> float | int:
        return round(c, 3) if estimated else int(round(c))

    listed = (
        [value(c) for c in rounded]
        if counts.dim() == 1
        else [[value(c) for c in row] for row in rounded]
    )
    return {"counts": listed, "estimated": estimated, "elements": elements, "total": total_elements}


class GradientHistogram1d(Instrument):
    r"""Histogram of the per-sample gradient elements :math:`g_{n,j}` (Cockpit's ``GradHist1d``).

    Values clipped into ``range``, in ``bins`` equal bins, binned inside the backward by the
    shared :class:`~curvlab.diagnostics.per_sample.PerSampleStatistics`. ``budget=None`` bins
    all :math:`N P` elements (exact, the cost of forming every per-sample gradient, which on a
    CPU exceeds a plain training step by far). The default is an unbiased estimate from
    ``budget`` :math:`= 2^{16}` elements (:data:`~curvlab.diagnostics.per_sample.HISTOGRAM_BUDGET`)
    drawn without forming the per-sample gradients, seeded by the monitor's seed and the step:
    each parameter's share is proportional to its size, drawn as per-sample blocks of rows and
    columns of the parameter viewed as a matrix (an outer product of output gradients and
    inputs for a ``Linear`` layer), every element drawn :math:`S R C / (N p)` times in
    expectation and the counts scaled by :math:`N p / (S R C)`
    (:func:`~curvlab.diagnostics.per_sample.block_sample`); a bin holding the fraction
    :math:`q` of the elements has a relative standard deviation of about
    :math:`\sqrt{(1 - q) / (B q)}` or somewhat more (elements of a block are correlated). The
    value is ``{"counts": [bins], "edges": [bins + 1], "estimated": bool, "elements": int,
    "total": int}``: ``elements`` binned out of ``total`` :math:`= N P`; estimated counts are
    floats scaled to ``total``, exact ones integers.

    Args:
        bins: The number of bins.
        range: ``(low, high)``.
        budget: The number of sampled elements, or ``None`` for the exact histogram.
    """

    name = "gradient_histogram_1d"

    def __init__(
        self,
        bins: int = 100,
        range: tuple[float, float] = (-2.0, 2.0),
        budget: int | None = HISTOGRAM_BUDGET,
    ) -> None:
        self.request = HistogramRequest((int(bins),), ((float(range[0]), float(range[1])),), budget)

    def per_sample_requests(self, due: bool, due_next: bool) -> tuple[HistogramRequest, ...]:  # noqa: D102
        return (self.request,) if due else ()

    def compute(self, data: StepData) -> dict[str, Any]:  # noqa: D102
        (bins,), ((low, high),) = self.request.bins, self.request.range
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
        return {**_histogram_record(data, self.request), "edges": edges.tolist()}


class GradientHistogram2d(Instrument):
    r"""Joint histogram of :math:`(g_{n,j}, \theta_j)` (Cockpit's ``GradHist2d``).

    Per-sample gradient elements on the first axis, the parameter values on the second, each
    clipped into its range; binned inside the backward like :class:`GradientHistogram1d`
    (estimated from ``budget`` sampled pairs by default, exact with ``budget=None``). The value
    is ``{"counts": [bins_g][bins_theta], "grad_edges": [...], "param_edges": [...],
    "estimated": bool, "elements": int, "total": int}``. Due every 10 steps by default (its
    record holds ``bins_g * bins_theta`` numbers).

    Args:
        bins: ``(bins_g, bins_theta)``.
        range: ``((low_g, high_g), (low_theta, high_theta))``.
        budget: The number of sampled elements, or ``None`` for the exact histogram.
    """

    name = "gradient_histogram_2d"
    every = 10

    def __init__(
        self,
        bins: tuple[int, int] = (40, 50),
        range: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0)),
        budget: int | None = HISTOGRAM_BUDGET,
    ) -> None:
        self.request = HistogramRequest(
            (int(bins[0]), int(bins[1])),
            tuple((float(lo), float(hi)) for lo, hi in range),
            budget,
        )

    def per_sample_requests(self, due: bool, due_next: bool) -> tuple[HistogramRequest, ...]:  # noqa: D102
        return (self.request,) if due else ()

    def compute(self, data: StepData) -> dict[str, Any]:  # noqa: D102
        edges = [
            torch.linspace(lo, hi, b + 1, dtype=torch.float64).tolist()
            for b, (lo, hi) in zip(self.request.bins, self.request.range, strict=True)
        ]
        record = _histogram_record(data, self.request)
        return {
            "counts": record.pop("counts"),
            "grad_edges": edges[0],
            "param_edges": edges[1],
            **record,
        }


class _TIC(Instrument):
    kind: ClassVar[str] = "diag"
    every = 10
    needs = frozenset({"DiagHessian"})
    per_sample = frozenset({"sum_sq"})

    def __init__(self, epsilon: float = 1e-7, curvature: str = "exact") -> None:
        if curvature not in ("exact", "mc", "mc-subsample"):
            raise ValueError(
                f"{type(self).__name__} curvature must be 'exact', 'mc' or 'mc-subsample', "
                f"got {curvature!r}"
            )
        self.epsilon = epsilon
        self.curvature = curvature
        if curvature == "mc":
            self.needs = frozenset({"DiagGGNMC"})
        elif curvature == "mc-subsample":
            self.needs = frozenset({"batch"})

    def compute(self, data: StepData) -> float:  # noqa: D102
        n, scale = data.num_samples, data.mean_scale()
        if self.curvature == "mc-subsample":
            diagonal = data.subsample_diag_ggn()
        else:
            (name,) = self.needs
            diagonal = data.quantities[name]
        # C = sum_sq / N and H = scale * diagonal, folded into the sums
        return _scaled_tic(data.sum_sq(), diagonal, 1.0 / n, scale, self.kind, self.epsilon)


class TICDiag(_TIC):
    r""":func:`tic` with diagonals, from :math:`\sum_n g_n^{\odot 2}` and ``DiagHessian`` (Cockpit's ``TICDiag``).

    The exact Hessian diagonal backpropagates the loss Hessian's square root (``C`` columns for
    ``C`` classes). ``curvature="mc"`` takes the Monte-Carlo GGN diagonal instead (one sampled
    column; the Hessian diagonal in expectation only for piecewise-linear networks, and the
    ratio of an estimate is biased), shared with ``HessianTrace(method="mc")``;
    ``curvature="mc-subsample"`` the same from the monitor's subsample only
    (:meth:`StepData.subsample_diag_ggn`), shared with ``HessianTrace(method="mc-subsample")``.
    Due every 10 steps by default.

    Args:
        epsilon: The :math:`\epsilon` in the denominator.
        curvature: ``"exact"`` (``DiagHessian``), ``"mc"`` (``DiagGGN(mc_samples=1)``) or
            ``"mc-subsample"``.
    """

    name = "tic_diag"
    kind = "diag"


class TICTrace(_TIC):
    r""":func:`tic` with traces, from :math:`\sum_n g_n^{\odot 2}` and ``DiagHessian`` (Cockpit's ``TICTrace``).

    Due every 10 steps by default; ``curvature`` as for :class:`TICDiag`.

    Args:
        epsilon: The :math:`\epsilon` in the denominator.
        curvature: ``"exact"`` (``DiagHessian``), ``"mc"`` (``DiagGGN(mc_samples=1)``) or
            ``"mc-subsample"``.
    """

    name = "tic_trace"
    kind = "trace"


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
        Alpha,
        CABS,
        EarlyStopping,
        GradientHistogram1d,
        GradientHistogram2d,
        TICDiag,
        TICTrace,
    )
}
"""Every instrument class by name."""

_ECONOMY = (
    "loss",
    "alpha",
    "gradient_histogram_1d",
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
    "business": (*_ECONOMY, "tic_diag", "hessian_trace"),
    "full": (
        *_ECONOMY,
        "tic_diag",
        "hessian_trace",
        "hessian_max_eig",
        "gradient_histogram_2d",
        "mean_gsnr",
        "cabs",
        "early_stopping",
        "tic_trace",
    ),
}
"""The instruments of each preset: Cockpit's economy, business and full, and ``full`` adds the
instruments no Cockpit preset has (mean GSNR, CABS, early stopping, TIC trace)."""


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
