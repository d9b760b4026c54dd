"""Cost of data-parallel KFAC (curvlab.distributed) against a plain DDP gradient step.

Run with ``torchrun --nproc_per_node=2 benchmarks/distributed.py`` (gloo on CPU). On each
rank, in the same process: an SGD step under DDP (forward, backward with DDP's gradient
all-reduce, update) and a KFAC step wrapped by :class:`DataParallelPreconditioner` (factors
all-reduced in buckets every step; inverses every step, spread over the ranks by cost, or computed on
every rank). Rank 0 prints median times over repeats as ratios to the SGD step and writes
``benchmarks/results/distributed-<device>.json`` with the device and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from curvlab.distributed import DataParallelPreconditioner
from curvlab.optim import KFAC

LOSS = nn.CrossEntropyLoss()


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def _time(step, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _runner(kind: str, width: int, batch: int):
    net = _model(width)
    ddp = nn.parallel.DistributedDataParallel(net)
    g = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)
    if kind == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
    else:
        kfac = KFAC(net, lr=0.01, loss_func=LOSS, inverse_update_interval=1, fisher_type="type-2")
        opt = DataParallelPreconditioner(kfac, model=ddp, spread_inverses=kind == "kfac-spread")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = LOSS(ddp(x), y)
        loss.backward()
        return loss

    if kind == "sgd":
        return lambda: (closure(), opt.step())
    return lambda: opt.step(closure)


def main() -> None:
    """Time the three steps on each rank; rank 0 reports."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    seconds = {
        kind: _time(_runner(kind, args.width, args.batch), args.repeats)
        for kind in ("sgd", "kfac-spread", "kfac-every-rank")
    }
    if dist.get_rank() == 0:
        ratios = {k: v / seconds["sgd"] for k, v in seconds.items()}
        for k in seconds:
            print(f"{k:16s} {1e3 * seconds[k]:8.2f} ms  {ratios[k]:6.2f}x the DDP SGD step")
        payload = {
            "device": f"cpu: {platform.processor()} ({os.cpu_count()} cores)",
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "settings": vars(args) | {"factor_interval": 1, "inverse_interval": 1},
            "median_seconds": seconds,
            "ratio_to_ddp_sgd_step": ratios,
            "note": "shared, loaded 2-core machine; medians over repeats",
        }
        out = Path(__file__).parent / "results" / "distributed-cpu.json"
        out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
