r"""Time per step and optimizer-state memory of curvlab's optimizers, as ratios to Adam's.

Cases (batch 128, synthetic inputs of the right shapes, random class labels):

* ``3c3d-cifar10``: DeepOBS 3C3D (MISSION.md, Conventions) on ``[128, 3, 32, 32]``;
* ``mlp-mnist``: ``Linear(784, 128) ReLU Linear(128, 64) ReLU Linear(64, 10)`` on ``[128, 784]``.

Methods: ``sgd``, ``adam`` (the unit of every ratio), ``kfac`` (factors every 10 steps, inverses
every 100), ``singd-dense`` / ``singd-diagonal`` / ``singd-block_diagonal`` (the defaults:
preconditioner every 10 steps), ``rootfree-adam``, ``ifshampoo`` (its default: every step),
``adahesscale``; ``exact-gn`` needs a :class:`curvlab.nn.RevMLP` and is recorded as not
applicable to both cases (``benchmarks/exact_gn.py`` times it). ``--compare singd`` adds the PyPI
``singd`` package's SINGD (same model, structures and hyperparameters; timed over runs of 10
consecutive steps, one preconditioner update each) and ASDL's KFAC
(``asdl.KfacGradientMaker`` from the ``asdfghjkl`` distribution) where it imports.

A step is ``zero_grad``, forward, loss, backward and the optimizer's update (the standard
closure). **Amortised** time: an optimizer with intervals has step kinds (KFAC: inverse + factors
at step 0 of 100, factors at the other multiples of 10, plain otherwise; SINGD: update at
multiples of 10, plain otherwise); each kind is timed by setting the optimizer's step counter
before the timed step, and the amortised time is the kinds' medians weighted by their frequency
(KFAC ``(t_inv + 9 t_fac + 90 t_plain) / 100``). Every repeat runs every (method, kind) once,
interleaved, after two warm-up rounds, and every timed step (or run of steps) starts from the
same parameters (restored outside the timed region; the same batch every time would otherwise
drive some methods, AdaHesScale at its default ``lr`` on 3C3D, to NaN); medians over ``--repeats``; the same process for all, on
``OMP_NUM_THREADS=1`` (set before torch is imported when unset).

Memory: bytes of every tensor in ``optimizer.state_dict()`` (the parameters' state; KFAC's
factors and decompositions, SINGD's factors and momenta), after a few steps, against Adam's.
SINGD's state is also recorded for every structure (``singd_state_by_structure``, untimed;
``--memory-only`` refreshes just that entry of an existing JSON).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/optim.py [--compare singd] [--repeats 5] [--memory-only]

Writes ``benchmarks/results/optim-cpu.json`` and ``optim-cpu.png``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
# benchmarks/einconv.py would shadow the ``einconv`` package that ``singd`` imports
sys.path[:] = [
    p for p in sys.path if os.path.abspath(p) != os.path.dirname(os.path.abspath(__file__))
]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import curvlab  # noqa: E402
from curvlab.optim import KFAC, SINGD, AdaHesScale, IFShampoo, RootFreeAdam  # noqa: E402

LOSS = nn.CrossEntropyLoss()
BATCH = 128
RESULTS = Path(__file__).parent / "results"


def three_c_three_d() -> nn.Module:
    """DeepOBS 3C3D for 3x32x32 inputs and 10 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Flatten(),
        nn.Linear(1152, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    """A small MNIST MLP."""
    return nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "3c3d-cifar10": (three_c_three_d, (3, 32, 32)),
    "mlp-mnist": (mlp, (784,)),
}


class Method:
    """A model copy, its optimizer, how to take one step and the step kinds with weights."""

    def __init__(
        self,
        model: nn.Module,
        opt: Any,
        kinds: dict[str, tuple[float, Callable[[], None]]] | None = None,
        step: Callable[[Tensor, Tensor], None] | None = None,
    ) -> None:
        self.model, self.opt = model, opt
        self.kinds = kinds or {"plain": (1.0, lambda: None)}
        self._step = step

    def step(self, x: Tensor, y: Tensor) -> None:
        """One training step on ``(x, y)``."""
        if self._step is not None:
            self._step(x, y)
            return

        def closure() -> Tensor:
            self.opt.zero_grad()
            loss = LOSS(self.model(x), y)
            loss.backward()
            return loss

        self.opt.step(closure)


def _set_steps(opt: Any, attribute: str, value: int) -> Callable[[], None]:
    return lambda: setattr(opt, attribute, value)


