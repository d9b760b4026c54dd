"""Data-parallel curvature: bucketed collectives, reduced engine results, wrapped optimizers.

See docs/distributed.md for the equations and a ``torchrun --nproc_per_node=2`` example.
"""

from curvlab.distributed.buckets import (
    DEFAULT_BUCKET_BYTES,
    all_reduce_bucketed,
    flatten,
    make_buckets,
    unflatten,
)
from curvlab.distributed.inverses import assign_by_cost, eigh_cost, spread_inverses
from curvlab.distributed.preconditioner import DataParallelPreconditioner
from curvlab.distributed.reduce import reduce_kron_blocks, reduce_results

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DataParallelPreconditioner",
    "all_reduce_bucketed",
    "assign_by_cost",
    "eigh_cost",
    "flatten",
    "make_buckets",
    "reduce_kron_blocks",
    "reduce_results",
    "spread_inverses",
    "unflatten",
]
