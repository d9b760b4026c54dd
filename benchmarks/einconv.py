"""Benchmark curvlab.nn.einconv against torch: KFAC-reduce, KFAC-expand and the forward conv.

For every convolution of 3C3D (DeepOBS, CIFAR-10) and of a CIFAR ResNet-18 at batch 128, it times
in one process (median of ``--reps`` runs after a warm-up, ``torch.no_grad``):

* KFAC-reduce input factor: einsum over index patterns (``kfac_reduce_factor``; also without the
  reshape simplification) vs the unfold-based definition (``F.unfold``, mean over pixels, Gram);
* KFAC-expand input factor: einsum (``kfac_expand_factor``) vs ``F.unfold`` + the same Gram einsum;
* the convolution itself: einsum (``conv``) vs ``F.conv2d``.

Ratios are speed-ups ``t_baseline / t_einsum`` (> 1: einsum faster). Beside time, the peak of
tensor memory allocated by one call (``curvlab.nn.memsave.PeakMemory``; the unfolded input is the
baseline's overhead) is recorded for the KFAC factors. Writes a table to stdout and JSON to
``benchmarks/results/einconv_<device>.json``.

Usage: ``python benchmarks/einconv.py [--quick] [--batch 128] [--reps 5] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import opt_einsum
import torch
import torch.nn.functional as F

from curvlab.nn.einconv import conv, kfac_expand_factor, kfac_reduce_factor
from curvlab.nn.memsave import PeakMemory


@dataclass(frozen=True)
class Layer:
    net: str
    name: str
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0


def layers() -> list[Layer]:
    # 3C3D: 32 -conv5-> 28 -pool(3,2,1)-> 14 -conv3-> 12 -pool-> 6 -conv3 pad1-> 6 -pool-> 3 (1152)
    c3d = [
        Layer("3c3d", "conv1", 3, 64, 32, 5),
        Layer("3c3d", "conv2", 64, 96, 14, 3),
        Layer("3c3d", "conv3", 96, 128, 6, 3, padding=1),
    ]
    # CIFAR ResNet-18: 3x3 stem at 32x32, four stages, 1x1 stride-2 shortcut convs.
    resnet = [
        Layer("resnet18", "stem", 3, 64, 32, 3, padding=1),
        Layer("resnet18", "layer1", 64, 64, 32, 3, padding=1),
        Layer("resnet18", "layer2.down3x3", 64, 128, 32, 3, stride=2, padding=1),
        Layer("resnet18", "layer2.shortcut1x1", 64, 128, 32, 1, stride=2),
        Layer("resnet18", "layer2", 128, 128, 16, 3, padding=1),
        Layer("resnet18", "layer3.down3x3", 128, 256, 16, 3, stride=2, padding=1),
        Layer("resnet18", "layer3.shortcut1x1", 128, 256, 16, 1, stride=2),
        Layer("resnet18", "layer3", 256, 256, 8, 3, padding=1),
        Layer("resnet18", "layer4.down3x3", 256, 512, 8, 3, stride=2, padding=1),
        Layer("resnet18", "layer4.shortcut1x1", 256, 512, 8, 1, stride=2),
        Layer("resnet18", "layer4", 512, 512, 4, 3, padding=1),
    ]
    return c3d + resnet


def paired_median_times(fns: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (robust to load drift).

    A warm-up call builds and caches patterns and contraction paths; calls shorter than 20 ms are
    repeated in an inner loop so that one timing is at least that long.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, number: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return (time.perf_counter() - start) / number

    numbers = {}
    for key, fn in fns.items():
        fn()
        numbers[key] = max(1, math.ceil(0.02 / max(timed(fn, 1), 1e-6)))
    samples = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            samples[key].append(timed(fn, numbers[key]))
    return {key: statistics.median(values) for key, values in samples.items()}


def unfold_reduce(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    u = F.unfold(x, layer.kernel, padding=layer.padding, stride=layer.stride)
    mean = u.mean(2)
    return mean.T @ mean / x.shape[0]


def unfold_expand(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    u = F.unfold(x, layer.kernel, padding=layer.padding, stride=layer.stride)
    return torch.einsum("ndp,nep->de", u, u) / (u.shape[0] * u.shape[2])


def bench_layer(layer: Layer, batch: int, reps: int, device: torch.device) -> dict:
    x = torch.randn(batch, layer.c_in, layer.size, layer.size, device=device)
    weight = torch.randn(layer.c_out, layer.c_in, layer.kernel, layer.kernel, device=device)
    hyper = dict(stride=layer.stride, padding=layer.padding)
    out_size = (layer.size + 2 * layer.padding - layer.kernel) // layer.stride + 1
    unfolded_mib = batch * layer.c_in * layer.kernel**2 * out_size**2 * 4 / 2**20

    # correctness guard: the numbers being timed agree
    torch.testing.assert_close(
        kfac_reduce_factor(x, layer.kernel, **hyper), unfold_reduce(x, layer), rtol=1e-3, atol=1e-4
    )
    simplifiable = layer.padding == 0 and layer.stride >= layer.kernel
    pairs = {
        "reduce": {
            "einsum": lambda: kfac_reduce_factor(x, layer.kernel, **hyper),
            "unfold": lambda: unfold_reduce(x, layer),
        },
        "expand": {
            "einsum": lambda: kfac_expand_factor(x, layer.kernel, **hyper),
            "unfold": lambda: unfold_expand(x, layer),
        },
        "conv": {
            "einsum": lambda: conv(x, weight, **hyper),
            "torch": lambda: F.conv2d(x, weight, **hyper),
        },
    }
    if simplifiable:
        pairs["reduce"]["einsum_nosimplify"] = lambda: kfac_reduce_factor(
            x, layer.kernel, **hyper, simplify=False
        )
    times, peaks = {}, {}
    with torch.no_grad():
        for op, fns in pairs.items():
            for key, value in paired_median_times(fns, reps, device).items():
                times[f"{op}_{key}"] = value
        for op in ("reduce", "expand"):
            for key in ("einsum", "unfold"):
                with PeakMemory(device) as peak:
                    pairs[op][key]()
                peaks[f"{op}_{key}"] = peak.nbytes
    nosimplify = times.get("reduce_einsum_nosimplify")
    return {
        "net": layer.net,
        "layer": layer.name,
        "input": [batch, layer.c_in, layer.size, layer.size],
        "kernel": layer.kernel,
        "stride": layer.stride,
        "padding": layer.padding,
        "c_out": layer.c_out,
        "unfolded_mib": round(unfolded_mib, 1),
        "times_s": times,
        "peak_bytes": peaks,
        "peak_ratio_reduce": peaks["reduce_einsum"] / max(peaks["reduce_unfold"], 1),
        "peak_ratio_expand": peaks["expand_einsum"] / max(peaks["expand_unfold"], 1),
        "speedup_reduce": times["reduce_unfold"] / times["reduce_einsum"],
        "speedup_reduce_nosimplify": times["reduce_unfold"] / nosimplify if nosimplify else None,
        "speedup_expand": times["expand_unfold"] / times["expand_einsum"],
        "speedup_conv": times["conv_torch"] / times["conv_einsum"],
    }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 3 reps, 3C3D only")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch, reps = (16, 3) if args.quick else (args.batch, args.reps)
    todo = [ly for ly in layers() if ly.net == "3c3d"] if args.quick else layers()

    header = (
        f"{'net':9s} {'layer':19s} {'input':>18s} {'K/S/P':>7s} {'unfold':>8s} "
        f"{'reduce':>7s} {'red-ns':>7s} {'expand':>7s} {'conv':>6s} {'mem-red':>8s} {'mem-exp':>8s}"
    )
    print(f"einconv speed-ups t_baseline / t_einsum on {device_name(device)}, batch {batch}")
    print(header)
    rows = []
    for layer in todo:
        row = bench_layer(layer, batch, reps, device)
        rows.append(row)
        shape = "x".join(str(s) for s in row["input"])
        print(
            f"{layer.net:9s} {layer.name:19s} {shape:>18s} "
            f"{layer.kernel}/{layer.stride}/{layer.padding:<3d} {row['unfolded_mib']:7.0f}M "
            f"{row['speedup_reduce']:7.2f} {fmt(row['speedup_reduce_nosimplify']):>7s} "
            f"{row['speedup_expand']:7.2f} {row['speedup_conv']:6.2f} "
            f"{row['peak_ratio_reduce']:8.3f} {row['peak_ratio_expand']:8.3f}",
            flush=True,
        )

    summary = {}
    keys = ("speedup_reduce", "speedup_reduce_nosimplify", "speedup_expand", "speedup_conv")
    for key in (*keys, "peak_ratio_reduce", "peak_ratio_expand"):
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            continue
        summary[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    print("summary (median [min, max]):")
    for key, stats in summary.items():
        print(f"  {key:26s} {stats['median']:6.2f} [{stats['min']:.2f}, {stats['max']:.2f}]")

    result = {
        "benchmark": "einconv",
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "opt_einsum": opt_einsum.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "reps": reps,
        "quick": args.quick,
        "dtype": "float32",
        "ratio": "speed-up = t_baseline / t_einsum (median times, same process); "
        "peak_ratio = einsum / unfold peak allocated bytes of one call",
        "rows": rows,
        "summary": summary,
    }
    out = args.out or Path(__file__).parent / "results" / f"einconv_{device.type}.json"
    if args.quick and args.out is None:
        out = out.with_name(f"einconv_{device.type}_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
