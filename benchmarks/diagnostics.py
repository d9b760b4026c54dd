"""Overhead of the training Monitor's presets relative to the same loop without it (and Cockpit's).

For every problem (``mlp-mnist``, ``3c3d-cifar10``; MISSION.md) at batch 128 on random data of the
right shapes, one process builds a plain SGD training loop (forward, ``loss.backward()``,
``optimizer.step()``) and the same loop inside a
:class:`curvlab.diagnostics.Monitor` for each preset (``economy``, ``business``, ``full``) and
tracking interval ``k`` (1, 4, 16: every instrument every ``k`` steps, ``schedule=k``), and
``business-mc``: business with ``TICDiag(curvature="mc")`` and ``HessianTrace(method="mc")`` (one
sampled GGN column instead of the exact Hessian diagonal; Cockpit's side runs its business), and
``business-mcs``: with ``curvature="mc-subsample"``/``method="mc-subsample"`` (the MC GGN diagonal
from one extra pass over the monitor's subsample). The monitor runs with its default subsample of
the per-sample statistics (``Monitor(samples=16)``). With
``--compare cockpit`` the same rows run for cockpit-for-pytorch on BackPACK (a business-mc* row takes
Cockpit's ratio from the business row of its problem and interval, ``"cockpit_from"``):
``Cockpit(params, quantities=configuration(preset, track_schedule=linear(k)))`` with
``loss.backward(create_graph=cockpit.create_graph(step))``, its documented loop. Every
configuration trains its own copy of the model (the monitors hook their model). A loop of ``k``
steps (one tracked step, ``k - 1`` untracked) is timed for each configuration *interleaved*
with the plain loop, one run of each per round, the order rotating; the ratio is the median of
a configuration's loop time over the median plain loop time. Every raw time is kept. JSON:
``benchmarks/results/diagnostics-cpu.json``.

    python benchmarks/diagnostics.py --compare cockpit
    python benchmarks/diagnostics.py --problems mlp-mnist --intervals 1 --presets economy
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import importlib.util
import json
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from curvlab.diagnostics import PRESETS as MONITOR_PRESETS
from curvlab.diagnostics import HessianTrace, Monitor, TICDiag

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("benchmarks_backprop", HERE / "backprop.py")
_backprop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_backprop)
build, _commit, _device = _backprop.build, _backprop._commit, _backprop._device

PROBLEMS = ("mlp-mnist", "3c3d-cifar10")
PRESETS = ("economy", "business", "business-mc", "business-mcs", "full")
INTERVALS = (1, 4, 16)
TARGETS = {"economy": 1.25, "business": 1.5, "business-mc": 1.5, "business-mcs": 1.5}
"""Issue 19's targets at interval 1 (the ratio to training without a monitor)."""
COCKPIT_PUBLISHED = {"economy": 1.5, "business": 2.0}
"""Cockpit's published overheads for 3C3D at every step (its paper, Fig. 6)."""
LR = 0.01
COCKPIT_SHIM = (
    "cockpit-for-pytorch 1.0.2 on torch 2.13 (installed --no-deps): `import cockpit` fails with "
    "ModuleNotFoundError: No module named 'pkg_resources' (cockpit/__init__.py uses "
    "pkg_resources.get_distribution; setuptools is not installed), then 'json_tricks', "
    "'pandas', 'seaborn' (used only by its log writer and plotter). Worked around in this "
    "benchmark only: a pkg_resources stand-in on importlib.metadata, empty modules for the "
    "other three (cockpit's logging and plotting are not used). configuration() takes "
    "track_schedule= (not track_interval=)."
)


# ------------------------------------------------------------------------------------- cockpit
def _import_cockpit() -> types.ModuleType:
    """``cockpit``, with stand-ins for the modules it imports that are missing here."""
    if importlib.util.find_spec("pkg_resources") is None:
        from importlib.metadata import version

        module = types.ModuleType("pkg_resources")
        module.__spec__ = importlib.machinery.ModuleSpec("pkg_resources", None)

        class DistributionNotFound(Exception):  # noqa: N818 (the name cockpit imports)
            pass

        def get_distribution(name: str) -> types.SimpleNamespace:
            return types.SimpleNamespace(version=version("cockpit-for-pytorch"))

        module.DistributionNotFound = DistributionNotFound
        module.get_distribution = get_distribution
        sys.modules["pkg_resources"] = module
    for name in ("json_tricks", "pandas", "seaborn"):
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
    import cockpit

    return cockpit


