r"""Reduce :mod:`curvlab.backprop` quantities over data-parallel ranks.

Rank :math:`k` holds :math:`N_k` of the :math:`N = \sum_k N_k` samples. For a mean loss the
engine's values carry the batch factor :math:`r_k = 1/N_k`; a quantity of degree :math:`d` in
:math:`r` (the gradient, DiagGGN, DiagHessian: :math:`d = 1`; the unscaled SumGradSquared,
BatchGrad, BatchL2: :math:`d = 0`) reduces to

.. math:: V = \sum_k (N_k / N)^d \, V_k

(a sum loss: :math:`V = \sum_k V_k`). Per-sample values (BatchGrad, BatchL2, BatchDiagGGN,
BatchDiagHessian ``[N_k, ...]``, SqrtGGN ``[M, N_k, ...]`` of degree :math:`\frac12`) are
rescaled the same way and gathered along the sample axis in rank order (unequal shards are
padded for the collective and trimmed). Kronecker blocks reduce their unnormalised sums:
:math:`A = \sum_k N_k T\, A_k / \sum_k N_k T` (``input_count``) and :math:`B = r \sum_k B_k /
r_k` with :math:`r = 1/N` (mean) or :math:`1` (sum).

The gradient variance is not a mean of the ranks' variances. With :math:`\bar g_k` the rank's
mean per-sample gradient (``grad`` :math:`/ (r_k N_k)`) and :math:`S_k = N_k (V_k + \bar
g_k^{\odot 2}) = \sum_{n \in k} g_n^{\odot 2}`, the sums and counts are all-reduced and

.. math:: V = \frac1N \sum_k S_k - \Big(\frac1N \sum_k N_k \bar g_k\Big)^{\odot 2}

(clamped at zero, as the engine's :class:`~curvlab.backprop.Variance`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.backprop import KronFactors
from curvlab.backprop.results import Results
from curvlab.distributed.buckets import (
    DEFAULT_BUCKET_BYTES,
    all_reduce_bucketed,
    require_initialized,
)

SUM_DEGREES = {"grad": 1, "SumGradSquared": 0, "DiagHessian": 1}
"""Quantities reduced by a sum, with their degree in the batch factor."""
SUM_PREFIXES = {"DiagGGN": 1, "BL89": 1, "HesScale": 1}
"""Name prefixes (MC variants carry a suffix) reduced by a sum, with their degree."""
GATHER_DEGREES = {"BatchGrad": 0, "BatchL2": 0, "BatchDiagHessian": 0}
"""Per-sample quantities gathered along the sample axis (axis 0), with their degree."""
GATHER_PREFIXES = {"BatchDiagGGN": (0, 0), "SqrtGGN": (0.5, 1)}
"""Name prefixes (MC variants carry a suffix) of gathered quantities: (degree, sample axis)."""
VARIANCE = "Variance"
"""The gradient variance, reduced through sums of squares and counts."""


def _is_mean(block: KronFactors) -> bool:
    return abs(block.batch_factor * block.num_samples - 1.0) < 1e-9 and block.num_samples > 1


def reduce_kron_blocks(
    blocks: Mapping[str, KronFactors],
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> dict[str, KronFactors]:
    r"""All-reduce Kronecker blocks, bucketed, to the blocks of the whole batch.

    Args:
        blocks: ``{name: KronFactors}`` of this rank's samples (a joint block may appear under
            several names; it is reduced once).
        group: The process group (``None``: the default one).
        bucket_bytes: The bucket size of the all-reduce.

    Returns:
        ``{name: KronFactors}`` with the whole batch's factors, ``num_samples`` and
        ``input_count``, identical on every rank.

    Raises:
        RuntimeError: If the process group is not initialised.
    """
    require_initialized("reduce_kron_blocks")
    unique = list({id(b): b for b in blocks.values()}.values())
    tensors: list[Tensor] = []
    for b in unique:
        counts = torch.tensor([b.num_samples, b.input_count], dtype=torch.float64)
        tensors += [b.input_sum, b.output_sum, counts.to(b.input_factor.device)]
    reduced = all_reduce_bucketed(tensors, group, bucket_bytes)
    new: dict[int, KronFactors] = {}
    for i, b in enumerate(unique):
        input_sum, output_sum, counts = reduced[3 * i : 3 * i + 3]
        n, count = int(round(float(counts[0]))), int(round(float(counts[1])))
        r = 1.0 / n if _is_mean(b) else b.batch_factor
        new[id(b)] = KronFactors(input_sum / count, output_sum * r, b.layout, b.names, n, count, r)
    return {name: new[id(b)] for name, b in blocks.items()}


def _degree(name: str, table: Mapping[str, int]) -> int | None:
    if name in table:
        return table[name]
    return next((d for p, d in SUM_PREFIXES.items() if name.startswith(p)), None)


def _gather_spec(name: str) -> tuple[float, int] | None:
    """``(degree, sample axis)`` of a gathered quantity, or ``None``."""
    if name in GATHER_DEGREES:
        return GATHER_DEGREES[name], 0
    return next((spec for p, spec in GATHER_PREFIXES.items() if name.startswith(p)), None)


def _gather(value: Tensor, group: dist.ProcessGroup | None, axis: int = 0) -> Tensor:
    """All-gather ``value`` along ``axis`` in rank order (shards of any sizes)."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([value.shape[axis]]), group=group)
    counts = [int(s) for s in sizes]
    pad = max(counts) - value.shape[axis]
    moved = value.movedim(axis, 0)
    if pad:
        moved = torch.cat([moved, moved.new_zeros(pad, *moved.shape[1:])])
    parts = [torch.empty_like(moved) for _ in range(world)]
    dist.all_gather(parts, moved.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).movedim(0, axis)


