"""Peak memory and time of a forward+backward pass with and without ``curvlab.nn.memsave.convert``.

Cases train only some parameters (fine-tuning) of a ResNet-style CNN and of an MLP. For each case
the script reports, stock vs. converted, as ratios converted / stock:

* ``saved``: bytes autograd stores for the backward pass (counted with saved-tensor hooks, as
  ``curvlab.nn.memsave.SavedTensorBytes`` does; parameters, buffers and the input batch not
  counted), with a breakdown by the type of the layer that stores them;
* ``peak``: the peak of tensor memory allocated during one forward+backward above the level
  before it (``curvlab.nn.memsave.PeakMemory``: torch profiler's allocation events replayed in
  order, deterministic on the CPU; transient tensors of the backward pass included);
* ``time``: the median wall time of a forward+backward, stock and converted interleaved in one
  process.

Usage::

    python benchmarks/memsave.py            # full run, writes benchmarks/results/memsave_cpu.json
    python benchmarks/memsave.py --quick    # small sizes, a few seconds per case
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.nn.memsave import MEMSAVE_CLASSES, PeakMemory, convert

RESULTS = Path(__file__).parent / "results" / "memsave_cpu.json"
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected) skip connection, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet(width: int, classes: int = 10) -> nn.Module:
    """A small torchvision-style ResNet: stem, three stages of two basic blocks, linear head."""
    stem = nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    stages, c_in = [], width
    for i, c_out in enumerate((width, 2 * width, 4 * width)):
        stages += [BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(c_in, classes)
    )
    return nn.Sequential(stem, *stages, head)


def mlp(features: int, width: int, depth: int, classes: int = 10) -> nn.Module:
    """``depth`` hidden blocks Linear-LayerNorm-ReLU-Dropout and a linear head."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [
            nn.Linear(features if i == 0 else width, width),
            nn.LayerNorm(width),
            nn.ReLU(),
            nn.Dropout(0.1),
        ]
    return nn.Sequential(*layers, nn.Linear(width, classes))


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

NORMS = (nn.BatchNorm2d, nn.LayerNorm)


@dataclass(frozen=True)
class Case:
    """One fine-tuning setting: which parameters train, BN mode, whether the input needs a grad."""

    name: str
    model: str  # "cnn" or "mlp"
    trainable: str  # "last", "norms", "none", "first+last", "biases", "all"
    train_mode: bool
    input_grad: bool = False
    stock_relu: bool = False  # convert(..., layers=...) without nn.ReLU: less memory saved, no cost


CASES = [
    Case("cnn: last layer only", "cnn", "last", True),
    Case("cnn: norms only (BN train)", "cnn", "norms", True),
    Case("cnn: norms only (BN eval)", "cnn", "norms", False),
    Case("cnn: first conv + last (BN eval)", "cnn", "first+last", False),
    Case("cnn: input only (BN eval)", "cnn", "none", False, input_grad=True),
    Case("cnn: norms only (BN train), stock ReLU", "cnn", "norms", True, stock_relu=True),
    Case("cnn: input only (BN eval), stock ReLU", "cnn", "none", False, True, stock_relu=True),
    Case("cnn: biases only (BitFit, BN train)", "cnn", "biases", True),
    Case("cnn: all trainable", "cnn", "all", True),
    Case("mlp: last layer only", "mlp", "last", True),
    Case("mlp: first + last layer", "mlp", "first+last", True),
    Case("mlp: norms only", "mlp", "norms", True),
    Case("mlp: biases only (BitFit)", "mlp", "biases", True),
    Case("mlp: all trainable", "mlp", "all", True),
]


def sizes(quick: bool) -> dict[str, int]:
    """Problem sizes: batch, image side and width of the CNN; batch, width, depth of the MLP."""
    if quick:
        return dict(cnn_batch=8, side=32, cnn_width=16, mlp_batch=256, mlp_width=256, depth=3)
    return dict(cnn_batch=32, side=64, cnn_width=32, mlp_batch=2048, mlp_width=1024, depth=4)


def build(case: Case, quick: bool) -> tuple[nn.Module, Tensor, Tensor]:
    """The stock model (seeded), an input batch and labels, with ``case``'s trainable parameters."""
    s = sizes(quick)
    torch.manual_seed(0)
    if case.model == "cnn":
        model = resnet(s["cnn_width"])
        x = torch.randn(s["cnn_batch"], 3, s["side"], s["side"])
    else:
        model = mlp(784, s["mlp_width"], s["depth"])
        x = torch.randn(s["mlp_batch"], 784)
    y = torch.randint(0, 10, (x.shape[0],))
    model.train(case.train_mode)
    linear_like = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first, last = linear_like[0], linear_like[-1]
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(
                case.trainable == "all"
                or (case.trainable == "biases" and name == "bias")
                or (case.trainable == "norms" and isinstance(module, NORMS))
                or (case.trainable in ("last", "first+last") and module is last)
                or (case.trainable == "first+last" and module is first)
            )
    return model, x.requires_grad_(case.input_grad), y


