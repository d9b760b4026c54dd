"""Cost of each curvlab.backprop quantity relative to a plain gradient (and BackPACK's).

For every problem (``mlp-mnist``, ``3c3d-cifar10``, ``3c3d-cifar100``; MISSION.md), batch size and
quantity, one subprocess builds the problem on random data, times a plain gradient
(forward + ``loss.backward()``) and the quantity (one :func:`curvlab.backprop.compute` call, or
BackPACK's ``with backpack(ext): loss.backward()``), and reports the median times and the peak
memory (resident set size sampled during the passes, above the imported interpreter). Ratios
are taken inside one process. Block products (GGNMP, HMP) include one product per parameter.
Rows whose dominant tensor would exceed ``--max-gib`` or whose estimated time exceeds
``--max-seconds`` are reported as skipped with the estimate.

    python benchmarks/backprop.py --compare backpack
    python benchmarks/backprop.py --problems mlp-mnist --batch-sizes 128 --quantities DiagGGN
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
from pathlib import Path

PROBLEMS = ("mlp-mnist", "3c3d-cifar10", "3c3d-cifar100")
QUANTITIES = (
    "BatchGrad",
    "BatchL2",
    "SumGradSquared",
    "Variance",
    "DiagGGNMC",
    "KFAC",
    "BatchDiagGGNMC",
    "SqrtGGNMC",
    "DiagGGN",
    "BatchDiagGGN",
    "DiagHessian",
    "BatchDiagHessian",
    "KFLR",
    "KFRA",
    "SqrtGGN",
    "GGNMP",
    "HMP",
    "HesScale",
    "BL89",
)
BACKPACK_NAMES = {
    "BatchGrad": "BatchGrad",
    "BatchL2": "BatchL2Grad",
    "SumGradSquared": "SumGradSquared",
    "Variance": "Variance",
    "DiagGGN": "DiagGGNExact",
    "DiagGGNMC": "DiagGGNMC",
    "BatchDiagGGN": "BatchDiagGGNExact",
    "BatchDiagGGNMC": "BatchDiagGGNMC",
    "DiagHessian": "DiagHessian",
    "BatchDiagHessian": "BatchDiagHessian",
    "KFAC": "KFAC",
    "KFLR": "KFLR",
    "KFRA": "KFRA",
    "SqrtGGN": "SqrtGGNExact",
    "SqrtGGNMC": "SqrtGGNMC",
    "GGNMP": "GGNMP",
    "HMP": "HMP",
}
EXACT = {"DiagGGN", "BatchDiagGGN", "DiagHessian", "BatchDiagHessian", "KFLR", "SqrtGGN", "HMP"}
"""Quantities that back-propagate one column per class (cost grows with C)."""
PER_SAMPLE_REDUCTIONS = {"BatchL2", "SumGradSquared", "Variance"}
MC_CURVATURE = {"DiagGGNMC", "KFAC"}


# ------------------------------------------------------------------------------------ problems
def build(problem: str, batch_size: int):
    """Model, loss function, inputs and targets of a benchmark problem (seeded random data)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if problem == "mlp-mnist":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )
        x = torch.randn(batch_size, 1, 28, 28)
        classes = 10
    else:
        classes = 10 if problem == "3c3d-cifar10" else 100
        model = nn.Sequential(
            nn.Conv2d(3, 64, 5),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(64, 96, 3),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(96, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Flatten(),
            nn.Linear(1152, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, classes),
        )
        x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, classes, (batch_size,))
    return model, nn.CrossEntropyLoss(), x, y, classes


