r"""Reduce :mod:`curvlab.backprop` quantities over data-parallel ranks.

Rank :math:`k` holds :math:`N_k` of the :math:`N = \sum_k N_k` samples. For a mean loss the
engine's values carry the batch factor :math:`r_k = 1/N_k`; a quantity of degree :math:`d` in
:math:`r` (the gradient, DiagGGN, DiagHessian: :math:`d = 1`; the unscaled SumGradSquared,
BatchGrad, BatchL2: :math:`d = 0`) reduces to

.. math:: V = \sum_k (N_k / N)^d \, V_k

(a sum loss: :math:`V = \sum_k V_k`). Per-sample values (``[N_k, ...]``) are rescaled the same
way and gathered along the sample axis in rank order. Kronecker blocks reduce their
unnormalised sums: :math:`A = \sum_k N_k T\, A_k / \sum_k N_k T` (``input_count``) and
:math:`B = r \sum_k B_k / r_k` with :math:`r = 1/N` (mean) or :math:`1` (sum).
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
GATHER_DEGREES = {"BatchGrad": 0, "BatchL2": 0}
"""Per-sample quantities gathered along the sample axis, with their degree."""


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


def _gather(value: Tensor, group: dist.ProcessGroup | None, name: str) -> Tensor:
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([value.shape[0]]), group=group)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"reduce_results: {name} needs equal batch sizes per rank, got {sizes}")
    parts = [torch.empty_like(value) for _ in range(world)]
    dist.all_gather(parts, value.contiguous(), group=group)
    return torch.cat(parts)


def reduce_results(
    results: Results,
    group: dist.ProcessGroup | None = None,
    reduction: str = "mean",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Results:
    r"""Reduce one rank's :class:`~curvlab.backprop.Results` to those of the whole batch.

    Sums (``grad``, SumGradSquared, DiagGGN, DiagHessian) are all-reduced with the weights
    :math:`(N_k/N)^d`, Kronecker blocks by :func:`reduce_kron_blocks`, per-sample quantities
    (BatchGrad, BatchL2) rescaled and all-gathered along the sample axis; the loss is the
    weighted mean (``"mean"``) or the sum (``"sum"``), ``output`` is gathered.

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
    share = n_local / float(counts) if reduction == "mean" else 1.0
    sums: list[tuple[str, str, Tensor]] = [("grad", k, v) for k, v in results.grad.items()]
    quantities: dict[str, dict[str, Any]] = {}
    for qname in results:
        values = results[qname]
        if values and all(isinstance(v, KronFactors) for v in values.values()):
            quantities[qname] = reduce_kron_blocks(values, group, bucket_bytes)
            continue
        if qname in GATHER_DEGREES:
            d = GATHER_DEGREES[qname]
            quantities[qname] = {k: _gather(v * share**d, group, qname) for k, v in values.items()}
            continue
        if _degree(qname, SUM_DEGREES) is None:
            raise ValueError(
                f"reduce_results: no known reduction for {qname!r}; supported: sums "
                f"{sorted(SUM_DEGREES)} + {sorted(SUM_PREFIXES)}*, per-sample "
                f"{sorted(GATHER_DEGREES)}, Kronecker blocks"
            )
        quantities[qname] = {}
        sums += [(qname, k, v) for k, v in values.items()]
    weighted = [v * share ** _degree(q, SUM_DEGREES) for q, _, v in sums]  # type: ignore[operator]
    loss = results.loss.reshape(1) * share
    reduced = all_reduce_bucketed([*weighted, loss], group, bucket_bytes)
    grad: dict[str, Tensor] = {}
    for (q, k, _), v in zip(sums, reduced[:-1], strict=True):
        (grad if q == "grad" else quantities[q])[k] = v
    output = _gather(results.output, group, "output")
    return Results(reduced[-1].reshape(()), grad, output, quantities)
