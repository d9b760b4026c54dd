r"""Every per-sample statistic of a monitored step from one read of each layer's factors.

The instruments due at one step (norm, inner-product and orthogonality tests, the per-sample
gradient norms, alpha, TIC, GSNR, CABS, early stopping, the gradient histograms) all read the
per-sample gradients :math:`g_n`. :class:`PerSampleStatistics` is the one engine quantity that
serves them: for each parameter, when its output gradient passes in the backward, it computes
what the due instruments asked for (:data:`STATISTICS`, :class:`HistogramRequest`) from the
engine's primitives (:class:`~curvlab.backprop.derivatives.ParamDerivatives`), choosing the
cheaper route by multiply-add count, and lets the factor go:

* **factored** parameters (:meth:`~curvlab.backprop.derivatives.ParamDerivatives.factored`: a
  ``Linear`` layer without positions, :math:`g_n = \delta_n x_n^\top`) never form ``[N, P]``.
  :math:`\lVert g_n \rVert^2 = \lVert x_n \rVert^2 \lVert \delta_n \rVert^2` (``O(N (in +
  out))``); :math:`g_n^\top \bar g = \frac1N \sum_m (x_n^\top x_m)(\delta_n^\top \delta_m)` by the
  Gram matrix when :math:`N (\text{in} + \text{out}) < \text{in} \cdot \text{out}`
  (:math:`N^2 (\text{in} + \text{out})` multiply-adds), else :math:`\delta_n^\top \bar G x_n`
  after the backward (one product, :math:`N \cdot \text{in} \cdot \text{out}`), batched with the
  projection onto a direction :math:`\delta_n^\top D x_n`; :math:`\sum_n g_n^{\odot 2} =
  (\delta^{\odot 2})^\top x^{\odot 2}`; histogram elements :math:`x_{n,i} \delta_{n,o}`, ``O(1)``
  each.
* **other** parameters (convolutions, layers with positions, generic modules): when any dot
  product is due the per-sample gradients ``[N, p]`` are formed **once** (for a convolution this
  costs the multiply-adds of its weight gradient, the same as the factored alternatives, a
  convolution of the input with the vector as weight per dot product, or the position-pair Gram
  :math:`N^2 T^2 (I + O)`, which loses for every 3C3D layer) and every statistic is read off
  them; with only norms due, the engine's ``sq_norm`` (position-pair Gram or per-sample
  products, whichever is cheaper); with only a histogram due, sampled elements (a dot over the
  positions each).

Alpha needs :math:`g_n(\theta_{t-1})^\top d` for the update :math:`d = \theta_t -
\theta_{t-1}`, known only after the optimizer step: ``keep`` holds, per parameter, what that dot
product needs (:class:`KeptGradients`: a factored parameter's inputs and output gradients, whose
dot product is one product at the next step; otherwise the per-sample gradients while
``N p <= KEEP_ELEMENTS``, else the factors again).

Histograms (:class:`HistogramRequest`) are exact over all :math:`N P` elements, or (the
default) an unbiased estimate from a fixed budget :math:`B` (:data:`HISTOGRAM_BUDGET`) of
elements sampled without forming the per-sample gradients. Each parameter gets
:math:`b_p = \lceil B p / P \rceil` of the budget and is viewed as a matrix ``[p_0, p / p_0]``
(a ``Linear`` weight ``[out, in]``, a convolution's ``[out, in/G * K]``); :func:`block_sample`
takes :math:`S` samples (all :math:`N` when :math:`b_p \ge N`) and per sample :math:`R` rows and
:math:`C` columns, drawn uniformly with replacement from a generator seeded by the monitor's
seed, the step and the parameter's position, :math:`S R C \approx b_p`; the block of sample
:math:`n` is the outer product of :math:`R` output gradients and :math:`C` inputs for a
``Linear`` layer (:math:`S (R + C)` numbers read for :math:`S R C` elements), and :math:`C`
gathered patch rows against :math:`R` output-gradient rows for a convolution
(:meth:`~curvlab.backprop.derivatives.ParamDerivatives.sample_block`). Every element is drawn
:math:`S R C / (N p)` times in expectation, so the counts scaled by :math:`N p / (S R C)` are
unbiased. Elements of one sample's block share rows and columns, so the variance is somewhat
above that of :math:`S R C` independent draws (for which a bin holding the fraction :math:`q`
has relative standard deviation :math:`\sqrt{(1 - q) / (b_p q)}`); blocks, not independent
elements, because drawing and gathering an index per element costs several times the binning.
A parameter with :math:`N p \le b_p` is binned exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab.backprop import GRAD, Quantity

STATISTICS = ("sq_norms", "dots_with_mean", "sum_sq", "projections", "keep")
r"""What instruments may ask :class:`PerSampleStatistics` for, besides histograms:
:math:`\lVert g_n \rVert^2` ``[N]``, :math:`g_n^\top \bar g` ``[N]``, :math:`\sum_n g_n^{\odot 2}`
``[*p]``, :math:`g_n^\top (\theta - \theta_{\text{ref}})` ``[N]`` and :class:`KeptGradients`."""

HISTOGRAM_BUDGET = 2**16
"""The default number of per-sample gradient elements a histogram estimate bins.

