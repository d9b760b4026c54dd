r"""Data-parallel curvature optimizers: :class:`DataParallelPreconditioner`.

Wrapping a curvlab optimizer makes ``W`` ranks on ``W`` shards of a batch take the step of one
process on the whole batch:

* the gradient is averaged, :math:`g = \frac1W \sum_k g_k` (bucketed all-reduce), unless the
  model is a :class:`~torch.nn.parallel.DistributedDataParallel`, which already did it;
* the Kronecker statistics of KFAC and SINGD are all-reduced, bucketed, by
  :func:`~curvlab.distributed.reduce.reduce_kron_blocks` before they enter the running average;
* AdaHesScale's Hessian diagonals (degree 1 in the batch factor) are averaged over the
  ranks (bucketed);
* KFAC's eigendecompositions are spread over the ranks by their cost (largest first, to the
  least loaded rank: :func:`~curvlab.distributed.inverses.assign_by_cost`) and broadcast,
  bucketed, from their owners (:func:`~curvlab.distributed.inverses.spread_inverses`).

All of it goes through the optimizers' public hooks (:mod:`curvlab.optim.hooks`):
``register_statistics_hook`` for the statistics, KFAC's ``register_inverse_hook`` for the
decompositions; :meth:`DataParallelPreconditioner.remove` unregisters them.

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

from curvlab.backprop import KronFactors
from curvlab.distributed.buckets import (
    DEFAULT_BUCKET_BYTES,
    all_reduce_bucketed,
    require_initialized,
)
from curvlab.distributed.inverses import spread_inverses
from curvlab.distributed.reduce import reduce_kron_blocks


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
        spread_inverses: Spread KFAC's eigendecompositions over the ranks by their cost and
            broadcast them (default ``True``; ``False``: every rank decomposes every block).

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
        self.handles: list[Any] = []
        if hasattr(optimizer, "register_statistics_hook"):  # KFAC, SINGD, AdaHesScale
            self.handles.append(optimizer.register_statistics_hook(self._reduce_statistics))
        if spread_inverses and hasattr(optimizer, "register_inverse_hook"):  # KFAC
            self.handles.append(optimizer.register_inverse_hook(self._spread_inverses))

    def remove(self) -> None:
        """Unregister the hooks from the optimizer (it then runs on its own again)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _reduce_statistics(self, optimizer: Any, statistics: dict[str, Any]) -> dict[str, Any]:
        r"""Kronecker blocks: :func:`reduce_kron_blocks`; diagonals: :math:`\frac1W \sum_k D_k`.

        The mean of the diagonals is that of the whole batch for a mean loss on equal shards.
        """
        if statistics and all(isinstance(v, KronFactors) for v in statistics.values()):
            return reduce_kron_blocks(statistics, self.group, self.bucket_bytes)
        names = list(statistics)
        tensors = [statistics[k] for k in names]
        reduced = all_reduce_bucketed(tensors, self.group, self.bucket_bytes)
        return {k: v / self.world_size for k, v in zip(names, reduced, strict=True)}

    def _spread_inverses(self, optimizer: Any, blocks: dict[str, KronFactors]) -> dict[str, Any]:
        """This rank's share of KFAC's decompositions (by cost), then broadcast."""
        return spread_inverses(blocks, self.group, self.bucket_bytes)

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
