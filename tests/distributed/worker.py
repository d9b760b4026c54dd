"""The cases of the distributed tests; run under torchrun (2 gloo ranks) or in one process.

``python -m torch.distributed.run --nproc_per_node=2 worker.py OUT`` runs every case on the
rank's half of the batch and rank 0 saves ``{case: final parameters}`` (and the reduced
engine results) to ``OUT``; :func:`run_case` without a process group is the reference.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from curvlab.backprop import (
    GGNMP,
    KFLR,
    BatchDiagGGN,
    BatchDiagHessian,
    BatchGrad,
    BatchL2,
    DiagGGN,
    DiagHessian,
    HesScale,
    KFACEmpirical,
    SqrtGGN,
    SumGradSquared,
    Variance,
    compute,
)
from curvlab.optim import KFAC, SINGD, AdaHesScale, IFShampoo, RootFreeAdam

LOSS = nn.CrossEntropyLoss()
STEPS = 3
CASES = (
    "kfac-type-2",
    "kfac-empirical",
    "kfac-ddp",
    "singd",
    "ifshampoo",
    "rootfree",
    "adahesscale",
    "kfac-conv-expand",
    "kfac-conv-reduce",
    "kfac-deep",
    "singd-structured",
)
MC_CASE = "kfac-mc"  # per-rank generators: the ranks agree with each other, not with 1 process
QUANTITIES = (
    SumGradSquared(),
    DiagGGN(),
    HesScale(),
    KFLR(),
    KFACEmpirical(),
    BatchGrad(),
    BatchL2(),
    Variance(),
    DiagHessian(),
    BatchDiagGGN(),
    BatchDiagHessian(),
    SqrtGGN(),
)
UNEVEN = 5  # rank 0's share of the 8 samples in the uneven results (rank 1: 3)


def model(conv: bool = False, deep: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if deep:  # blocks of unequal cost: the spread of the inverses is by cost, not round-robin
        sizes = [(5, 16), (16, 4), (4, 8), (8, 3)]
        layers = [m for a, b in sizes for m in (nn.Linear(a, b), nn.Tanh())][:-1]
        return nn.Sequential(*layers).double()
    if conv:  # weight sharing over 3 x 3 positions: input_count = N T for expand
        layers = [nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)]
        return nn.Sequential(*layers).double()
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(step: int, n: int = 8, conv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    shape = (n, 2, 5, 5) if conv else (n, 5)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def shard(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    return t.chunk(dist.get_world_size())[dist.get_rank()]


def optimizer(case: str, net: nn.Module) -> torch.optim.Optimizer:
    if case.startswith("kfac"):
        fisher = {"kfac-empirical": "empirical", MC_CASE: "mc"}.get(case, "type-2")
        approx = "reduce" if case.endswith("reduce") else "expand"
        rank = dist.get_rank() if dist.is_initialized() else 0
        return KFAC(
            net,
            lr=0.5,
            loss_func=LOSS,
            fisher_type=fisher,
            kfac_approx=approx,
            inverse_update_interval=2,
            seed=10 + rank,
        )
    if case == "singd":
        return SINGD(net, lr=0.1, loss_func=LOSS, update_interval=1, structure="dense")
    if case == "singd-structured":
        structure = ("triu_toeplitz", "block_diagonal")
        return SINGD(
            net, lr=0.1, loss_func=LOSS, update_interval=1, structure=structure, block_size=2
        )
    if case == "adahesscale":
        return AdaHesScale(net, lr=0.01, loss_func=LOSS)
    if case == "ifshampoo":
        return IFShampoo(net.parameters(), lr=0.01)
    return RootFreeAdam(net.parameters(), lr=0.01)


def run_case(case: str) -> list[torch.Tensor]:
    """``STEPS`` steps of ``case`` on this rank's shard; the final parameters."""
    conv = "conv" in case
    net = model(conv, deep="deep" in case)
    opt = optimizer(case, net)
    forward: nn.Module = net
    if dist.is_initialized():
        from curvlab.distributed import DataParallelPreconditioner

        ddp = case == "kfac-ddp"
        forward = nn.parallel.DistributedDataParallel(net) if ddp else net
        opt = DataParallelPreconditioner(opt, model=forward, bucket_bytes=64)  # type: ignore[assignment]
        patched = [k for k in vars(opt.optimizer) if k.startswith("_update")]  # type: ignore[attr-defined]
        assert not patched, f"private methods patched: {patched}"  # only the public hooks
    for step in range(STEPS):
        x, y = (shard(t) for t in data(step, conv=conv))

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = LOSS(forward(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in net.parameters()]


def uneven(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's first :data:`UNEVEN` samples, rank 1's the rest (all without a process group)."""
    if not dist.is_initialized():
        return t
    return t[:UNEVEN] if dist.get_rank() == 0 else t[UNEVEN:]


def results(split=shard) -> dict[str, dict[str, torch.Tensor]]:
    """The engine's quantities of this rank's shard (reduced over the ranks if distributed)."""
    x, y = (split(t) for t in data(0))
    res = compute(model(), LOSS, x, y, QUANTITIES)
    if dist.is_initialized():
        from curvlab.distributed import reduce_results

        res = reduce_results(res)
    out = {"grad": dict(res.grad)}
    for q in res:
        out[q] = {k: v.dense() if hasattr(v, "dense") else v for k, v in res[q].items()}
    out["loss"] = {"loss": res.loss}
    return out


def unknown_quantity_error() -> str:
    """The message of :func:`reduce_results` on a quantity it cannot reduce (GGNMP)."""
    from curvlab.distributed import reduce_results

    x, y = (shard(t) for t in data(0))
    try:
        reduce_results(compute(model(), LOSS, x, y, [GGNMP()]))
    except ValueError as error:
        return str(error)
    return ""


def main(path: str) -> None:
    dist.init_process_group("gloo")
    out = {case: run_case(case) for case in CASES}
    out["results"] = results()  # type: ignore[assignment]
    out["uneven"] = results(uneven)  # type: ignore[assignment]
    out["error"] = unknown_quantity_error()  # type: ignore[assignment]
    flat = torch.cat([p.reshape(-1) for p in run_case(MC_CASE)])
    ranks = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(ranks, flat)
    out[MC_CASE] = ranks  # type: ignore[assignment]
    if dist.get_rank() == 0:
        torch.save(out, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