Binning costs some 10 ns per element on one CPU thread; :math:`2^{16}` elements take about a
tenth of a plain training step of mlp-mnist at batch 128 (and a bin holding 1 % of the
elements then has a relative standard deviation of about 4 % for independent draws)."""

PARALLEL_TOLERANCE = 1e-3
r"""An update :math:`d` counts as the previous mean gradient times a step (plain SGD) when its
residual after the projection on that gradient is below this fraction of :math:`\lVert d
\rVert` (plain SGD leaves only the rounding of the parameter update); then projections onto
:math:`d` come from :math:`g_n^\top \bar g`-type products."""

KEEP_ELEMENTS = 2**24
"""Largest ``N p`` whose per-sample gradients ``keep`` holds (else the factors)."""


@dataclass(frozen=True)
class HistogramRequest:
    r"""A histogram of the per-sample gradient elements (1d) or of their pairs with :math:`\theta_j` (2d).

    Attributes:
        bins: ``(bins,)`` or ``(bins_g, bins_theta)``.
        range: ``((low, high),)`` or ``((low_g, high_g), (low_theta, high_theta))``; values
            outside are clipped into the outer bins.
        budget: The number of sampled elements of the estimate, ``None`` for all :math:`N P`.
    """

    bins: tuple[int, ...]
    range: tuple[tuple[float, float], ...]
    budget: int | None = HISTOGRAM_BUDGET

    @property
    def key(self) -> str:
        """The key of its counts in a parameter's statistics."""
        return f"histogram(bins={self.bins}, range={self.range}, budget={self.budget})"


class KeptGradients:
    r"""One parameter's per-sample gradients, kept for a dot product with a later direction.

    Holds either the per-sample gradients ``rows`` ``[N, p]`` or the engine's view of the
    parameter (its inputs and output gradients, not consumed), whose
    :meth:`~curvlab.backprop.derivatives.ParamDerivatives.dot` is one product.
    """

    def __init__(self, view: Any = None, rows: Tensor | None = None) -> None:
        self.view, self.rows = view, rows

    def dot(self, direction: Tensor) -> Tensor:
        r""":math:`g_n^\top d`, ``[N]``, for ``direction`` :math:`d` shaped like the parameter."""
        if self.rows is not None:
            return self.rows @ direction.flatten().to(self.rows.dtype)
        vector = direction.to(self.view.param.dtype).reshape(1, *self.view.shape)
        return self.view.dot(GRAD, vector)[0, :, 0]