def step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One forward+backward; gradients are dropped afterwards."""
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    x.grad = None


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def saved_bytes_by_layer(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, int]:
    """Bytes stored for backward during the forward pass, by the type of the leaf module storing."""
    current = ["other"]

    def enter(module: nn.Module, _args: object) -> None:
        current.append(type(module).__name__)

    def leave(_module: nn.Module, _args: object, _out: object) -> None:
        current.pop()

    handles = []
    for module in model.modules():
        if not list(module.children()):
            handles += [
                module.register_forward_pre_hook(enter),
                module.register_forward_hook(leave),
            ]
    by_layer: dict[str, int] = defaultdict(int)
    seen = {t.untyped_storage().data_ptr() for t in [x, *model.parameters(), *model.buffers()]}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:  # count each storage once
            seen.add(storage.data_ptr())
            by_layer[current[-1]] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), y)
    for handle in handles:
        handle.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    x.grad = None
    by_layer["total"] = sum(by_layer.values())
    return dict(by_layer)


def peak_bytes(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Peak tensor memory of one forward+backward above the level before it (after a warm-up)."""
    step(model, x, y)
    with PeakMemory() as peak:
        step(model, x, y)
    return peak.nbytes


def step_times(
    stock: nn.Module, ours: nn.Module, x: Tensor, y: Tensor, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of each forward+backward, stock and converted interleaved."""
    times: dict[str, list[float]] = {"stock": [], "memsave": []}
    # Alternate which model runs first, so that neither profits from the other's freed memory.
    for _ in range(2):  # warm-up
        step(stock, x, y)
        step(ours, x, y)
    pairs = [("stock", stock), ("memsave", ours)]
    for rep in range(repeats):
        for name, model in pairs if rep % 2 == 0 else pairs[::-1]:
            start = time.perf_counter()
            step(model, x, y)
            times[name].append(time.perf_counter() - start)
    return times["stock"], times["memsave"]


def run_case(index: int, quick: bool, repeats: int) -> dict[str, object]:
    """All measurements of one case."""
    case = CASES[index]
    stock, x, y = build(case, quick)
    layers = [cls for cls in MEMSAVE_CLASSES if not (case.stock_relu and cls is nn.ReLU)]
    ours = convert(copy.deepcopy(stock), layers=layers)
    saved_stock = saved_bytes_by_layer(stock, x, y)
    saved_ours = saved_bytes_by_layer(ours, x, y)
    peak_stock, peak_ours = peak_bytes(stock, x, y), peak_bytes(ours, x, y)
    t_stock, t_ours = step_times(stock, ours, x, y, repeats)
    median_stock, median_ours = statistics.median(t_stock), statistics.median(t_ours)
    return {
        **asdict(case),
        "saved_bytes": {"stock": saved_stock, "memsave": saved_ours},
        "saved_ratio": saved_ours["total"] / max(saved_stock["total"], 1),
        "peak_bytes": {"stock": peak_stock, "memsave": peak_ours},
        "peak_ratio": peak_ours / max(peak_stock, 1),
        "median_time_s": {"stock": median_stock, "memsave": median_ours},
        "min_time_s": {"stock": min(t_stock), "memsave": min(t_ours)},
        "time_ratio": median_ours / median_stock,
        "time_ratio_min": min(t_ours) / min(t_stock),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 15)
    rows = []
    header = f"{'case':36s} {'saved MiB':>17s} {'ratio':>6s} {'peak MiB':>17s} {'ratio':>6s}"
    header += f" {'time ms':>15s} {'ratio':>6s}"
    print(header)
    for index in range(len(CASES)):
        row = run_case(index, args.quick, repeats)
        rows.append(row)
        saved, peak, t = row["saved_bytes"], row["peak_bytes"], row["median_time_s"]
        print(
            f"{row['name']:36s}"
            f" {saved['stock']['total'] / MIB:8.1f} {saved['memsave']['total'] / MIB:8.1f}"
            f" {row['saved_ratio']:6.2f}"
            f" {peak['stock'] / MIB:8.1f} {peak['memsave'] / MIB:8.1f} {row['peak_ratio']:6.2f}"
            f" {t['stock'] * 1e3:7.1f} {t['memsave'] * 1e3:7.1f} {row['time_ratio']:6.2f}",
            flush=True,
        )
    result = {
        "benchmark": "memsave",
        "device": "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "quick": args.quick,
        "repeats": repeats,
        "sizes": sizes(args.quick),
        "ratios": "converted / stock; time_ratio from medians, time_ratio_min from minima",
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