def build(name: str, make: Callable[[], nn.Module]) -> Method:  # noqa: C901
    """The method ``name`` on a fresh model (same seed for every method)."""
    torch.manual_seed(0)
    model = make()
    if name == "sgd":
        return Method(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    if name == "adam":
        return Method(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    if name == "kfac":
        opt = KFAC(
            model,
            lr=0.01,
            loss_func=LOSS,
            factor_update_interval=10,
            inverse_update_interval=100,
        )
        kinds = {
            "inverse": (0.01, _set_steps(opt, "_steps", 0)),
            "factors": (0.09, _set_steps(opt, "_steps", 10)),
            "plain": (0.90, _set_steps(opt, "_steps", 1)),
        }
        return Method(model, opt, kinds)
    if name.startswith("singd-"):
        opt = SINGD(model, loss_func=LOSS, structure=name.removeprefix("singd-"))
        kinds = {
            "update": (0.1, _set_steps(opt, "_steps", 0)),
            "plain": (0.9, _set_steps(opt, "_steps", 1)),
        }
        return Method(model, opt, kinds)
    if name == "rootfree-adam":
        return Method(model, RootFreeAdam(model.parameters(), batch_size=BATCH))
    if name == "ifshampoo":
        return Method(model, IFShampoo(model.parameters(), batch_size=BATCH))
    if name == "adahesscale":
        return Method(model, AdaHesScale(model, loss_func=LOSS))
    if name.startswith("pkg-singd-"):
        from singd.optim.optimizer import SINGD as PACKAGE_SINGD

        ours = name.removeprefix("pkg-singd-")
        theirs = {"block_diagonal": "block30diagonal"}.get(ours, ours)
        opt = PACKAGE_SINGD(model, structures=(theirs, theirs))
        # its counter also keys its gradient scales: timed over runs of 10 consecutive steps
        # (exactly one preconditioner update each)
        kinds = {"sequence": (1.0, lambda: None)}

        def step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad()
            LOSS(model(x), y).backward()
            opt.step()

        return Method(model, opt, kinds, step)
    if name == "asdl-kfac":
        import asdl

        # ASDL brackets its work with NVTX ranges, which a CPU build of torch lacks: no-ops here
        torch.cuda.nvtx.range_push = lambda *a, **k: None  # type: ignore[assignment]
        torch.cuda.nvtx.range_pop = lambda *a, **k: None  # type: ignore[assignment]
        config = asdl.PreconditioningConfig(
            data_size=BATCH,
            damping=0.1,
            curvature_upd_interval=10,
            preconditioner_upd_interval=100,
            ema_decay=0.95,
        )
        maker = asdl.KfacGradientMaker(model, config)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(LOSS, dummy, y)
            maker.forward_and_backward()
            opt.step()

        # ASDL's interval counter is internal; its steps are timed as they come (amortised
        # over a run of consecutive steps, see ``time_method``)
        return Method(model, opt, {"sequence": (1.0, lambda: None)}, step)
    raise ValueError(f"unknown method {name!r}")


def state_bytes(opt: Any) -> int:
    """Bytes of every tensor in ``opt.state_dict()`` (recursively; param groups excluded)."""

    def walk(obj: Any) -> int:
        if isinstance(obj, Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for k, v in obj.items() if k != "param_groups")
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return sum(walk(v) for v in vars(obj).values()) if hasattr(obj, "__dict__") else 0

    try:
        return walk(opt.state_dict())
    except Exception:  # noqa: BLE001 - a peer whose state_dict does not serialize its factors
        return -1


def _time_round(
    name: str,
    method: Method,
    x: Tensor,
    y: Tensor,
    initial: list[Tensor],
    times: dict[str, dict[str, list[float]]],
    keep: bool,
    asdl_steps: int,
) -> None:
    """Time every step kind of ``method`` once (``keep``: record), restoring its parameters."""
    for kind, (_, prepare) in method.kinds.items():
        steps = 1 if kind != "sequence" else 10 if name.startswith("pkg-") else asdl_steps
        prepare()
        start = time.perf_counter()
        for _ in range(steps):
            method.step(x, y)
        elapsed = (time.perf_counter() - start) / steps
        with torch.no_grad():  # the next timed step starts from the same parameters
            for p, p0 in zip(method.model.parameters(), initial, strict=True):
                p.copy_(p0)
        if keep:
            times[name][kind].append(elapsed)


def run_case(case: str, names: list[str], repeats: int, asdl_steps: int) -> dict[str, Any]:
    """Time every method on ``case``; the ratios to Adam and the state bytes."""
    make, shape = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    methods, errors, initial = {}, {}, {}
    for name in names:
        try:
            methods[name] = build(name, make)
            initial[name] = [p.detach().clone() for p in methods[name].model.parameters()]
            for _ in range(3):
                methods[name].step(x, y)
            with torch.no_grad():
                for p, p0 in zip(methods[name].model.parameters(), initial[name], strict=True):
                    p.copy_(p0)
        except Exception as error:  # noqa: BLE001 - recorded in the JSON
            errors[name] = f"{type(error).__name__}: {error}"
            methods.pop(name, None)
    times: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in m.kinds} for n, m in methods.items()
    }
    for round_ in range(repeats + 2):
        for name, method in list(methods.items()):
            try:
                _time_round(name, method, x, y, initial[name], times, round_ >= 2, asdl_steps)
            except Exception as error:  # noqa: BLE001 - recorded in the JSON
                errors[name] = f"{type(error).__name__}: {error}"
                methods.pop(name)
                times.pop(name)
    medians = {n: {k: statistics.median(v) for k, v in kinds.items()} for n, kinds in times.items()}
    amortised = {
        n: sum(methods[n].kinds[k][0] * t for k, t in kinds.items()) for n, kinds in medians.items()
    }
    adam_time, adam_bytes = amortised["adam"], state_bytes(methods["adam"].opt)
    out = {}
    for name in methods:
        size = state_bytes(methods[name].opt)
        out[name] = {
            "seconds_per_step": amortised[name],
            "ratio_to_adam": amortised[name] / adam_time,
            "kinds_seconds": medians[name],
            "kinds_weights": {k: w for k, (w, _) in methods[name].kinds.items()},
            "state_bytes": size,
            "state_ratio_to_adam": size / adam_bytes if size >= 0 else None,
        }
    out["exact-gn"] = {"not_applicable": "ExactGN needs a curvlab.nn.RevMLP; see exact_gn.py"}
    for name, error in errors.items():
        out[name] = {"error": error}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts of the time and state ratios per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results)
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.6 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        rows = {n: r for n, r in results[case].items() if "ratio_to_adam" in r}
        names = list(rows)
        for col, key, title in (
            (0, "ratio_to_adam", "time per step / Adam's"),
            (1, "state_ratio_to_adam", "optimizer state bytes / Adam's"),
        ):
            ax = axes[row][col]
            values = [rows[n][key] or 0.0 for n in names]
            ax.barh(names, values)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_title(f"{case}: {title}")
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def singd_memory(case: str) -> dict[str, float]:
    """SINGD's state bytes against Adam's for every structure (after 3 steps, untimed)."""
    from curvlab.optim import STRUCTURES

    make, shape = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    ratios = {}
    adam = build("adam", make)
    for _ in range(3):
        adam.step(x, y)
    adam_bytes = state_bytes(adam.opt)
    for structure in STRUCTURES:
        method = build(f"singd-{structure}", make)
        for _ in range(3):
            method.step(x, y)
        ratios[structure] = state_bytes(method.opt) / adam_bytes
    return ratios


