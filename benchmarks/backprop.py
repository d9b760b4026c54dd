"""Cost of each curvlab.backprop quantity relative to a plain gradient (and BackPACK's).

For every problem (``mlp-mnist``, ``3c3d-cifar10``, ``3c3d-cifar100``; MISSION.md), batch size and
quantity, one subprocess builds the problem on random data and times a plain gradient (forward +
``loss.backward()``), the quantity (one :func:`curvlab.backprop.compute` call) and BackPACK's
``with backpack(ext): loss.backward()`` *interleaved*: one run of each per round, the order
rotating, medians over the rounds (at least ``--repeats`` rounds and ``--min-seconds``), so that
load from other jobs hits all three alike; every raw time is kept. Peak memory (resident set
size sampled during two runs, above the imported interpreter) is measured in a fresh subprocess
per library, as freed memory is not returned to the system. Block products (GGNMP, HMP) include
one product per parameter. Rows whose dominant tensor would exceed ``--max-gib`` or whose
estimated time exceeds ``--max-seconds`` are reported as skipped with the estimate. One JSON file
per problem: ``benchmarks/results/backprop-cpu-<problem>.json``.

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

PROBLEMS = ("mlp-mnist", "3c3d-cifar10", "3c3d-cifar100", "transformer")
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
def _TransformerClassifier(classes: int):
    """One ``nn.TransformerEncoderLayer`` (no dropout) and a linear head on the sequence mean."""
    import torch
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoderLayer(
                64, 4, dim_feedforward=256, dropout=0.0, batch_first=True
            )
            self.head = nn.Linear(64, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x).mean(1))

    return Classifier().eval()


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
    elif problem == "transformer":  # issue 14: d_model 64, 4 heads, sequence 32
        classes = 10
        model = _TransformerClassifier(classes)
        x = torch.randn(batch_size, 32, 64)
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


def _callables(spec: dict) -> dict:
    """The timed functions of a case: ``gradient``, ``curvlab`` and, if compared, ``backpack``.

    BackPACK runs on its own (extended) copy of the model, so that its module hooks do not
    slow down the plain gradient or curvlab.
    """
    import copy

    import torch

    from curvlab.backprop import compute

    torch.set_num_threads(spec["threads"])
    model, loss_func, x, y, _ = build(spec["problem"], spec["batch_size"])
    quantity = spec["quantity"]

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_func(model(x), y).backward()

    def ours() -> None:
        results = compute(model, loss_func, x, y, [_ours(quantity)])
        if quantity in ("GGNMP", "HMP"):
            for name, p in model.named_parameters():
                results[quantity][name](torch.ones_like(p))

    fns = {"gradient": gradient, "curvlab": ours}
    if "backpack" in spec["libraries"]:
        import backpack
        from backpack import extensions

        bp_model = backpack.extend(copy.deepcopy(model))
        bp_loss = backpack.extend(copy.deepcopy(loss_func))
        ext = getattr(extensions, BACKPACK_NAMES[quantity])()

        def theirs() -> None:
            bp_model.zero_grad(set_to_none=True)
            loss = bp_loss(bp_model(x), y)
            with backpack.backpack(ext):
                loss.backward()
            if quantity in ("GGNMP", "HMP"):
                for p in bp_model.parameters():
                    getattr(p, ext.savefield)(torch.ones(1, *p.shape))
            for p in bp_model.parameters():
                if hasattr(p, ext.savefield):
                    delattr(p, ext.savefield)

        fns["backpack"] = theirs
    return fns


def worker(spec: dict) -> dict:
    """Run one case.

    ``mode="time"``: the gradient, curvlab and BackPACK are timed *interleaved* (one run of
    each per round, the order rotating) in this one process, so that load from other jobs hits
    all alike; returns every raw time and the medians. ``mode="memory"``: the peak resident
    memory of two runs of ``spec["library"]`` alone (a fresh process per library, as freed
    memory is not returned to the system), above the interpreter with its libraries imported.
    """
    import torch  # noqa: F401

    import curvlab.backprop  # noqa: F401 - imported before the memory baseline

    if "backpack" in spec["libraries"]:
        import backpack  # noqa: F401

    base = _rss_bytes()  # interpreter and libraries; the problem owns everything above it
    if spec["mode"] == "memory":
        spec = {**spec, "libraries": [lib for lib in spec["libraries"] if lib == spec["library"]]}
        fns = _callables(spec)
        fn = fns[spec["library"]]
        with PeakRSS() as rss:
            for _ in range(2):
                fn()
        return {"peak_bytes": rss.peak - base}
    fns = _callables(spec)
    names = list(fns)
    first = {}
    for name in names:  # warm-up, also the estimate of how many rounds fit
        start = time.perf_counter()
        fns[name]()
        first[name] = time.perf_counter() - start
    per_round = sum(first.values())
    rounds = max(spec["repeats"], min(25, int(spec["min_seconds"] / max(per_round, 1e-9))))
    if per_round * rounds > spec["max_case_seconds"]:
        rounds = max(1, int(spec["max_case_seconds"] / per_round))
    raw: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            fns[name]()
            raw[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) for name, times in raw.items()}
    return {"rounds": rounds, "median_s": medians, "raw_s": raw}


def _subprocess(spec: dict, timeout: float) -> dict:
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


def _run_case(spec: dict, timeout: float, peak_grad: int | None) -> dict:
    """Interleaved times and per-library peak memory of a case, as rows per library."""
    timed = _subprocess({**spec, "mode": "time"}, timeout)
    if timed["status"] != "ok":
        return {lib: dict(timed) for lib in spec["libraries"]}
    t_grad = timed["median_s"]["gradient"]
    out = {}
    for lib in spec["libraries"]:
        row = {
            "status": "ok",
            "t_grad": t_grad,
            "t_quantity": timed["median_s"][lib],
            "runs": timed["rounds"],
            "time_ratio": timed["median_s"][lib] / t_grad,
            "raw_t_grad": timed["raw_s"]["gradient"],
            "raw_t_quantity": timed["raw_s"][lib],
        }
        if spec["memory"]:
            mem = _subprocess({**spec, "mode": "memory", "library": lib}, timeout)
            if mem["status"] == "ok" and peak_grad:
                row["peak_grad_bytes"] = peak_grad
                row["peak_quantity_bytes"] = mem["peak_bytes"]
                row["memory_ratio"] = mem["peak_bytes"] / peak_grad
        out[lib] = row
    return out


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
    memory = row.get("memory_ratio")
    return f"{row['time_ratio']:7.2f}x " + (f"{memory:5.2f}xM" if memory else "   —  ")


def _target(quantity: str, batch: int, ours: dict, theirs: dict | None) -> str:
    """Which of the Targets (MISSION.md) the row meets."""
    if ours.get("status") != "ok":
        return "not met (no result)"
    notes = []
    t_grad = ours["t_grad"]
    if theirs is not None and theirs.get("status") == "ok":
        extra_ours = ours["t_quantity"] - t_grad
        extra_theirs = theirs["t_quantity"] - t_grad  # same process, same gradient
        ok = extra_ours <= max(0.5 * extra_theirs, 0.1 * t_grad)
        notes.append("vs-BackPACK " + ("met" if ok else "NOT met"))
    if batch == 512 and quantity in PER_SAMPLE_REDUCTIONS | MC_CURVATURE:
        notes.append("2x-grad " + ("met" if ours["time_ratio"] <= 2.0 else "NOT met"))
    if quantity in PER_SAMPLE_REDUCTIONS and ours.get("memory_ratio"):
        notes.append("1.5x-mem " + ("met" if ours["memory_ratio"] <= 1.5 else "NOT met"))
    return ", ".join(notes) or "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--compare", choices=["backpack"], default=None)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--repeats", type=int, default=5, help="least number of rounds")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="least time per case")
    parser.add_argument("--max-case-seconds", type=float, default=90.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--max-seconds", type=float, default=150.0)
    parser.add_argument("--max-gib", type=float, default=3.0)
    parser.add_argument("--out", default=None, help="JSON folder (default benchmarks/results/)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    libraries = ["curvlab"] + ([args.compare] if args.compare else [])
    header = f"{'problem':>14} {'N':>4} {'quantity':>16} {'curvlab':>17}"
    if args.compare:
        header += f" {'BackPACK':>17}"
    print(f"time ratio to a gradient / peak memory ratio ({_device()}, {args.threads} thread)")
    print(header + "  target")
    for problem in args.problems:
        rows: list[dict] = []
        params = _num_params(problem)
        for batch in args.batch_sizes:
            _, _, _, _, classes = build(problem, 1)
            t_grad = _gradient_time(problem, batch, args.threads)
            base = {
                "problem": problem,
                "batch_size": batch,
                "threads": args.threads,
                "repeats": args.repeats,
                "min_seconds": args.min_seconds,
                "max_case_seconds": args.max_case_seconds,
                "memory": not args.no_memory,
            }
            peak_grad = None
            if not args.no_memory:
                mem = _subprocess(
                    {
                        **base,
                        "quantity": "BatchL2",
                        "libraries": [],
                        "mode": "memory",
                        "library": "gradient",
                    },
                    timeout=600,
                )
                peak_grad = mem.get("peak_bytes")
            for quantity in args.quantities:
                seconds, bytes_ = _estimate(quantity, problem, batch, classes, params, t_grad)
                row: dict = {
                    "problem": problem,
                    "batch_size": batch,
                    "quantity": quantity,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "commit": _commit(),
                }
                run = []
                for library in libraries:
                    if library == "backpack" and quantity not in BACKPACK_NAMES:
                        row[library] = None
                    elif bytes_ > args.max_gib * 2**30:
                        reason = f"dominant tensor ~{bytes_ / 2**30:.1f} GiB"
                        row[library] = {"status": "skipped", "reason": reason}
                    elif seconds > args.max_seconds:
                        reason = f"estimated ~{seconds:.0f} s per run"
                        row[library] = {"status": "skipped", "reason": reason}
                    else:
                        run.append(library)
                if run:
                    spec = {**base, "quantity": quantity, "libraries": run}
                    timeout = max(300.0, 4 * args.max_case_seconds + 20 * seconds)
                    row.update(_run_case(spec, timeout, peak_grad))
                row["target"] = _target(quantity, batch, row["curvlab"], row.get("backpack"))
                rows.append(row)
                line = f"{problem:>14} {batch:>4} {quantity:>16} {_fmt(row['curvlab'])}"
                if args.compare:
                    line += f" {_fmt(row.get('backpack'))}"
                print(line + "  " + row["target"], flush=True)
                _write(args, problem, rows)  # after every row: a stopped run keeps its rows
        print(f"wrote {_write(args, problem, rows)}")


def _commit() -> str | None:
    """The checked-out commit of this repository (``None`` outside a git checkout)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