# --------------------------------------------------------------------------------------- loops
Loop = Callable[[], None]


def _plain(model: nn.Module, loss_func: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Loop:
    """One plain SGD step per call."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        optimizer.zero_grad()
        loss_func(model(x), y).backward()
        optimizer.step()

    return step


def _ours(
    model: nn.Module,
    loss_func: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    preset: str,
    interval: int,
) -> Loop:
    """One SGD step inside ``Monitor(model, loss_func, preset, schedule=interval)`` per call."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = Monitor(model, loss_func, preset=_instruments(preset), schedule=interval)
    counter = [0]

    def step() -> None:
        optimizer.zero_grad()
        loss = loss_func(model(x), y)
        with monitor(counter[0], loss=loss, optimizer=optimizer):
            loss.backward()
        optimizer.step()
        counter[0] += 1

    return step


def _instruments(preset: str) -> str | list:
    """The monitor's preset, or business with the MC curvature options (``business-mc*``)."""
    if preset not in ("business-mc", "business-mcs"):
        return preset
    option = "mc" if preset == "business-mc" else "mc-subsample"
    swap = {"tic_diag": TICDiag(curvature=option), "hessian_trace": HessianTrace(method=option)}
    return [swap.get(name, name) for name in MONITOR_PRESETS["business"]]


def _theirs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    preset: str,
    interval: int,
) -> Loop:
    """One SGD step in Cockpit's loop with ``configuration(preset, linear(interval))``."""
    cockpit = _import_cockpit()
    from backpack import extend
    from cockpit.utils.configuration import configuration
    from cockpit.utils.schedules import linear

    model = extend(model)
    loss_func = extend(nn.CrossEntropyLoss())
    individual = extend(nn.CrossEntropyLoss(reduction="none"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    quantities = configuration(preset.split("-")[0], track_schedule=linear(interval))
    watcher = cockpit.Cockpit(model.parameters(), quantities=quantities)
    counter = [0]

    def step() -> None:
        optimizer.zero_grad()
        output = model(x)
        loss, losses = loss_func(output, y), individual(output, y)
        info = {"batch_size": x.shape[0], "individual_losses": losses, "loss": loss}
        info["optimizer"] = optimizer
        with watcher(counter[0], info=info):
            loss.backward(create_graph=watcher.create_graph(counter[0]))
        optimizer.step()
        counter[0] += 1

    return step


def _run(step: Loop, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def _time(loops: dict[str, Loop], steps: int, args: argparse.Namespace) -> dict:
    """Interleaved rounds of ``steps``-step loops; medians and raw times in seconds."""
    names = list(loops)
    for name in names:  # warm-up (and the first tracked step's set-up)
        _run(loops[name], steps)
    raw: dict[str, list[float]] = {name: [] for name in names}
    start_all, k = time.perf_counter(), 0
    while True:
        for name in names[k % len(names) :] + names[: k % len(names)]:
            raw[name].append(_run(loops[name], steps))
        k += 1
        elapsed = time.perf_counter() - start_all
        if (k >= args.repeats and elapsed >= args.min_seconds) or elapsed >= args.max_seconds:
            break
    return {
        "rounds": k,
        "median_s": {n: statistics.median(t) for n, t in raw.items()},
        "raw_s": raw,
    }


# ---------------------------------------------------------------------------------------- main
def _versions(compare: list[str]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    extra = ["cockpit-for-pytorch", "backpack-for-pytorch"] if "cockpit" in compare else []
    for package in ["curvlab", *extra]:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def _target(preset: str, interval: int, ratios: dict[str, float]) -> str:
    """Which of issue 19's targets the row meets (interval 1, economy and business)."""
    if interval != 1 or preset not in TARGETS:
        return "—"
    ours = ratios["curvlab"]
    parts = [f"<= {TARGETS[preset]}x " + ("met" if ours <= TARGETS[preset] else "NOT met")]
    if "cockpit" in ratios:
        parts.append("< cockpit " + ("met" if ours < ratios["cockpit"] else "NOT met"))
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs="*", choices=["cockpit"], default=[])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--intervals", nargs="+", type=int, default=list(INTERVALS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="least number of rounds")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="least time per row")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="most time per row")
    parser.add_argument("--threads", type=int, default=1)
    default_out = HERE / "results" / "diagnostics-cpu.json"
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    cockpit_error = None
    if "cockpit" in args.compare:
        try:
            _import_cockpit()
        except Exception as error:  # recorded in the JSON, the curvlab rows still run
            cockpit_error = f"{type(error).__name__}: {error}"
            print(f"cockpit unavailable: {cockpit_error}")
    compare = "cockpit" in args.compare and cockpit_error is None
    print(f"time ratio to the same loop without a monitor ({_device()}, {args.threads} thread)")
    print(f"{'problem':>14} {'k':>3} {'preset':>9} {'curvlab':>8} {'cockpit':>8}  target")
    rows: list[dict] = []
    cockpit_business: dict[tuple[str, int], float] = {}
    for problem in args.problems:
        model, loss_func, x, y, _ = build(problem, args.batch_size)
        for interval in args.intervals:
            for preset in args.presets:
                loops = {"plain": _plain(copy.deepcopy(model), copy.deepcopy(loss_func), x, y)}
                loops["curvlab"] = _ours(
                    copy.deepcopy(model), copy.deepcopy(loss_func), x, y, preset, interval
                )
                # Cockpit's side of a business-mc* row is its business: measured in that row
                reuse = compare and preset.startswith("business-") and "business" in args.presets
                if compare and not reuse:
                    loops["cockpit"] = _theirs(copy.deepcopy(model), x, y, preset, interval)
                timed = _time(loops, interval, args)
                t_plain = timed["median_s"]["plain"]
                ratios = {n: t / t_plain for n, t in timed["median_s"].items() if n != "plain"}
                if reuse:
                    ratios["cockpit"] = cockpit_business[(problem, interval)]
                elif compare and preset == "business":
                    cockpit_business[(problem, interval)] = ratios["cockpit"]
                row = {
                    "problem": problem,
                    "batch_size": args.batch_size,
                    "preset": preset,
                    "interval": interval,
                    "steps_per_loop": interval,
                    "rounds": timed["rounds"],
                    "t_plain_loop": t_plain,
                    "t_loop": {n: t for n, t in timed["median_s"].items() if n != "plain"},
                    "time_ratio": ratios,
                    "target": _target(preset, interval, ratios),
                    "cockpit_from": "business row" if reuse else None,
                    "raw_s": timed["raw_s"],
                }
                rows.append(row)
                theirs = f"{ratios['cockpit']:.2f}x" if "cockpit" in ratios else "—"
                print(
                    f"{problem:>14} {interval:>3} {preset:>9} {ratios['curvlab']:>7.2f}x "
                    f"{theirs:>8}  {row['target']}",
                    flush=True,
                )
                _write(args, rows, cockpit_error)
    print(f"wrote {args.out}")


def _write(args: argparse.Namespace, rows: list[dict], cockpit_error: str | None) -> None:
    payload = {
        "benchmark": "diagnostics",
        "device": _device(),
        "threads": args.threads,
        "versions": _versions(args.compare),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
        "command": " ".join(sys.argv),
        "targets_at_interval_1": TARGETS,
        "cockpit_published_3c3d": COCKPIT_PUBLISHED,
        "notes": (
            "One process; per row a plain SGD loop and the same loop with curvlab's Monitor "
            "(and Cockpit's) on their own model copies, each timed over `interval` steps (one "
            "tracked step), interleaved one run each per round, order rotating; t are medians, "
            "raw_s every run; time_ratio = t_loop / t_plain_loop. CrossEntropyLoss(mean), "
            "curvlab's gradient histograms are its default unbiased estimates from 2^16 "
            "elements (Cockpit bins all N P); curvlab's per-sample statistics use the Monitor's "
            "default subsample of 16 of the 128 samples (Cockpit uses all); business-mc is "
            "business with TICDiag(curvature='mc') and HessianTrace(method='mc'), business-mcs "
            "with curvature/method 'mc-subsample', both against Cockpit's business. "
            "random data, SGD lr 0.01. Shared machine (2 cores, other engineers' jobs running): "
            "figures taken under load, one thread."
            + (" " + COCKPIT_SHIM if "cockpit" in args.compare else "")
        ),
        "cockpit_error": cockpit_error,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