class _Deferred:
    """Dot products that need this backward's gradient: done once the pass has ended.

    ``rows`` (per-sample gradients of a subsample, ``[S, p]``) replace the view's product.
    """

    def __init__(self, view: Any, direction: Tensor | None, rows: Tensor | None = None) -> None:
        self.view, self.direction, self.rows = view, direction, rows


def sample_index(n: int, samples: int | None, seed: int, device: Any = None) -> Tensor | None:
    r"""The subsample of a step's per-sample statistics: ``samples`` of ``n`` indices, or ``None``.

    Drawn uniformly without replacement (sorted) by a generator seeded with ``seed`` (the
    monitor's ``seed + step``); ``None`` (all samples, exact) when ``samples`` is ``None`` or
    at least ``n``.
    """
    if samples is None or samples >= n:
        return None
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 999_983)
    return torch.randperm(n, generator=generator, device=device)[:samples].sort().values


class PerSampleStatistics(Quantity):
    r"""The per-sample statistics the due instruments asked for, per parameter (module doc).

    Its value for a parameter is a dict with the requested entries of :data:`STATISTICS` and,
    per :class:`HistogramRequest`, ``{"counts": [*bins], "elements": int, "total": int}``
    (``elements`` binned out of ``total`` :math:`= N p`; ``counts`` scaled to ``total``).
    Scaling: none (:math:`g_n` carries no :math:`1/N`; :math:`\bar g = \frac1N \sum_n g_n`).

    Args:
        requests: Entries of :data:`STATISTICS` and :class:`HistogramRequest` objects.
        reference: :math:`\theta_{\text{ref}}` by parameter name (for ``"projections"``); the
            direction is formed when the backward runs.
        total_params: :math:`P`, the number of trainable parameter entries (for the budgets).
        seed: Seeds the histogram samples (with each parameter's position).
        update_start: Alpha's kept start point (``"kept"``, ``"mean_grad"``,
            ``"mean_sq_norm"``), for projections by cross Gram matrices under plain SGD
            (:meth:`_along_start_mean`); changes how, not what, is computed.
        samples: :math:`S`, the size of the subsample the statistics are computed on
            (:func:`sample_index`, seeded by ``seed``); ``None`` for all :math:`N` samples.
            With :math:`S < N`: ``sq_norms``, ``dots_with_mean``, ``projections`` and
            ``keep`` are the subsample's ``[S]`` (with the full batch's :math:`\bar g`),
            ``sum_sq`` is :math:`\frac{N}{S} \sum_{n \in \mathcal S} g_n^{\odot 2}`, unbiased
            for :math:`\sum_n g_n^{\odot 2}`; histograms keep their own sampling (all
            samples).
        update_buffers: Where the directions :math:`\theta - \theta_{\text{ref}}` go, by
            name (buffers kept across steps; filled on first use); :attr:`directions` holds
            them once the pass has formed them.
    """

    def __init__(
        self,
        requests: Iterable[str | HistogramRequest],
        reference: Mapping[str, Tensor] | None = None,
        total_params: int = 1,
        seed: int = 0,
        update_start: Mapping[str, Any] | None = None,
        samples: int | None = None,
        update_buffers: dict[str, Tensor] | None = None,
    ) -> None:
        requests = list(requests)
        self.histograms = tuple(
            sorted({r for r in requests if isinstance(r, HistogramRequest)}, key=lambda r: r.key)
        )
        self.wanted = frozenset(r for r in requests if isinstance(r, str))
        unknown = self.wanted - set(STATISTICS)
        if unknown:
            raise ValueError(
                f"unknown per-sample statistics {sorted(unknown)}; valid: {STATISTICS}"
            )
        if "projections" in self.wanted and reference is None:
            raise ValueError("the 'projections' statistic needs a reference")
        self.reference = reference
        self.total_params, self.seed = max(1, total_params), seed
        self._positions: dict[str, int] = {}
        self._routes: dict[int, bool] = {}
        self.update_start = update_start
        self._step_along: float | None | bool = False  # not yet checked
        if samples is not None and (isinstance(samples, bool) or samples < 2):
            raise ValueError(f"samples must be an int of at least 2 or None, got {samples!r}")
        self.samples = samples
        self._index: tuple[int, Tensor | None] | None = None
        self.update_buffers = {} if update_buffers is None else update_buffers
        self.directions: dict[str, Tensor] = {}

    @property
    def name(self) -> str:  # noqa: D102
        parts = [s for s in STATISTICS if s in self.wanted] + [h.key for h in self.histograms]
        if self.samples is not None:
            parts.append(f"samples={self.samples}")
        return f"PerSampleStatistics({', '.join(parts)})"

    def sources(self) -> tuple:  # noqa: D102
        return (GRAD,)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, view, ctx) -> dict[str, Any]:  # noqa: D102
        return self.finish_streamed(self.evaluate_streamed(view, ctx), view.name, ctx)

    def index(self, n: int, device: Any = None) -> Tensor | None:
        """The subsample of a batch of ``n`` (:func:`sample_index`; drawn once per pass)."""
        if self._index is None or self._index[0] != n:
            self._index = (n, sample_index(n, self.samples, self.seed, device))
        return self._index[1]

    def evaluate_streamed(self, view, ctx) -> dict[str, Any]:  # noqa: D102
        wanted, full, n = self.wanted, view, view.num_samples
        index = self.index(n, view.param.device)
        exact_histogram = any(self._budget(h, full, ctx) is None for h in self.histograms)
        rows = full_rows = None
        if index is not None and not full.selectable():  # the batch elsewhere (recurrent)
            full_rows = full.jac_t(GRAD)[0].flatten(start_dim=1)
            rows = full_rows[index]
        factored = full.factored()
        dots = {"dots_with_mean", "projections", "keep"} & wanted
        if index is not None and rows is None and (dots or "sum_sq" in wanted or not factored):
            view = full.select(index)  # a factored weight's norms are cheap on all samples
        if rows is None and exact_histogram:
            full_rows = full.jac_t(GRAD)[0].flatten(start_dim=1)  # [N, p], once
            rows = full_rows if index is None else full_rows[index]
        if rows is None and not factored and dots and self._route(view, wanted):
            rows = view.jac_t(GRAD)[0].flatten(start_dim=1)  # [S, p], once
        s = n if index is None else index.numel()
        out: dict[str, Any] = {}
        if "sq_norms" in wanted:
            if rows is not None:  # norms, not squares: no [N, p] temporary
                out["sq_norms"] = torch.linalg.vector_norm(rows, dim=1).square_()
            elif view is full and index is not None:  # factored: O(N (in + out)) for all
                out["sq_norms"] = full.sq_norm(GRAD)[0][index]
            else:
                out["sq_norms"] = view.sq_norm(GRAD)[0]
        if "sum_sq" in wanted:
            if rows is not None:
                out["sum_sq"] = torch.linalg.vector_norm(rows, dim=0).square_().reshape(view.shape)
            else:
                out["sum_sq"] = view.sum_sq(GRAD, per_sample=False)
            if s != n:
                out["sum_sq"] = out["sum_sq"].mul_(n / s)
        direction = None
        if "projections" in wanted:
            start = self.reference.get(view.name)
            if start is None:
                out["projections"] = view.param.new_zeros(s)
            else:
                direction = self._direction(view, start)
                if rows is not None:
                    out["projections"] = rows @ direction.flatten()
                elif index is None:
                    along = self._along_start_mean(view, ctx)
                    if along is not None:
                        out["projections"] = along
                        direction = None
        deferred_rows = None
        if "dots_with_mean" in wanted:
            if rows is not None and index is None:
                mean = torch.mv(rows.T, rows.new_full((n,), 1.0 / n))
                out["dots_with_mean"] = rows @ mean
            elif rows is not None:
                deferred_rows = rows  # with the full batch's mean, once the pass has ended
            elif _gram_is_cheaper(full):
                if index is None:
                    out["dots_with_mean"] = view.gram(GRAD)[0, :, 0].mean(-1)
                else:  # the subsample against the whole batch: S N (in + out)
                    out["dots_with_mean"] = view.cross_gram(GRAD, full)[0, :, 0].mean(-1)
        deferred_direction = (
            direction if "projections" not in out and direction is not None else None
        )
        if (
            "dots_with_mean" in wanted and "dots_with_mean" not in out
        ) or deferred_direction is not None:
            out["deferred"] = _Deferred(view, deferred_direction, deferred_rows)
        if "keep" in wanted:
            if rows is not None and rows.numel() <= KEEP_ELEMENTS:
                out["keep"] = KeptGradients(rows=rows)
            else:
                out["keep"] = KeptGradients(view=view)
        for request in self.histograms:
            out[request.key] = self._histogram(request, full, ctx, full_rows)
        return out

    def _direction(self, view, start: Tensor) -> Tensor:
        r""":math:`\theta - \theta_{\text{ref}}` in the buffer kept across steps (:attr:`directions`)."""
        param = view.param.detach()
        buffer = self.update_buffers.get(view.name)
        if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype:
            self.update_buffers[view.name] = buffer = torch.empty_like(param)
        torch.sub(param, start.to(param.dtype), out=buffer)
        self.directions[view.name] = buffer
        return buffer

    def finish_streamed(self, partial: dict[str, Any], name: str, ctx) -> dict[str, Any]:  # noqa: D102
        deferred = partial.pop("deferred", None)
        if deferred is None:
            return partial
        view = deferred.view
        if "dots_with_mean" in self.wanted and "dots_with_mean" not in partial:
            # with the gradient of L, then scaled to the mean's (no parameter-sized temporary)
            grad, scale = ctx.grad[name], 1.0 / (ctx.r * ctx.num_samples)
            if deferred.rows is not None:
                dots = deferred.rows @ grad.flatten().to(deferred.rows.dtype)
            else:
                dots = view.dot(GRAD, grad.to(view.param.dtype)[None])[0, :, 0]
            partial["dots_with_mean"] = dots.mul_(scale)
        if deferred.direction is not None:
            partial["projections"] = view.dot(GRAD, deferred.direction[None])[0, :, 0]
        return partial

    def _along_start_mean(self, view, ctx) -> Tensor | None:
        r""":math:`g_n^\top d` as :math:`\lambda\, g_n^\top \bar g_{t-1}` when that is cheaper, else ``None``.

        When the update :math:`d = \theta - \theta_{\text{ref}}` is the previous step's mean
        gradient times :math:`\lambda` (plain SGD; checked once per pass, to
        :data:`PARALLEL_TOLERANCE`) and ``update_start`` holds
        that step's kept factors, a factored weight's projections are
        :math:`\frac{\lambda}{N'} \sum_q g_n^\top g'_q` by the cross Gram matrix
        (:meth:`~curvlab.backprop.derivatives.ParamDerivatives.cross_gram`,
        :math:`N N' (\text{in} + \text{out})` multiply-adds instead of
        :math:`N \cdot \text{in} \cdot \text{out}`).
        """
        start = self.update_start
        if start is None or not _gram_is_cheaper(view):
            return None
        kept = start["kept"].get(view.name)
        if kept is None or kept.view is None or not (view.factored() and kept.view.factored()):
            return None
        if self._step_along is False:
            self._step_along = self._step_along_mean(ctx)
        if self._step_along is None:
            return None
        gram = view.cross_gram(GRAD, kept.view)[0, :, 0]  # [N, N']
        return gram.mean(-1) * self._step_along

    def _step_along_mean(self, ctx) -> float | None:
        r""":math:`\lambda` with :math:`d = \lambda \bar g_{t-1}` to the tolerance, or ``None``."""
        mean, mean_sq = self.update_start["mean_grad"], self.update_start["mean_sq_norm"]
        if not mean_sq > 0:
            return None
        params = dict(ctx.model.named_parameters())
        along = d_sq = 0.0
        for name, start in self.reference.items():
            d = params[name].detach() - start.to(params[name].dtype)
            along += float(torch.dot(d.flatten(), mean[name].flatten().to(d.dtype)))
            d_sq += float(torch.linalg.vector_norm(d)) ** 2
        if d_sq == 0 or d_sq - along * along / mean_sq > (PARALLEL_TOLERANCE**2) * d_sq:
            return None
        return along / mean_sq

    def _route(self, view, wanted: frozenset[str]) -> bool:
        """:func:`_rows_are_cheaper`, decided once per module (by its first parameter, the weight)."""
        module = view.uses[0][0].module if view.uses else None
        key = id(module)
        if key not in self._routes:
            self._routes[key] = len(view.shape) < 2 or _rows_are_cheaper(view, wanted)
        return self._routes[key]

    # ------------------------------------------------------------------ histograms
    def _budget(self, request: HistogramRequest, view, ctx) -> int | None:
        """The parameter's share of the budget, ``None`` for all its elements."""
        if request.budget is None:
            return None
        share = math.ceil(request.budget * math.prod(view.shape) / self.total_params)
        return None if share >= view.num_samples * math.prod(view.shape) else share

    def _position(self, name: str, ctx) -> int:
        if not self._positions:
            self._positions = {k: i for i, k in enumerate(ctx.param_names)}
        return self._positions.get(name, 0)

    def _histogram(self, request: HistogramRequest, view, ctx, rows: Tensor | None) -> dict:
        n, p = view.num_samples, math.prod(view.shape)
        budget = self._budget(request, view, ctx)
        theta = view.param.detach()
        if budget is None:
            values = rows if rows is not None else view.jac_t(GRAD)[0].flatten(start_dim=1)
            values, weight = values.flatten(), 1.0
            params = theta.flatten().expand(n, p).flatten() if len(request.bins) == 2 else None
        else:
            generator = torch.Generator(device=theta.device)
            generator.manual_seed(self.seed * 1_000_003 + self._position(view.name, ctx))
            first = view.shape[0] if len(view.shape) else 1
            samples, picked_rows, picked_columns = block_sample(
                n, first, p // first, budget, generator, theta.device
            )
            if rows is not None:  # [N, p] already formed: gather from it (no copy)
                matrix = rows.view(n, first, -1)
                values = matrix[
                    samples[:, None, None], picked_rows[:, :, None], picked_columns[:, None, :]
                ]
            else:
                values = view.sample_block(GRAD, samples, picked_rows, picked_columns)[0]
            weight = n * p / values.numel()
            params = None
            if len(request.bins) == 2:
                grid = theta.reshape(first, -1)
                params = grid[picked_rows[:, :, None], picked_columns[:, None, :]].flatten()
            values = values.flatten()
        counts = bin_counts(values, request, params) * weight
        return {"counts": counts, "elements": values.numel(), "total": n * p}