def _write(args: argparse.Namespace, problem: str, rows: list[dict]) -> Path:
    """Write one problem's JSON results (device, versions, settings, rows).

    Rows of an existing file for (batch size, quantity) pairs that this run did not measure are
    kept (each row carries its own date and commit), so that a run of a few rows updates them.
    """
    folder = Path(args.out) if args.out else Path(__file__).parent / "results"
    out = folder / f"backprop-cpu-{problem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    measured = {(row["batch_size"], row["quantity"]) for row in rows}
    kept = []
    if out.exists():
        try:
            payload = json.loads(out.read_text())
        except (OSError, ValueError):
            payload = {}
        for r in payload.get("rows", []):
            if (r["batch_size"], r["quantity"]) not in measured:
                kept.append({"date": payload.get("date"), **r})  # older rows: the file's date
    order = {q: i for i, q in enumerate(QUANTITIES)}
    rows = sorted(kept + rows, key=lambda r: (r["batch_size"], order.get(r["quantity"], 99)))
    payload = {
        "benchmark": "backprop",
        "problem": problem,
        "device": _device(),
        "threads": args.threads,
        "repeats": args.repeats,
        "min_seconds": args.min_seconds,
        "versions": _versions(bool(args.compare)),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "notes": (
            "Per case one process times the plain gradient (forward + loss.backward()), "
            "curvlab.backprop.compute and BackPACK's `with backpack(ext): loss.backward()` "
            "interleaved, one run of each per round with the order rotating (BackPACK on its own "
            "extended copy of the model); t_* are medians over the rounds, raw_t_* every run, "
            "time_ratio = t_quantity / t_grad of the same process. memory_ratio = peak resident "
            "memory of two runs of the quantity alone in a fresh process / the same for the "
            "gradient, both above the interpreter with its libraries imported (model, data and "
            "results count; sampled every 0.5 ms). BackPACK reports per-sample quantities of "
            "g_n/N; the cost is the same. Loss: CrossEntropyLoss(mean), random data."
        ),
        "batch_sizes": sorted({r["batch_size"] for r in rows}),
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=1))
    return out


if __name__ == "__main__":
    main()
