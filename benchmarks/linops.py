"""Cost of the curvature operators relative to a plain gradient (and curvlinops').

For every problem (``mlp-mnist``, ``3c3d-cifar10``: ``build`` of ``benchmarks/backprop.py``, random
data) and batch size, the operators are built on that one batch and every row is timed
*interleaved* with a plain gradient (forward + ``loss.backward()``) in this one process: one run
of each per round, the order rotating, medians over the rounds (at least ``--repeats`` rounds and
``--min-seconds``, at most ``--max-case-seconds``), every raw time kept. Rows:

* ``GGN matvec``, ``Hessian matvec``: ``A @ v`` of :class:`curvlab.linops.GGN` / ``Hessian``
  (warm: their kept passes recorded before the rounds, the Hessian's linearised gradient too);
* ``GGN matmat16``, ``Hessian matmat16``: ``A @ M`` with 16 columns (also per column);
* ``KFAC construction``: ``KFACOperator`` (MC, one sample);
* ``KFAC inverse``: the damped inverse (exact damping, eigendecompositions recomputed) and one
  product with it;
* ``top-10 eigenvalues``: :func:`curvlab.vivit.ggn_eigh` (``vivit``) and
  :func:`curvlab.linalg.lanczos_eigs` on a ``GGN`` built in the timed call (``lanczos``, from
  scratch: the operator's kept passes are recorded in the time), with their eigenvalues' largest
  relative difference.

``--compare curvlinops`` adds curvlinops' ``GGNLinearOperator`` / ``HessianLinearOperator``
products, ``KFACLinearOperator`` and ``KFACInverseLinearOperator`` (``use_exact_damping=True``)
in the same rounds. ``--compare vivit`` adds vivit-for-pytorch's ``EighComputation`` (on BackPACK)
to the eigenvalue row: it calls ``torch.symeig``, removed from torch (2.x raises
``RuntimeError: This function was deprecated since version 1.9 and is now removed``), so the
benchmark shims ``torch.symeig`` / ``Tensor.symeig`` by ``torch.linalg.eigh`` (recorded in the
JSON). JSON: ``benchmarks/results/linops-cpu.json``.

    OMP_NUM_THREADS=1 python benchmarks/linops.py --compare curvlinops vivit
    python benchmarks/linops.py --problems mlp-mnist --batch-sizes 128 --rows "GGN matvec"
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from curvlab.linalg import lanczos_eigs
from curvlab.linops import GGN, Hessian, KFACOperator
from curvlab.vivit import ggn_eigh

HERE = Path(__file__).resolve().parent
# benchmarks/einconv.py would shadow the einconv package that curvlinops imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("benchmarks_backprop", HERE / "backprop.py")
_backprop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_backprop)
build, _commit, _device = _backprop.build, _backprop._commit, _backprop._device

PROBLEMS = ("mlp-mnist", "3c3d-cifar10")
ROWS = (
    "GGN matvec",
    "Hessian matvec",
    "GGN matmat16",
    "Hessian matmat16",
    "KFAC construction",
    "KFAC inverse",
    "top-10 eigenvalues",
)
COLUMNS = 16
DAMPING = 1e-3
VIVIT_SHIM = (
    "vivit-for-pytorch 1.0.0 calls torch.symeig / Tensor.symeig, which torch 2.x removed "
    "(RuntimeError: 'This function was deprecated since version 1.9 and is now removed'); "
    "shimmed here by torch.linalg.eigh (same eigenpairs, ascending)."
)


def _shim_symeig() -> None:
    """``torch.symeig`` for vivit-for-pytorch on torch >= 2 (see :data:`VIVIT_SHIM`)."""

    def symeig(a: torch.Tensor, eigenvectors: bool = False, upper: bool = True):
        values, vectors = torch.linalg.eigh(a, UPLO="U" if upper else "L")
        return values, vectors if eigenvectors else a.new_empty(0)

    torch.symeig = symeig
    torch.Tensor.symeig = symeig


def _their_vivit(model, loss_func, x, y, k: int) -> Callable:
    """vivit-for-pytorch's top-``k`` GGN eigenpairs of the whole network (exact, one pass)."""
    _shim_symeig()
    from backpack import backpack, extend
    from vivit.linalg.eigh import EighComputation

    # a copy: BackPACK's module hooks break the torch.func transforms of the other rows
    model, loss_func = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_func))
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> torch.Tensor:
        computation = EighComputation()
        group = {"params": params, "criterion": lambda evals: list(range(len(evals)))[-k:]}
        hook = computation.get_extension_hook([group])
        with backpack(computation.get_extension(), extension_hook=hook):
            loss_func(model(x), y).backward()
        return computation.get_result(group)[0].flip(0)

    return run


