"""What ExactGN's divergence check costs: one step with ``max_loss_ratio`` on and off, and Adam.

The check runs one forward pass on the batch after the update and keeps a copy of the moved
parameters. Measured in one process, methods interleaved, median of ``--repeats`` steps, on the
model of ``benchmarks/exact_gn.py`` (d = 784, k = 10, 4 blocks) with Gaussian inputs. The
parameters are reset before every step, so each step starts from the same point.

Usage::

    python benchmarks/exact_gn_check_cost.py --threads 1 --n 256 --hidden 2000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from curvlab.nn import RevMLP
from curvlab.optim import ExactGN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RevMLP(784, 10, args.hidden, 4)
    x, y = torch.randn(args.n, 784), torch.randint(0, 10, (args.n,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    methods = {
        "adam": torch.optim.Adam(params, lr=1e-3),
        "gn check on": ExactGN(model, lr=0.1, loss="ce"),
        "gn check off": ExactGN(model, lr=0.1, loss="ce", max_loss_ratio=None),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(args.repeats + 1):
        for name, optimizer in methods.items():
            model.load_state_dict(state)
            started = time.perf_counter()
            if isinstance(optimizer, ExactGN):
                optimizer.step(x, y)
            else:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    adam = statistics.median(times["adam"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:14s} {1e3 * median:8.1f} ms  {median / adam:5.2f}x Adam")


if __name__ == "__main__":
    main()
