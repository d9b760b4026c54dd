"""AdaHesScale on the optim-race RevMLP: time per step as a ratio to an Adam step, in one process.

The model is ``curvlab.nn.RevMLP(784, 10, hidden=128, depth=2)`` (the race's), on random
Fashion-MNIST-shaped batches; every optimizer steps from the standard closure. Per round, Adam,
AdaHesScale (``hesscale``) and AdaHesScale (``bl89``) take one step each, in rotating order, after
warm-up steps; medians over the rounds. One JSON file:
``benchmarks/results/hesscale-revmlp-cpu.json``.

    OMP_NUM_THREADS=1 python benchmarks/hesscale_revmlp.py --rounds 15
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from curvlab.nn import RevMLP
from curvlab.optim import AdaHesScale

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("adam", "adahesscale-hesscale", "adahesscale-bl89")


def _stepper(name: str, batch_size: int) -> Callable[[], None]:
    """One step of ``name`` on its own model and batch."""
    torch.manual_seed(0)
    model = RevMLP(784, 10, hidden=128, depth=2)
    loss_func = nn.CrossEntropyLoss()
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    if name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = AdaHesScale(model, lr=3e-4, loss_func=loss_func, method=name.split("-")[1])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_func(model(x), y)
        loss.backward()
        return loss

    return lambda: opt.step(closure)


def main() -> None:
    """Measure and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/hesscale-revmlp-cpu.json"))
    args = parser.parse_args()
    steppers = {name: _stepper(name, args.batch_size) for name in OPTIMIZERS}
    for step in steppers.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for r in range(args.rounds):
        order = OPTIMIZERS[r % 3 :] + OPTIMIZERS[: r % 3]
        for name in order:
            start = time.perf_counter()
            steppers[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    out = {
        "benchmark": "hesscale_revmlp",
        "model": "RevMLP(784, 10, hidden=128, depth=2)",
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "median_seconds": medians,
        "ratio_to_adam": {name: medians[name] / medians["adam"] for name in OPTIMIZERS},
        "device": platform.processor() or platform.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "note": "shared loaded CPU: ratios, not absolute times, are the figures",
    }
    for name in OPTIMIZERS:
        print(f"{name:22s} {medians[name] * 1e3:8.2f} ms  {out['ratio_to_adam'][name]:6.2f}x Adam")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