def _cases(
    problem: str, batch: int, rows: list[str], compare: bool, vivit: bool = False
) -> tuple[Callable, dict, dict]:
    """The plain gradient and, per row, the timed functions by library."""
    model, loss_func, x, y, _ = build(problem, batch)
    data = [(x, y)]
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(size, generator=generator)
    m = torch.randn(size, COLUMNS, generator=generator)

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_func(model(x), y).backward()

    ggn = GGN(model, loss_func, None, data, check_deterministic=False)
    hessian = Hessian(model, loss_func, None, data, check_deterministic=False)
    ggn @ v  # the GGN records its kept passes at the second product (the rows' warm-up)
    while hessian.linearized is None:  # warm: the graph, then (after 2 s) the linearisation
        hessian @ m
    kfac = KFACOperator(model, loss_func, None, data, check_deterministic=False)

    def kfac_inverse() -> None:
        for block in kfac.blocks:
            block._eigen = None  # time the eigendecompositions too
        kfac.inverse(DAMPING) @ v

    cases: dict[str, dict[str, Callable]] = {
        "GGN matvec": {"curvlab": lambda: ggn @ v},
        "Hessian matvec": {"curvlab": lambda: hessian @ v},
        "GGN matmat16": {"curvlab": lambda: ggn @ m},
        "Hessian matmat16": {"curvlab": lambda: hessian @ m},
        "KFAC construction": {
            "curvlab": lambda: KFACOperator(model, loss_func, None, data, check_deterministic=False)
        },
        "KFAC inverse": {"curvlab": kfac_inverse},
        "top-10 eigenvalues": {
            "vivit": lambda: ggn_eigh(model, loss_func, x, y, k=10),
            # from scratch: the operator records its kept passes (linearisation) in the time
            "lanczos": lambda: lanczos_eigs(
                GGN(model, loss_func, None, data, check_deterministic=False), 10
            ),
        },
    }
    if compare:
        import curvlinops as cl

        options = {"check_deterministic": False}
        their_ggn = cl.GGNLinearOperator(model, loss_func, params, data, **options)
        their_hessian = cl.HessianLinearOperator(model, loss_func, params, data, **options)
        their_kfac = cl.KFACLinearOperator(model, loss_func, params, data, **options)

        def their_inverse() -> None:
            inverse = cl.KFACInverseLinearOperator(
                their_kfac, damping=DAMPING, use_exact_damping=True
            )
            inverse @ v

        cases["GGN matvec"]["curvlinops"] = lambda: their_ggn @ v
        cases["Hessian matvec"]["curvlinops"] = lambda: their_hessian @ v
        cases["GGN matmat16"]["curvlinops"] = lambda: their_ggn @ m
        cases["Hessian matmat16"]["curvlinops"] = lambda: their_hessian @ m

        def their_construction() -> None:  # the factors are computed lazily otherwise
            operator = cl.KFACLinearOperator(model, loss_func, params, data, **options)
            operator.compute_kronecker_factors()

        cases["KFAC construction"]["curvlinops"] = their_construction
        cases["KFAC inverse"]["curvlinops"] = their_inverse
    extras = {}
    if "top-10 eigenvalues" in rows:
        ours = ggn_eigh(model, loss_func, x, y, k=10)[0]
        counting = GGN(model, loss_func, None, data, check_deterministic=False)
        products = {"columns": 0}
        matmat = counting._matmat

        def counted(matrix: torch.Tensor) -> torch.Tensor:
            products["columns"] += matrix.shape[1]
            return matmat(matrix)

        counting._matmat = counted
        reference = lanczos_eigs(counting, 10)[0]  # descending
        difference = ((ours - reference).abs() / reference.abs()).max()
        extras["top-10 eigenvalues"] = {
            "lanczos_matvecs": products["columns"],
            "vivit_eigenvalues": ours.tolist(),
            "lanczos_eigenvalues": reference.tolist(),
            "max_relative_difference": float(difference),
        }
        if vivit:
            theirs_fn = _their_vivit(model, loss_func, x, y, 10)
            cases["top-10 eigenvalues"]["vivit-for-pytorch"] = theirs_fn
            theirs = theirs_fn()
            extras["top-10 eigenvalues"]["vivit-for-pytorch_eigenvalues"] = theirs.tolist()
            extras["top-10 eigenvalues"]["vivit-for-pytorch_note"] = VIVIT_SHIM
    return gradient, {row: cases[row] for row in rows}, extras


