"""Data-parallel KFAC with curvlab.distributed: 2 gloo ranks on CPU, each on half of a batch.

Run with ``torchrun --nproc_per_node=2 examples/distributed_kfac.py`` (or
``python -m torch.distributed.run --nproc_per_node=2 examples/distributed_kfac.py``). Rank 0
prints the loss and, at the end, the largest difference from one process taking the same
steps on the whole batch (round-off: the two agree).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from curvlab.distributed import DataParallelPreconditioner
from curvlab.optim import KFAC

LOSS = nn.CrossEntropyLoss()


def model() -> nn.Module:
    """A small float64 MLP, the same on every rank (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of ``step``: inputs ``[64, 10]``, labels ``[64]`` in ``{0, 1, 2}``."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def train(net: nn.Module, steps: int, distributed: bool) -> None:
    """KFAC steps on the whole batch, or (``distributed``) on this rank's half under DDP."""
    forward = nn.parallel.DistributedDataParallel(net) if distributed else net
    kfac = KFAC(net, lr=0.3, loss_func=LOSS, fisher_type="type-2", inverse_update_interval=5)
    opt = DataParallelPreconditioner(kfac, model=forward) if distributed else kfac
    for step in range(steps):
        x, y = batch(step)
        if distributed:  # this rank's half of the batch
            x, y = x.chunk(2)[dist.get_rank()], y.chunk(2)[dist.get_rank()]

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = LOSS(forward(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if distributed and dist.get_rank() == 0 and step % 5 == 0:
            print(f"step {step:2d}  rank-0 loss {float(loss.detach()):.4f}")


def main() -> None:
    """Train on 2 ranks; rank 0 compares with one process on the whole batch."""
    dist.init_process_group("gloo")
    parallel = model()
    train(parallel, 20, distributed=True)
    if dist.get_rank() == 0:
        single = model()
        train(single, 20, distributed=False)
        gap = max(
            float((a - b).abs().max())
            for a, b in zip(parallel.parameters(), single.parameters(), strict=True)
        )
        print(f"max |2 ranks - 1 process| over the parameters: {gap:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