def block_sample(
    n: int, first: int, rest: int, budget: int, generator: torch.Generator, device: Any
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Which per-sample gradient elements a histogram estimate bins (the module doc).

    The parameter viewed as a matrix ``[first, rest]``: ``S`` samples (all ``N`` when the
    budget allows, else ``budget`` of them without replacement) and per sample ``R`` rows and
    ``C`` columns drawn uniformly with replacement, :math:`R C pprox 	ext{budget} / S` in the
    matrix's proportions. Each element :math:`(n, j)` is drawn :math:`S R C / (N p)` times in
    expectation, so counts scaled by :math:`N p / (S R C)` are unbiased.

    Returns:
        ``samples`` ``[S]``, ``rows`` ``[S, R]``, ``columns`` ``[S, C]``.
    """
    s = min(n, max(1, budget))
    per_sample = budget / s
    r = min(first, max(1, round(math.sqrt(per_sample * first / rest))))
    c = min(rest, max(1, round(per_sample / r)))
    if s == n:
        samples = torch.arange(n, device=device)
    else:
        samples = torch.randperm(n, generator=generator, device=device)[:s]
    rows = torch.randint(0, first, (s, r), generator=generator, device=device)
    columns = torch.randint(0, rest, (s, c), generator=generator, device=device)
    return samples, rows, columns


WRITE_COST = 128
"""Multiply-adds one written element of the per-sample gradients costs in :func:`_rows_are_cheaper`.

Forming ``[N, p]`` writes :math:`N p` numbers to fresh memory and its batched products
``[O, T] @ [T, I]`` run far below a convolution's speed when :math:`T` is small (3C3D's third
layer, :math:`T = 36`, on one CPU thread: 107 ms against 17 ms for the forward convolution with
the same multiply-adds)."""


def _rows_are_cheaper(view, wanted: frozenset[str]) -> bool:
    r"""Form the per-sample gradients (``True``) or take the factored route, by multiply-adds.

    For a parameter ``[O, I]`` (a convolution's weight viewed as ``[out, in/G * K]``) shared over
    :math:`T` positions: forming the rows costs :math:`N O I (T + W)` (:data:`WRITE_COST`
    :math:`W`) and serves every statistic; the factored route costs the norms' cheaper form,
    :math:`\min(N T^2 (I + O), N O I (T + W))` (the position-pair Gram or the per-sample
    products), plus :math:`N T O I` per dot product (a convolution with the vector as weight:
    the mean gradient, the update, and the kept start of alpha at the next step). ``sum_sq``
    always forms the rows (the engine's squares of a convolution's per-sample gradients form the
    products anyway). A bias follows its module's weight (:meth:`PerSampleStatistics._route`):
    the engine reduces a call for all of a module's parameters at once.
    """
    if "sum_sq" in wanted:
        return True  # the engine's squares of a non-factored parameter form the products anyway
    n, p = view.num_samples, math.prod(view.shape)
    o = view.shape[0] if len(view.shape) else 1
    i, t = p // o, view.positions(GRAD)
    rows = n * o * i * (t + WRITE_COST)
    norms = min(n * t * t * (i + o), rows) if "sq_norms" in wanted else 0
    if norms == rows and norms:
        return True  # the norms form the rows anyway
    products = sum(s in wanted for s in ("dots_with_mean", "projections", "keep"))
    return rows <= norms + products * n * t * o * i


def _gram_is_cheaper(view) -> bool:
    r"""For a factored weight ``[out, in]``: :math:`N^2 (in + out) < N \cdot in \cdot out`."""
    return len(view.shape) == 2 and view.num_samples * sum(view.shape) < math.prod(view.shape)


def bin_index(values: Tensor, bins: int, low: float, high: float) -> Tensor:
    """Bin indices of ``values`` clipped into ``[low, high]`` (equal bins; ``high`` in the last)."""
    width = (high - low) / bins
    index = torch.floor((values.clamp(low, high) - low) / width).long()
    return index.clamp_(0, bins - 1)


def bin_counts(values: Tensor, request: HistogramRequest, params: Tensor | None) -> Tensor:
    """Counts ``[*bins]`` (float64) of ``values`` (and, 2d, the paired ``params``)."""
    if len(request.bins) == 1:
        (bins,), ((low, high),) = request.bins, request.range
        return torch.histc(values.clamp(low, high), bins, low, high).double()
    (bg, bt), ((lg, hg), (lt, ht)) = request.bins, request.range
    joint = bin_index(values, bg, lg, hg) * bt + bin_index(params, bt, lt, ht)
    return torch.bincount(joint, minlength=bg * bt).reshape(bg, bt).double()


def total(stats: Mapping[str, Mapping[str, Any]], key: str) -> Any:
    """``stats[name][key]`` summed over parameters."""
    values = [v[key] for v in stats.values()]
    return sum(values[1:], values[0])