def _time(gradient: Callable, fns: dict[str, Callable], args: argparse.Namespace) -> dict:
    """Interleaved rounds of the gradient and ``fns``; medians and raw times in seconds."""
    fns = {"gradient": gradient, **fns}
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    raw: dict[str, list[float]] = {name: [] for name in names}
    start_all, k = time.perf_counter(), 0
    while True:
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            fns[name]()
            raw[name].append(time.perf_counter() - start)
        k += 1
        elapsed = time.perf_counter() - start_all
        enough = k >= args.repeats and elapsed >= args.min_seconds
        if enough or elapsed >= args.max_case_seconds:
            break
    return {
        "rounds": k,
        "median_s": {n: statistics.median(t) for n, t in raw.items()},
        "raw_s": raw,
    }


def _versions(compare: list[str]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    peers = {"curvlinops": ["curvlinops-for-pytorch"], "vivit": ["vivit-for-pytorch"]}
    extra = [name for c in compare for name in peers[c]]
    extra += ["backpack-for-pytorch"] if "vivit" in compare else []
    for package in ["curvlab", *extra]:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def _target(row: str, entry: dict, problem: str, batch: int, peer_matvec: dict) -> str:
    """Which of issue 17's targets the row meets."""
    ratios = entry["time_ratio"]
    if row.endswith("matvec") and "curvlinops" in ratios:
        met = ratios["curvlab"] <= ratios["curvlinops"]
        return "<= peer " + ("met" if met else "NOT met")
    if row.endswith("matmat16") and row.replace("matmat16", "matvec") in peer_matvec:
        per_column = ratios["curvlab"] / COLUMNS
        met = per_column <= 0.5 * peer_matvec[row.replace("matmat16", "matvec")]
        return f"per column {per_column:.3f}x <= half peer matvec " + ("met" if met else "NOT met")
    if row == "top-10 eigenvalues":
        speedup = ratios["lanczos"] / ratios["vivit"]
        close = entry["max_relative_difference"] <= 0.01
        text = f"vivit {speedup:.1f}x faster, eigenvalues within {entry['max_relative_difference']:.1e}"
        if "vivit-for-pytorch" in ratios:
            text += f"; {ratios['vivit-for-pytorch'] / ratios['vivit']:.1f}x faster than the peer"
        if problem == "3c3d-cifar10" and batch == 128:
            text += " (5x and 1 %: " + ("met" if speedup >= 5 and close else "NOT met") + ")"
        return text
    return "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs="*", choices=["curvlinops", "vivit"], default=[])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--repeats", type=int, default=5, help="least number of rounds")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="least time per row")
    parser.add_argument("--max-case-seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "linops-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compare, vivit = "curvlinops" in args.compare, "vivit" in args.compare
    libraries = ["curvlab"] + (["curvlinops"] if compare else [])
    libraries += ["vivit-for-pytorch"] if vivit else []
    print(f"time ratio to a gradient ({_device()}, {args.threads} thread)")
    print(f"{'problem':>14} {'N':>4} {'row':>20} {'curvlab':>18} {'peer':>11}  target")
    results = []
    for problem in args.problems:
        for batch in args.batch_sizes:
            gradient, cases, extras = _cases(problem, batch, args.rows, compare, vivit)
            peer_matvec: dict[str, float] = {}
            for row, fns in cases.items():
                timed = _time(gradient, fns, args)
                t_grad = timed["median_s"]["gradient"]
                entry = {
                    "problem": problem,
                    "batch_size": batch,
                    "row": row,
                    "rounds": timed["rounds"],
                    "t_grad": t_grad,
                    "t": {n: timed["median_s"][n] for n in fns},
                    "time_ratio": {n: timed["median_s"][n] / t_grad for n in fns},
                    "raw_s": timed["raw_s"],
                    **extras.get(row, {}),
                }
                if row.endswith("matmat16"):
                    entry["per_column_ratio"] = {
                        n: r / COLUMNS for n, r in entry["time_ratio"].items()
                    }
                if row.endswith("matvec") and "curvlinops" in fns:
                    peer_matvec[row] = entry["time_ratio"]["curvlinops"]
                entry["target"] = _target(row, entry, problem, batch, peer_matvec)
                results.append(entry)
                ratios = entry["time_ratio"]
                if row == "top-10 eigenvalues":
                    ours = f"{ratios['vivit']:.2f}x/{ratios['lanczos']:.2f}x"
                    peer = ratios.get("vivit-for-pytorch")
                    theirs = "—" if peer is None else f"{peer:.2f}x"
                else:
                    ours = f"{ratios['curvlab']:.2f}x"
                    theirs = f"{ratios['curvlinops']:.2f}x" if "curvlinops" in ratios else "—"
                print(
                    f"{problem:>14} {batch:>4} {row:>20} {ours:>18} {theirs:>11}  {entry['target']}",
                    flush=True,
                )
                _write(args, libraries, results)
    print(f"wrote {args.out}")


def _write(args: argparse.Namespace, libraries: list[str], rows: list[dict]) -> None:
    payload = {
        "benchmark": "linops",
        "device": _device(),
        "threads": args.threads,
        "versions": _versions(args.compare),
        "libraries": libraries,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
        "command": " ".join(sys.argv),
        "notes": (
            "One process; each row timed interleaved with a plain gradient (forward + "
            "loss.backward()), one run of each per round, order rotating; t are medians, raw_s "
            "every run; time_ratio = t / t_grad. Operators built on the one batch with "
            "check_deterministic=False. KFAC: MC with one sample. KFAC inverse: damping 1e-3, "
            "exact (eigendecompositions recomputed each run) and one product. top-10 "
            "eigenvalues: curvlab.vivit.ggn_eigh (exact GGN) vs curvlab.linalg.lanczos_eigs "
            "on curvlab.linops.GGN built inside the timed call (float32, default tolerance; "
            "lanczos_matvecs counts its products). CrossEntropyLoss(mean), random "
            "data. Shared machine (2 cores, other engineers' jobs running): figures taken "
            "under load, one thread. GGN and Hessian keep their passes between products "
            "(keep_graph, the default for one batch): GGN J v on the torch.func.linearize "
            "tangent map and J^T u backward through the kept output graph; Hessian a tangent "
            "pass through the linearised gradient (torch.func.linearize of the gradient, "
            "checked against the kept graph); with convolutions column by column."
            + (" " + VIVIT_SHIM if "vivit" in args.compare else "")
        ),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