def main() -> None:
    """Parse arguments, run the cases, write JSON and PNG, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", nargs="*", default=[], choices=["singd"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--asdl-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "optim-cpu.json")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    memory = {case: singd_memory(case) for case in args.cases}
    for case, ratios in memory.items():
        print(f"{case}: SINGD state / Adam's by structure")
        for structure, ratio in ratios.items():
            print(f"  {structure:18s} {ratio:6.2f}")
    if args.memory_only:
        record = json.loads(args.out.read_text())
        for case, ratios in memory.items():
            record["results"][case]["singd_state_by_structure"] = ratios
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        return
    structures = ["dense", "diagonal", "block_diagonal"]
    names = ["adam", "sgd", "kfac"] + [f"singd-{s}" for s in structures]
    names += ["rootfree-adam", "ifshampoo", "adahesscale"]
    peers: dict[str, Any] = {}
    if "singd" in args.compare:
        names += [f"pkg-singd-{s}" for s in structures] + ["asdl-kfac"]
        for module in ("singd", "asdl"):
            try:
                imported = __import__(module)
                peers[module] = getattr(imported, "__version__", "installed")
            except Exception as error:  # noqa: BLE001 - recorded
                peers[module] = f"not importable: {type(error).__name__}: {error}"
        peers["asdfghjkl"] = (
            "`pip install --no-deps asdfghjkl` installs the distribution asdfghjkl 0.1a5, whose "
            "module is `asdl` (`import asdfghjkl` fails: no such module); its NVTX calls are "
            "replaced by no-ops on this CPU build of torch"
        )
    results = {case: run_case(case, names, args.repeats, args.asdl_steps) for case in args.cases}
    for case, ratios in memory.items():
        results[case]["singd_state_by_structure"] = ratios
    record = {
        "benchmark": "optim",
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "batch_size": BATCH,
        "repeats": args.repeats,
        "note": "taken on a shared, loaded 2-core machine (other processes running)",
        "versions": {
            "torch": torch.__version__,
            "curvlab": getattr(curvlab, "__version__", "dev"),
            "python": platform.python_version(),
            **peers,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    for case, rows in results.items():
        print(f"\n{case} (batch {BATCH}): time / Adam, state bytes / Adam")
        for name, r in rows.items():
            if "ratio_to_adam" in r:
                state = r["state_ratio_to_adam"]
                state_text = "n/a" if state is None else f"{state:7.2f}"
                print(f"  {name:24s} {r['ratio_to_adam']:6.2f}x   {state_text}")
            elif name != "singd_state_by_structure":
                print(f"  {name:24s} {r.get('error') or r.get('not_applicable')}")


if __name__ == "__main__":
    main()
