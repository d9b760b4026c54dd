r"""Data-parallel curvature optimizers: :class:`DataParallelPreconditioner`.

Wrapping a curvlab optimizer makes ``W`` ranks on ``W`` shards of a batch take the step of one
process on the whole batch:

* the gradient is averaged, :math:`g = \frac1W \sum_k g_k` (bucketed all-reduce), unless the
  model is a :class:`~torch.nn.parallel.DistributedDataParallel`, which already did it;
* the Kronecker statistics of KFAC and SINGD are all-reduced, bucketed, by
  :func:`~curvlab.distributed.reduce.reduce_kron_blocks` before they enter the running average;
* AdaHesScale's Hessian diagonals (degree 1 in the batch factor) are averaged over the
  ranks (bucketed), through its ``_reduce_statistics`` hook;
* KFAC's eigendecompositions are spread over the ranks round-robin (block :math:`i` on rank
  :math:`i \bmod W`) and broadcast from their owner.

Gradient-only methods (RootFreeAdam, IFShampoo: their statistics are functions of the
averaged gradient) need only the first point. MC Fisher sampling stays per rank: seed each
rank's optimizer differently (``seed=base + rank``); the step then agrees in distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlab.distributed.buckets import (
    DEFAULT_BUCKET_BYTES,
    all_reduce_bucketed,
    require_initialized,
)
from curvlab.distributed.reduce import reduce_kron_blocks
from curvlab.optim import parts


class DataParallelPreconditioner:
    """Wrap a curvlab optimizer for data parallelism (call :meth:`step` as the optimizer's).

    Args:
        optimizer: A :class:`curvlab.optim.KFAC`, ``SINGD``, ``AdaHesScale``, ``IFShampoo`` or
            ``RootFreeAdam``
            (any ``torch.optim.Optimizer`` whose curvature comes from the averaged gradient).
        model: ``None``, or the DDP-wrapped model (its gradients are already averaged).
        group: The process group (``None``: the default one).
        bucket_bytes: The bucket size of the all-reduces.
        average_gradients: Average the gradients here (default: unless ``model`` is DDP).
        spread_inverses: Spread KFAC's eigendecompositions over the ranks (default ``True``).

    Raises:
        RuntimeError: If the process group is not initialised.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        group: dist.ProcessGroup | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        average_gradients: bool | None = None,
        spread_inverses: bool = True,
    ) -> None:
        require_initialized("DataParallelPreconditioner")
        self.optimizer = optimizer
        self.group = group
        self.bucket_bytes = bucket_bytes
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.average_gradients = not ddp if average_gradients is None else average_gradients
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if hasattr(optimizer, "_update_factors"):  # KFAC, SINGD: Kronecker statistics
            update = optimizer._update_factors
            optimizer._update_factors = lambda results: update(  # type: ignore[method-assign]
                reduce_kron_blocks(results, group, bucket_bytes)
            )
        if hasattr(optimizer, "_reduce_statistics"):  # AdaHesScale: a diagonal per parameter
            optimizer._reduce_statistics = self._average_statistics  # type: ignore[method-assign]
        if spread_inverses and hasattr(optimizer, "_update_inverses"):  # KFAC
            optimizer._update_inverses = self._update_inverses  # type: ignore[method-assign]

    def _average_statistics(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""The mean over the ranks, :math:`\frac1W \sum_k D_k` (a mean loss, equal shards)."""
        names = list(values)
        reduced = all_reduce_bucketed([values[k] for k in names], self.group, self.bucket_bytes)
        return {k: v / self.world_size for k, v in zip(names, reduced, strict=True)}

    def _update_inverses(self) -> None:
        """Eigendecompose the blocks owned by this rank, then broadcast every block's."""
        opt: Any = self.optimizer
        units = [u for group_units in opt._units for u in group_units]
        for i, unit in enumerate(units):
            state = opt.state[unit.params[0]]
            owner = i % self.world_size
            a, b = state["input_factor"], state["output_factor"]
            if owner == self.rank:
                inverse = parts.KronInverse.from_factors(a, b).as_tensors()
                tensors = {k: t.contiguous() for k, t in inverse.items()}  # eigh: column-major
            else:
                tensors = {
                    "input_values": a.new_empty(a.shape[:-1]),
                    "input_vectors": torch.empty_like(a),
                    "output_values": b.new_empty(b.shape[:-1]),
                    "output_vectors": torch.empty_like(b),
                }
            src = dist.get_global_rank(self.group, owner) if self.group is not None else owner
            for t in tensors.values():
                dist.broadcast(t, src=src, group=self.group)
            state.update(tensors)

    def _average(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        reduced = all_reduce_bucketed([p.grad for p in params], self.group, self.bucket_bytes)
        for p, g in zip(params, reduced, strict=True):
            p.grad.copy_(g / self.world_size)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """The wrapped optimizer's step, with the gradients averaged after the closure.

        Args:
            closure: The standard closure (zero_grad, forward, loss, backward, return loss).

        Returns:
            This rank's loss.
        """

        def averaged() -> Tensor:
            loss = closure()
            if self.average_gradients:
                self._average()
            return loss

        return self.optimizer.step(averaged)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
