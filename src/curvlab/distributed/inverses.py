r"""KFAC's eigendecompositions spread over the ranks by their cost, then broadcast.

Block :math:`i` (:math:`G_i` groups of factors :math:`A` ``[a_i, a_i]``, :math:`B`
``[b_i, b_i]``) costs about :math:`c_i = G_i (a_i^3 + b_i^3)` to decompose. The blocks are
assigned greedily, largest first, each to the rank with the least cost so far (ties: the
lowest rank), the longest-processing-time rule: the most loaded rank carries at most
:math:`\frac43` of the optimal load, and at most the largest single block more than the least
loaded one. Each rank decomposes its blocks; then every rank broadcasts its results, bucketed
(one broadcast per bucket), so all ranks hold every block's decomposition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.backprop import KronFactors
from curvlab.distributed.buckets import DEFAULT_BUCKET_BYTES, flatten, make_buckets, unflatten
from curvlab.optim.parts import KronInverse

KEYS = ("input_values", "input_vectors", "output_values", "output_vectors")
"""The tensors of a :class:`~curvlab.optim.parts.KronInverse`, in broadcast order."""


def eigh_cost(block: KronFactors) -> float:
    r"""The decomposition cost :math:`G (a^3 + b^3)` of a block (flops up to a constant)."""
    groups, a = block.input_factor.shape[:2]
    b = block.output_factor.shape[-1]
    return float(groups) * (float(a) ** 3 + float(b) ** 3)


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of each block: greedy, largest cost first, to the least loaded rank.

    Args:
        costs: The cost of each block (``>= 0``).
        world_size: The number of ranks (``>= 1``).

    Returns:
        ``owners[i]`` in ``range(world_size)`` for block ``i``; deterministic, so every rank
        computes the same assignment.

    Raises:
        ValueError: If ``world_size < 1``.
    """
    if world_size < 1:
        raise ValueError(f"assign_by_cost: world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def _placeholders(block: KronFactors) -> dict[str, Tensor]:
    a, b = block.input_factor, block.output_factor
    return {
        "input_values": a.new_empty(a.shape[:-1]),
        "input_vectors": torch.empty_like(a),
        "output_values": b.new_empty(b.shape[:-1]),
        "output_vectors": torch.empty_like(b),
    }


def spread_inverses(
    blocks: Mapping[str, KronFactors],
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> dict[str, KronInverse]:
    """Decompose this rank's share of the blocks (:func:`assign_by_cost`), broadcast all.

    Args:
        blocks: ``{name: KronFactors}``, the same blocks in the same order on every rank.
        group: The process group (``None``: the default one).
        bucket_bytes: The bucket size of the broadcasts.

    Returns:
        ``{name: KronInverse}`` for every block, identical on every rank.
    """
    names = list(blocks)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owners = assign_by_cost([eigh_cost(blocks[n]) for n in names], world)
    tensors: dict[str, dict[str, Tensor]] = {}
    for name, owner in zip(names, owners, strict=True):
        block = blocks[name]
        if owner == rank:
            inverse = KronInverse.from_factors(block.input_factor, block.output_factor)
            tensors[name] = inverse.as_tensors()
        else:
            tensors[name] = _placeholders(block)
    for owner in range(world):
        mine = [(n, k) for n, o in zip(names, owners, strict=True) if o == owner for k in KEYS]
        values = [tensors[n][k] for n, k in mine]
        src = dist.get_global_rank(group, owner) if group is not None else owner
        for bucket in make_buckets(values, bucket_bytes):
            members = [values[i] for i in bucket]
            buffer = flatten(members)
            dist.broadcast(buffer, src=src, group=group)
            for i, received in zip(bucket, unflatten(buffer, members), strict=True):
                name, key = mine[i]
                tensors[name][key] = received
    return {name: KronInverse(**tensors[name]) for name in names}