def _num_params(problem: str) -> int:
    model, *_ = build(problem, 1)
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------- worker
def _ours(quantity: str):
    from curvlab import backprop as bp

    if quantity.endswith("MC") and quantity != "KFAC":
        return getattr(bp, quantity[:-2])(mc_samples=1)
    return getattr(bp, quantity)()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """Largest resident set size while the block runs (a thread samples every 0.5 ms)."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_bytes())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _median_time(fn, repeats: int, min_seconds: float = 1.0) -> tuple[float, int]:
    """Median over at least ``repeats`` runs and ``min_seconds`` (at most 50 runs)."""
    start = time.perf_counter()
    fn()  # warm-up, also the only run when slow
    first = time.perf_counter() - start
    if first * repeats > 40.0:
        return first, 1
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def worker(spec: dict) -> dict:
    """Run one (problem, batch, library, quantity) case; returns times and peak memory."""
    import torch

    import curvlab.backprop  # noqa: F401 - imported before the memory baseline

    if spec["library"] == "backpack":
        import backpack
        from backpack import extensions

    base = _rss_bytes()  # interpreter and libraries; the problem owns everything above it
    torch.set_num_threads(spec["threads"])
    model, loss_func, x, y, _ = build(spec["problem"], spec["batch_size"])
    quantity, library = spec["quantity"], spec["library"]

    if library == "backpack":
        model = backpack.extend(model)
        loss_func = backpack.extend(loss_func)
        ext = getattr(extensions, BACKPACK_NAMES[quantity])()

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_func(model(x), y).backward()

    def ours() -> None:
        from curvlab.backprop import compute

        results = compute(model, loss_func, x, y, [_ours(quantity)])
        if quantity in ("GGNMP", "HMP"):
            for name, p in model.named_parameters():
                results[quantity][name](torch.ones_like(p))

    def theirs() -> None:
        model.zero_grad(set_to_none=True)
        loss = loss_func(model(x), y)
        with backpack.backpack(ext):
            loss.backward()
        if quantity in ("GGNMP", "HMP"):
            for p in model.parameters():
                getattr(p, ext.savefield)(torch.ones(1, *p.shape))
        for p in model.parameters():
            if hasattr(p, ext.savefield):
                delattr(p, ext.savefield)

    run = ours if library == "curvlab" else theirs
    with PeakRSS() as rss:
        t_grad, _ = _median_time(gradient, spec["repeats"])
    peak_grad = rss.peak - base
    with PeakRSS() as rss:
        t_q, runs = _median_time(run, spec["repeats"])
    peak_q = rss.peak - base
    return {
        "t_grad": t_grad,
        "t_quantity": t_q,
        "runs": runs,
        "time_ratio": t_q / t_grad,
        "peak_grad_bytes": peak_grad,
        "peak_quantity_bytes": peak_q,
        "memory_ratio": peak_q / max(peak_grad, 1),
    }


def _run_case(spec: dict, timeout: float) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"ran past {timeout:.0f} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"status": "error", "reason": lines[-1][:300] if lines else f"rc {done.returncode}"}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


# ------------------------------------------------------------------------------------ planning
def _estimate(quantity: str, problem: str, batch: int, classes: int, params: int, t_grad: float):
    """Rough (seconds, bytes of the dominant tensor) of a case, to skip the infeasible ones."""
    columns = classes if quantity in EXACT else 1
    seconds = t_grad * (2 + columns)
    per_sample = {
        "BatchGrad",
        "BatchDiagGGN",
        "BatchDiagGGNMC",
        "BatchDiagHessian",
        "SqrtGGN",
        "SqrtGGNMC",
    }
    bytes_ = 4 * params * batch * (columns if quantity.startswith("Sqrt") else 1)
    if quantity not in per_sample:
        bytes_ = 0
    return seconds, bytes_


def _gradient_time(problem: str, batch: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    model, loss_func, x, y, _ = build(problem, batch)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss_func(model(x), y).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def _versions(compare: bool) -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version

        versions["curvlab"] = version("curvlab")
        if compare:
            versions["backpack-for-pytorch"] = version("backpack-for-pytorch")
    except Exception:  # noqa: BLE001 - versions are informational
        pass
    return versions


def _device() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor()} ({os.cpu_count()} cores)"


def _fmt(row: dict | None) -> str:
    if row is None:
        return f"{'—':>17}"
    if row["status"] != "ok":
        return f"{row['status']:>17}"
    return f"{row['time_ratio']:7.2f}x {row['memory_ratio']:5.2f}xM"


def _target(quantity: str, batch: int, ours: dict, theirs: dict | None) -> str:
    """Which of the Targets (MISSION.md) the row meets."""
    if ours.get("status") != "ok":
        return "not met (no result)"
    notes = []
    t_grad = ours["t_grad"]
    if theirs is not None and theirs.get("status") == "ok":
        extra_ours = ours["t_quantity"] - t_grad
        extra_theirs = (theirs["time_ratio"] - 1.0) * t_grad
        ok = extra_ours <= max(0.5 * extra_theirs, 0.1 * t_grad)
        notes.append("vs-BackPACK " + ("met" if ok else "NOT met"))
    if batch == 512 and quantity in PER_SAMPLE_REDUCTIONS | MC_CURVATURE:
        notes.append("2x-grad " + ("met" if ours["time_ratio"] <= 2.0 else "NOT met"))
    if quantity in PER_SAMPLE_REDUCTIONS:
        notes.append("1.5x-mem " + ("met" if ours["memory_ratio"] <= 1.5 else "NOT met"))
    return ", ".join(notes) or "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--compare", choices=["backpack"], default=None)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=150.0)
    parser.add_argument("--max-gib", type=float, default=3.0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    libraries = ["curvlab"] + ([args.compare] if args.compare else [])
    rows = []
    header = f"{'problem':>14} {'N':>4} {'quantity':>16} {'curvlab':>17}"
    if args.compare:
        header += f" {'BackPACK':>17}"
    print(f"time ratio to a gradient / peak memory ratio ({_device()}, {args.threads} thread)")
    print(header + "  target")
    for problem in args.problems:
        params = _num_params(problem)
        for batch in args.batch_sizes:
            _, _, _, _, classes = build(problem, 1)
            t_grad = _gradient_time(problem, batch, args.threads)
            for quantity in args.quantities:
                seconds, bytes_ = _estimate(quantity, problem, batch, classes, params, t_grad)
                row = {"problem": problem, "batch_size": batch, "quantity": quantity}
                for library in libraries:
                    if library == "backpack" and quantity not in BACKPACK_NAMES:
                        row[library] = None
                        continue
                    if bytes_ > args.max_gib * 2**30:
                        row[library] = {
                            "status": "skipped",
                            "reason": f"dominant tensor ~{bytes_ / 2**30:.1f} GiB",
                        }
                        continue
                    if seconds > args.max_seconds:
                        row[library] = {
                            "status": "skipped",
                            "reason": f"estimated ~{seconds:.0f} s per run",
                        }
                        continue
                    spec = {
                        "problem": problem,
                        "batch_size": batch,
                        "quantity": quantity,
                        "library": library,
                        "repeats": args.repeats,
                        "threads": args.threads,
                    }
                    row[library] = _run_case(spec, timeout=max(120.0, 6 * seconds + 60))
                row["target"] = _target(quantity, batch, row["curvlab"], row.get("backpack"))
                rows.append(row)
                line = f"{problem:>14} {batch:>4} {quantity:>16} {_fmt(row['curvlab'])}"
                if args.compare:
                    line += f" {_fmt(row.get('backpack'))}"
                print(line + "  " + row["target"], flush=True)
                _write(args, rows)  # after every row, so that a stopped run keeps its rows
    print(f"wrote {_write(args, rows)}")


def _write(args: argparse.Namespace, rows: list[dict]) -> Path:
    """Write the JSON results (device, versions, settings, rows)."""
    name = "backprop-cpu" + ("-vs-backpack" if args.compare else "") + ".json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "backprop",
        "device": _device(),
        "threads": args.threads,
        "repeats": args.repeats,
        "versions": _versions(bool(args.compare)),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": (
            "time_ratio = median time of the quantity's pass / median time of a plain gradient "
            "in the same process; memory_ratio = peak resident memory during the quantity's "
            "passes / during the gradient's passes, both above the interpreter with its "
            "libraries imported (model, data and results count, as in "
            "torch.cuda.max_memory_allocated; sampled "
            "every 0.5 ms). BackPACK reports per-sample quantities of "
            "g_n/N; the cost is the same. Loss: CrossEntropyLoss(mean), random data."
        ),
        "problems": args.problems,
        "batch_sizes": args.batch_sizes,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=1))
    return out


if __name__ == "__main__":
    main()
