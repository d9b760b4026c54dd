"""A/B in one process: ``compute()`` and in-loop ``capture`` against a baseline commit's ``compute()``.

The baseline's ``src/curvlab`` is extracted with ``git archive`` into a temporary folder and
imported as ``curvlab_baseline`` (its imports rewritten), so both versions run side by side on
the same model and data. Per round, the plain gradient, the baseline, ``compute()`` and the
in-loop capture (``with capture(...): loss.backward()``) run once each, in rotating order;
medians over the rounds. Ratios are to the plain gradient measured in the same rounds. One JSON
file: ``benchmarks/results/capture-ab-cpu.json``.

    python benchmarks/capture_ab.py --baseline ee6ac19 --problems mlp-mnist --batch-sizes 128
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backprop import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STREAMED = ("BatchL2", "SumGradSquared", "Variance", "DiagGGNMC", "KFAC", "DiagGGN", "KFLR")
"""The rows of benchmarks/backprop.py that run on the streamed path (the default here)."""
QUANTITIES = ("BatchGrad", *STREAMED, "DiagHessian", "BatchDiagHessian")
"""Also the general path's Hessian diagonals (their baseline may take the whole-model fallback)."""


def load_baseline(commit: str):
    """The baseline commit's ``curvlab.backprop`` as ``curvlab_baseline.backprop``."""
    folder = Path(tempfile.mkdtemp(prefix="curvlab-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "src/curvlab"],
        check=True,
        capture_output=True,
    ).stdout
    tar_path = folder / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "src" / "curvlab"
    target = folder / "curvlab_baseline"
    package.rename(target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bcurvlab\b(?=[.\s])", "curvlab_baseline", text))
    sys.path.insert(0, str(folder))
    return importlib.import_module("curvlab_baseline.backprop")


def _quantity(module, name: str):
    if name.endswith("MC") and name != "KFAC":
        return getattr(module, name[:-2])(mc_samples=1)
    return getattr(module, name)()


def run_case(problem: str, batch: int, quantity: str, baseline, min_seconds: float, repeats: int):
    import torch

    from curvlab import backprop as ours

    model, loss_func, x, y, _ = build(problem, batch)

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_func(model(x), y).backward()

    def old() -> None:
        baseline.compute(model, loss_func, x, y, [_quantity(baseline, quantity)])

    def new() -> None:
        ours.compute(model, loss_func, x, y, [_quantity(ours, quantity)])

    def in_loop() -> None:
        model.zero_grad(set_to_none=True)
        with ours.capture(model, loss_func, [_quantity(ours, quantity)]):
            loss_func(model(x), y).backward()

    fns = {"gradient": gradient, "baseline": old, "compute": new, "capture": in_loop}
    baseline_error = None
    try:
        old()
    except Exception as err:  # noqa: BLE001 - the baseline may not support the case at all
        baseline_error = f"{type(err).__name__}: {err}"
        del fns["baseline"]
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start, rounds = time.perf_counter(), 0
    names = list(fns)
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        for key in order:
            t0 = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t0)
        rounds += 1
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "problem": problem,
        "batch_size": batch,
        "quantity": quantity,
        "rounds": rounds,
        "median_seconds": med,
        "ratio_to_gradient": {k: med[k] / med["gradient"] for k in fns if k != "gradient"},
        "compute_over_baseline": med["compute"] / med["baseline"] if "baseline" in med else None,
        "baseline_error": baseline_error,
        "capture_over_compute": med["capture"] / med["compute"],
        "threads": torch.get_num_threads(),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="ee6ac19", help="commit to compare with")
    parser.add_argument("--problems", nargs="+", default=["mlp-mnist"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--quantities", nargs="+", default=list(STREAMED), choices=QUANTITIES)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "capture-ab-cpu.json")
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows = []
    print(
        "problem        N  quantity        baseline  compute  capture  compute/base  capture/compute"
    )
    for problem in args.problems:
        for batch in args.batch_sizes:
            for quantity in args.quantities:
                row = run_case(problem, batch, quantity, baseline, args.min_seconds, args.repeats)
                rows.append(row)
                r = row["ratio_to_gradient"]
                base = f"{r['baseline']:8.2f}" if "baseline" in r else "  failed"
                over = row["compute_over_baseline"]
                over = f"{over:12.3f}" if over is not None else " " * 12
                print(
                    f"{problem:12s} {batch:4d}  {quantity:14s} {base} {r['compute']:8.2f} "
                    f"{r['capture']:8.2f} {over} {row['capture_over_compute']:15.3f}",
                    flush=True,
                )
    out = {
        "device": platform.processor() or platform.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "baseline": args.baseline,
        "commit": head,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
