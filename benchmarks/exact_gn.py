r"""Time and peak memory of one :class:`curvlab.optim.ExactGN` step as ratios to one Adam step.

Every case is a :class:`curvlab.nn.RevMLP` (``d = 784`` inputs as for MNIST, ``k = 10`` outputs,
``depth`` blocks, expansion width ``h``) and one batch of ``n`` images of the bundled Fashion-MNIST
subset (standardized; Gaussian inputs beyond its 2,048 images) with their class labels. Every timed
step starts from the same parameters (restored outside the timed region).
Methods, all on the same model and batch:

* ``adam``: ``zero_grad``, forward, backward, ``torch.optim.Adam.step`` (the unit of every ratio);
* ``right-inverse`` / ``pinv`` / ``paper``: one ``ExactGN(scheme=...).step(inputs, labels)``
  (Gram-matrix solves, Cholesky with the eigendecomposition as fallback);
* ``authors``: an authors-style baseline written here after the description in
  ``papers/exact-gn.md``: block by block, the exact inverse carried back with forward-mode tangents
  (``torch.func.jvp``), the feature matrices recomputed from the recovered block input, an explicit
  thresholded SVD pseudo-inverse :math:`A^{+} = V \Sigma^{-1} U^\top` ``[h + 1, n]`` of each
  ``n x (h + 1)`` feature matrix (rtol 1e-2, atol 1e-5 as in the authors' configs), and the
  G-correction by a Jacobian-vector product through a recomputed forward of the block.

Time: the median wall time over ``--repeats`` repeats after one warm-up round; the methods are
interleaved inside every repeat (adam, right-inverse, pinv, paper, authors, adam, ...) so that load
from other processes hits all of them alike, and the ratio to Adam is taken in the same process.
On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated()`` during one step minus the memory
allocated before it (model, optimizer state and batch excluded), in the timing process. On the CPU
the rise of the peak resident set size during one step, measured in a fresh subprocess per
(size, method): the subprocess builds the model and batch, runs one warm-up step on a batch of 8
(libraries and kernels loaded), resets the kernel's high-water mark (``/proc/self/clear_refs``),
reads ``VmRSS``, runs one step on the full batch and reports ``VmHWM - VmRSS``. Without
``clear_refs`` it falls back to ``ru_maxrss`` (an upper bound). This counts every byte the step
touches (temporaries included, allocator slack too), not only tensors autograd saves.

Usage::

    python benchmarks/exact_gn.py                      # CPU: n=256,h=2000 and n=64,h=500
    python benchmarks/exact_gn.py --sizes 1024x8000    # the paper's size (slow on a CPU)
    python benchmarks/exact_gn.py --device cuda        # GPU: n=1024,h=8000 and n=256,h=2000

Writes ``benchmarks/results/exact_gn_<device>.json`` (``--out`` to change) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp

from curvlab.data import load_dataset, to_float
from curvlab.nn import RevMLP
from curvlab.nn.reversible import InvertedBottleneck, ReversibleBlock
from curvlab.optim import ExactGN

RESULTS = Path(__file__).parent / "results"
IN_FEATURES, NUM_CLASSES = 784, 10
SCHEMES = ("right-inverse", "pinv", "paper")
AUTHORS_RTOL, AUTHORS_ATOL = 1e-2, 1e-5
DEFAULT_SIZES = {"cpu": "256x2000,64x500", "cuda": "1024x8000,256x2000"}
MIB = 2**20
LR = 1e-6  # tiny, so that the repeated steps leave the model (and its ranks) essentially unchanged


# --------------------------------------------------------------------------------------------------
# Authors-style baseline (own code, following the description in papers/exact-gn.md)
# --------------------------------------------------------------------------------------------------


def _svd_pinv(features: Tensor, rtol: float, atol: float) -> Tensor:
    r"""Explicit thresholded pseudo-inverse :math:`V_r \Sigma_r^{-1} U_r^\top`, ``[h', n]``."""
    u, s, vh = torch.linalg.svd(features, full_matrices=False)
    keep = (s >= s.max() * rtol) & (s >= atol)
    return vh[keep].T @ (u[:, keep] / s[keep]).T


def _features_with_ones(branch: InvertedBottleneck, z: Tensor) -> Tensor:
    """Branch features ``[n, h]`` with the bias's ones column appended."""
    features = branch.features(z)
    if branch.proj.bias is None:
        return features
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def _linear_with(features: Tensor, delta: Tensor, branch: InvertedBottleneck) -> Tensor:
    """Branch output with ``[W, b]`` replaced by the ``[m, h']`` matrix ``delta`` (bias last)."""
    if branch.proj.bias is None:
        return features @ delta.T
    return features[:, :-1] @ delta[:, :-1].T + delta[:, -1]


def _authors_block_update(
    block: ReversibleBlock, y: Tensor, tangent: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One block of the authors-style scheme; returns ``ΔW_F, ΔW_G`` ``[m, h']`` and the input."""
    x_prev, x_tangent = jvp(block.inverse, (y,), (tangent,))
    t1, t2 = tangent.chunk(2, dim=-1)
    x1, x2 = x_prev.chunk(2, dim=-1)
    a_f = _features_with_ones(block.f, x2)
    y1 = x1 + block.f(x2)
    a_g = _features_with_ones(block.g, y1)
    update_f = _svd_pinv(a_f, AUTHORS_RTOL, AUTHORS_ATOL) @ t1  # [h', m]
    pinv_g = _svd_pinv(a_g, AUTHORS_RTOL, AUTHORS_ATOL)

    def y2_of_f_weights(weights: Tensor) -> Tensor:
        return x2 + block.g(x1 + _linear_with(a_f, weights, block.f))

    weights_f = block.f.proj.weight
    if block.f.proj.bias is not None:
        weights_f = torch.cat([weights_f, block.f.proj.bias[:, None]], dim=1)
    missing = jvp(y2_of_f_weights, (weights_f,), (update_f.T,))[1]
    update_g = pinv_g @ t2 - pinv_g @ missing
    return update_f.T, update_g.T, x_prev, x_tangent


@torch.no_grad()
def authors_step(model: RevMLP, inputs: Tensor, labels: Tensor, loss: str, lr: float) -> float:
    r"""One step of the authors-style block scheme (raw scale; CE with the identity Hessian).

    The function-space step :math:`\varepsilon = 2 (f - y) U^\top` (MSE) or
    :math:`(\operatorname{softmax}(f) - y) U^\top` (CE) is carried back block by block through the
    exact inverse; every block solves for the full tangent of its output with SVD pseudo-inverses.
    """
    x = model.flatten_input(inputs)
    z = model.body(x)
    out = z @ model.projection
    target = F.one_hot(labels, model.num_classes).to(out)
    if loss == "mse":
        value, step = F.mse_loss(out, target), 2 * (out - target)
    else:
        value, step = F.cross_entropy(out, labels), torch.softmax(out, -1) - target
    tangent = step @ model.projection.T
    updates = []
    for block in reversed(model.body.blocks):
        update_f, update_g, z, tangent = _authors_block_update(block, z, tangent)
        updates.append((block, update_f, update_g))
    for block, update_f, update_g in updates:
        for branch, update in ((block.f, update_f), (block.g, update_g)):
            branch.proj.weight.sub_(update[:, : branch.proj.weight.shape[1]], alpha=lr)
            if branch.proj.bias is not None:
                branch.proj.bias.sub_(update[:, -1], alpha=lr)
    return float(value)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"256x2000,64x500"`` -> ``[(256, 2000), (64, 500)]`` (batch ``n`` x hidden ``h``)."""
    sizes = []
    for item in text.split(","):
        n, h = item.lower().split("x")
        sizes.append((int(n), int(h)))
    return sizes


def build(
    n: int, hidden: int, depth: int, device: str, seed: int = 0
) -> tuple[RevMLP, Tensor, Tensor]:
    """The RevMLP of the case and one batch: the first ``n`` bundled Fashion-MNIST training images
    (standardized, flattened to 784) with their labels, or Gaussian inputs beyond 2,048 images."""
    torch.manual_seed(seed)
    model = RevMLP(IN_FEATURES, NUM_CLASSES, hidden, depth).to(device)
    images, labels = load_dataset("bundled", "train")
    if n <= len(images):
        inputs = to_float(images[:n]).reshape(n, -1)
        inputs = (inputs - inputs.mean()) / inputs.std()
        labels = labels[:n]
    else:
        inputs = torch.randn(n, IN_FEATURES)
        labels = torch.randint(0, NUM_CLASSES, (n,))
    return model, inputs.to(device), labels.to(device)


def make_steps(
    model: RevMLP, loss: str, methods: list[str]
) -> dict[str, Callable[[Tensor, Tensor], object]]:
    """One callable per method, each performing one full optimizer step on ``(inputs, labels)``."""
    steps: dict[str, Callable[[Tensor, Tensor], object]] = {}
    for method in methods:
        if method == "adam":
            adam = torch.optim.Adam(model.parameters(), lr=LR)

            def adam_step(inputs: Tensor, labels: Tensor, adam: torch.optim.Adam = adam) -> float:
                adam.zero_grad()
                out = model(inputs)
                if loss == "mse":
                    value = F.mse_loss(out, F.one_hot(labels, NUM_CLASSES).to(out))
                else:
                    value = F.cross_entropy(out, labels)
                value.backward()
                adam.step()
                return value.detach()

            steps[method] = adam_step
        elif method == "authors":
            steps[method] = lambda inputs, labels: authors_step(model, inputs, labels, loss, LR)
        else:
            steps[method] = ExactGN(model, lr=LR, loss=loss, scheme=method).step
    return steps


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(
    n: int,
    hidden: int,
    depth: int,
    loss: str,
    methods: list[str],
    repeats: int,
    device: str,
    slow_repeats: int | None = None,
) -> dict[str, dict[str, object]]:
    """Median step times (interleaved repeats) and, on CUDA, peak memory of every method.

    ``slow_repeats`` caps the repeats of the authors-style baseline (tens of seconds a step on a
    CPU); it takes part in the first rounds only, still interleaved with the others.
    """
    model, inputs, labels = build(n, hidden, depth, device)
    steps = make_steps(model, loss, methods)
    # Every step starts from the same parameters (restored outside the timed region), so no
    # method sees a model that another one moved.
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    samples: dict[str, list[float]] = {method: [] for method in methods}
    peaks: dict[str, int] = {}
    for repeat in range(repeats + 1):  # the first round warms up and is dropped
        for method, step in steps.items():
            if method == "authors" and slow_repeats is not None and repeat > slow_repeats:
                continue
            model.load_state_dict(initial)
            if device == "cuda" and repeat == 1:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            _sync(device)
            start = time.perf_counter()
            step(inputs, labels)
            _sync(device)
            elapsed = time.perf_counter() - start
            if device == "cuda" and repeat == 1:
                peaks[method] = torch.cuda.max_memory_allocated() - base
            if repeat > 0:
                samples[method].append(elapsed)
    adam = statistics.median(samples["adam"])
    results: dict[str, dict[str, object]] = {}
    for method in methods:
        median = statistics.median(samples[method])
        results[method] = {
            "median_s": median,
            "repeats": len(samples[method]),
            "ratio_to_adam": median / adam,
            "samples_s": samples[method],
        }
        if method in peaks:
            results[method]["peak_bytes"] = peaks[method]
    return results


# --------------------------------------------------------------------------------------------------
# CPU peak memory (one subprocess per case)
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(n: int, hidden: int, depth: int, loss: str, method: str) -> None:
    """Subprocess body: print the rise of peak RSS (bytes) during one step as JSON."""
    model, inputs, labels = build(n, hidden, depth, "cpu")
    step = make_steps(model, loss, [method])[method]
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    step(inputs[:8], labels[:8])
    model.load_state_dict(initial)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _status_kib("VmRSS")
        step(inputs, labels)
        rise, how = (_status_kib("VmHWM") - base) * 1024, "VmHWM - VmRSS after clear_refs"
    except OSError:
        base = _status_kib("VmRSS")
        step(inputs, labels)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rise, how = (peak - base) * 1024, "ru_maxrss - VmRSS (upper bound)"
    print(json.dumps({"peak_bytes": rise, "how": how}))


def memory_in_subprocess(n: int, hidden: int, depth: int, loss: str, method: str) -> dict:
    """Run :func:`memory_child` in a fresh interpreter with this process's thread settings."""
    command = [sys.executable, __file__, "--child", str(n), str(hidden), str(depth), loss, method]
    command += ["--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` where that is unreadable)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(rows: list[dict[str, object]]) -> None:
    """Median times, ratios to Adam and peak memory, one line per (size, loss, method)."""
    header = (
        f"{'n':>5} {'h':>5} {'loss':>4} {'method':>14} {'median ms':>10} {'x Adam':>7} "
        f"{'peak MiB':>9} {'x Adam':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        peak = row.get("peak_bytes")
        peak_ratio = row.get("peak_ratio_to_adam")
        print(
            f"{row['n']:>5} {row['hidden']:>5} {row['loss']:>4} {row['method']:>14} "
            f"{row['median_s'] * 1e3:>10.1f} {row['ratio_to_adam']:>7.2f} "
            + (f"{peak / MIB:>9.1f} " if peak is not None else f"{'-':>9} ")
            + (f"{peak_ratio:>7.2f}" if peak_ratio is not None else f"{'-':>7}")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated NxH (batch x hidden); default per device"
    )
    parser.add_argument("--depth", type=int, default=4, help="number of reversible blocks")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="ExactGN schemes to time")
    parser.add_argument(
        "--no-authors", action="store_true", help="skip the authors-style SVD baseline"
    )
    parser.add_argument("--losses", default="mse,ce", help="comma-separated: mse, ce")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats (after a warm-up)")
    parser.add_argument(
        "--authors-repeats", type=int, default=3, help="timed repeats of the slow authors baseline"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        n, hidden, depth, loss, method = args.child
        memory_child(int(n), int(hidden), int(depth), loss, method)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    sizes = parse_sizes(args.sizes or DEFAULT_SIZES[args.device])
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = set(schemes) - set(SCHEMES)
    if unknown:
        parser.error(f"unknown schemes {sorted(unknown)}; choose from {SCHEMES}")
    methods = ["adam", *schemes] + ([] if args.no_authors else ["authors"])
    losses = [loss for loss in args.losses.split(",") if loss]
    out = args.out or RESULTS / f"exact_gn_{args.device}.json"
    memory_how = {
        "torch.cuda.max_memory_allocated() during the first timed step minus memory_allocated() "
        "before it"
        if args.device == "cuda"
        else "rise of peak RSS during one step, fresh subprocess per case"
    }
    rows: list[dict[str, object]] = []
    for n, hidden in sizes:
        for loss in losses:
            timed = time_methods(
                n,
                hidden,
                args.depth,
                loss,
                methods,
                args.repeats,
                args.device,
                args.authors_repeats,
            )
            for method in methods:
                rows.append(
                    {"n": n, "hidden": hidden, "loss": loss, "method": method, **timed[method]}
                )
            if args.device == "cpu" and not args.no_memory and loss == losses[0]:
                for method in methods:
                    measured = memory_in_subprocess(n, hidden, args.depth, loss, method)
                    memory_how.add(measured["how"])
                    for row in rows[-len(methods) :]:
                        if row["method"] == method:
                            row["peak_bytes"] = measured["peak_bytes"]
            adam_peak = next(
                (r.get("peak_bytes") for r in rows[-len(methods) :] if r["method"] == "adam"), None
            )
            for row in rows[-len(methods) :]:
                if adam_peak and row.get("peak_bytes") is not None:
                    row["peak_ratio_to_adam"] = row["peak_bytes"] / adam_peak
    print_table(rows)
    header = {
        "benchmark": "ExactGN step vs Adam step (forward, backward, update) on one RevMLP and batch",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(torch.get_default_dtype()),
        "data": "bundled Fashion-MNIST train subset, first n images, standardized "
        "(Gaussian inputs where n > 2048)",
        "in_features": IN_FEATURES,
        "num_classes": NUM_CLASSES,
        "depth": args.depth,
        "sizes": [{"n": n, "hidden": h} for n, h in sizes],
        "losses": losses,
        "methods": methods,
        "repeats": args.repeats,
        "authors_repeats": args.authors_repeats,
        "timing": "median wall time over repeats after one warm-up round, methods interleaved",
        "memory": sorted(memory_how),
        "authors_thresholds": {"rtol": AUTHORS_RTOL, "atol": AUTHORS_ATOL},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