def reduce_results(
    results: Results,
    group: dist.ProcessGroup | None = None,
    reduction: str = "mean",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Results:
    r"""Reduce one rank's :class:`~curvlab.backprop.Results` to those of the whole batch.

    Sums (``grad``, SumGradSquared, DiagGGN, DiagHessian, BL89, HesScale) are all-reduced with
    the weights :math:`(N_k/N)^d`, Kronecker blocks by :func:`reduce_kron_blocks`, the Variance
    through sums of squares and counts (module docstring), per-sample quantities (BatchGrad,
    BatchL2, BatchDiagGGN, BatchDiagHessian, SqrtGGN) rescaled and all-gathered along the
    sample axis; the loss is the weighted mean (``"mean"``) or the sum (``"sum"``), ``output``
    is gathered.

    Args:
        results: This rank's results (of its ``N_k`` samples, ``results.output`` ``[N_k, ...]``).
        group: The process group (``None``: the default one).
        reduction: The loss's reduction, ``"mean"`` or ``"sum"``.
        bucket_bytes: The bucket size of the all-reduce.

    Returns:
        New :class:`Results` of the whole batch, identical on every rank.

    Raises:
        RuntimeError: If the process group is not initialised.
        ValueError: For an unknown ``reduction`` or a quantity without a known reduction.
    """
    require_initialized("reduce_results")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduce_results: reduction must be 'mean' or 'sum', got {reduction!r}")
    n_local = results.output.shape[0]
    counts = torch.tensor([float(n_local)], dtype=torch.float64)
    dist.all_reduce(counts, group=group)
    n_total = float(counts)
    share = n_local / n_total if reduction == "mean" else 1.0
    r_local = 1.0 / n_local if reduction == "mean" else 1.0
    # (quantity, name, this rank's term, weight of the summed term)
    sums: list[tuple[str, str, Tensor]] = [("grad", k, v) for k, v in results.grad.items()]
    weights: list[float] = [share] * len(sums)
    quantities: dict[str, dict[str, Any]] = {}
    for qname in results:
        values = results[qname]
        spec = _gather_spec(qname)
        if values and all(isinstance(v, KronFactors) for v in values.values()):
            quantities[qname] = reduce_kron_blocks(values, group, bucket_bytes)
        elif spec is not None:
            degree, axis = spec
            scale = share**degree
            quantities[qname] = {k: _gather(v * scale, group, axis) for k, v in values.items()}
        elif qname == VARIANCE:
            quantities[qname] = {}
            for k, v in values.items():
                mean = results.grad[k] / (r_local * n_local)  # this rank's mean g_n
                sums += [("Variance.squares", k, n_local * (v + mean.square()))]
                sums += [("Variance.sum", k, n_local * mean)]
                weights += [1.0, 1.0]
        elif _degree(qname, SUM_DEGREES) is not None:
            quantities[qname] = {}
            sums += [(qname, k, v) for k, v in values.items()]
            weights += [share ** _degree(qname, SUM_DEGREES)] * len(values)  # type: ignore[operator]
        else:
            raise ValueError(
                f"reduce_results: no known reduction for {qname!r}; supported: sums "
                f"{sorted(SUM_DEGREES)} + {sorted(SUM_PREFIXES)}*, {VARIANCE}, per-sample "
                f"{sorted(GATHER_DEGREES)} + {sorted(GATHER_PREFIXES)}*, Kronecker blocks"
            )
    weighted = [v * w for (_, _, v), w in zip(sums, weights, strict=True)]
    loss = results.loss.reshape(1) * share
    reduced = all_reduce_bucketed([*weighted, loss], group, bucket_bytes)
    grad: dict[str, Tensor] = {}
    variance_parts: dict[str, dict[str, Tensor]] = {}
    for (q, k, _), v in zip(sums, reduced[:-1], strict=True):
        if q.startswith(VARIANCE + "."):
            variance_parts.setdefault(k, {})[q] = v
        else:
            (grad if q == "grad" else quantities[q])[k] = v
    for k, part in variance_parts.items():
        mean = part["Variance.sum"] / n_total
        second = part["Variance.squares"] / n_total
        quantities[VARIANCE][k] = (second - mean.square()).clamp_min(0.0)
    output = _gather(results.output, group)
    return Results(reduced[-1].reshape(()), grad, output, quantities)
