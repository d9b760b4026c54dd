"""Draw docs/figures/diagnostics_dashboard.png: the worked example of docs/diagnostics.md.

The small CNN on the bundled Fashion-MNIST subset, SGD with the too large ``lr=2.0``, 20 steps
of batch 32 under the business preset; the dashboard of its log. Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python docs/figures/diagnostics_dashboard.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from curvlab.data import load_dataset, to_float
from curvlab.diagnostics import Monitor, read_log
from curvlab.diagnostics.dashboard import write_dashboard

OUT = Path(__file__).with_suffix(".png")


def train(lr: float, log_dir: Path, steps: int = 20, batch: int = 32) -> list[dict]:
    """The worked example's loop (the same code as the page's snippet); returns the log."""
    images, labels = load_dataset("bundled", "train")
    x_all, y_all = to_float(images[:640]), labels[:640]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10)
    )
    loss_func = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with Monitor(model, loss_func, preset="business", log_dir=log_dir) as monitor:
        for step in range(steps):
            x, y = (
                x_all[step * batch : (step + 1) * batch],
                y_all[step * batch : (step + 1) * batch],
            )
            optimizer.zero_grad()
            loss = loss_func(model(x), y)
            with monitor(step, loss=loss, optimizer=optimizer):
                loss.backward()
            optimizer.step()
    return read_log(log_dir)


def main() -> None:
    """Train, draw, and print where the figure went."""
    with tempfile.TemporaryDirectory() as folder:
        records = train(2.0, Path(folder))
    print(f"wrote {write_dashboard(records, OUT)}")


if __name__ == "__main__":
    main()
