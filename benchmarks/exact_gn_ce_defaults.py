"""Which cross-entropy step should ExactGN take by default? Full-batch runs on the bundled data.

For every candidate function-space step (the true Newton step, Levenberg-Marquardt damped Newton
steps, the authors' identity-Hessian step), learning rate and seed, train the README's model
(``RevMLP(784, 10, hidden=1024, depth=4)``) for a few full-batch steps on ``n`` bundled training
images and record the training loss after every step and the test loss and accuracy at the end.
A run whose loss turns non-finite or exceeds 100x its start is recorded as diverged. The step's
own divergence check is switched off so that the raw behaviour is measured.

Usage::

    python benchmarks/exact_gn_ce_defaults.py --threads 1   # writes results/exact_gn_ce_defaults.json
    python benchmarks/exact_gn_ce_defaults.py --summarize benchmarks/results/exact_gn_ce_defaults.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from curvlab.data import load_dataset, to_float
from curvlab.nn import RevMLP
from curvlab.optim import ExactGN

CANDIDATES = {
    "newton": {"output_damping": 0.0},
    "damped-1e-3": {"output_damping": 1e-3},
    "damped-1e-2": {"output_damping": 1e-2},
    "damped-0.1": {"output_damping": 0.1},
    "damped-0.3": {"output_damping": 0.3},
    "damped-1": {"output_damping": 1.0},
    "identity": {"identity_hessian": True},
}


def run(candidate: str, lr: float, seed: int, data: dict, steps: int, hidden: int) -> dict:
    """Train one model; returns the losses after every step and the final test metrics."""
    torch.manual_seed(seed)
    model = RevMLP(784, 10, hidden=hidden, depth=4)
    optimizer = ExactGN(model, lr=lr, loss="ce", max_loss_ratio=None, **CANDIDATES[candidate])
    x, y = data["train"]
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(x), y))]
    status = "ok"
    for _ in range(steps):
        try:
            optimizer.step(x, y)
        except Exception as error:  # noqa: BLE001 - any failure after a blow-up is recorded
            status = f"{type(error).__name__}"
            break
        with torch.no_grad():
            loss = float(F.cross_entropy(model(x), y))
        losses.append(loss)
        if not math.isfinite(loss) or loss > 100 * losses[0]:
            status = "diverged"
            break
    result = {"candidate": candidate, "lr": lr, "seed": seed, "status": status, "losses": losses}
    if status == "ok":
        test_x, test_y = data["test"]
        with torch.no_grad():
            out = model(test_x)
        result["test_loss"] = float(F.cross_entropy(out, test_y))
        result["test_acc"] = float((out.argmax(1) == test_y).float().mean())
    return result


def load(n: int, standardize: bool, seed: int = 0) -> dict:
    """``n`` training images (a seeded permutation) and the whole bundled test split."""
    train_images, train_y = load_dataset("bundled", "train")
    test_images, test_y = load_dataset("bundled", "test")
    train_x, test_x = to_float(train_images).flatten(1), to_float(test_images).flatten(1)
    if standardize:
        mean, std = train_x.mean(), train_x.std()
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    index = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]
    return {"train": (train_x[index], train_y[index]), "test": (test_x, test_y)}


def summarize(rows: list[dict], steps: int) -> str:
    """Markdown tables: per candidate and lr, mean train loss after 1 and ``steps`` steps."""
    lines = []
    for standardized in sorted({row["standardized"] for row in rows}):
        subset = [row for row in rows if row["standardized"] == standardized]
        lrs = sorted({row["lr"] for row in subset})
        starts = sorted({round(row["losses"][0], 2) for row in subset})
        inputs = "standardized" if standardized else "in [0, 1]"
        lines += [
            "",
            f"inputs {inputs}, loss at start {', '.join(map(str, starts))} (per seed); cells: "
            f"mean train loss after 1 / {steps} steps (test accuracy), or diverged runs",
            "",
            "| step | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        for candidate in dict.fromkeys(row["candidate"] for row in subset):
            cells = []
            for lr in lrs:
                runs = [r for r in subset if r["candidate"] == candidate and r["lr"] == lr]
                ok = [r for r in runs if r["status"] == "ok"]
                if len(ok) < len(runs):
                    cells.append(f"diverged {len(runs) - len(ok)}/{len(runs)}")
                    continue
                first = statistics.mean(r["losses"][1] for r in ok)
                last = statistics.mean(r["losses"][-1] for r in ok)
                accuracy = statistics.mean(r["test_acc"] for r in ok)
                cells.append(f"{first:.3g} / {last:.3g} ({accuracy:.2f})")
            lines.append(f"| {candidate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="0.1,0.25,0.5,1,2")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "exact_gn_ce_defaults.json")
    )
    parser.add_argument("--summarize", metavar="JSON", help="print the tables of a results file")
    args = parser.parse_args()
    if args.summarize:
        results = json.loads(Path(args.summarize).read_text())
        print(f"n = {results['meta']['n']}" + summarize(results["rows"], results["meta"]["steps"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(lr) for lr in args.lrs.split(",")]
    rows = []
    for standardize in (False, True):
        data = load(args.n, standardize)
        for candidate in args.candidates.split(","):
            for lr in lrs:
                for seed in seeds:
                    started = time.perf_counter()
                    row = run(candidate, lr, seed, data, args.steps, args.hidden)
                    row.update(standardized=standardize, seconds=time.perf_counter() - started)
                    rows.append(row)
                    print(
                        f"std={standardize:d} {candidate:12s} lr={lr:<5g} seed={seed} "
                        f"{row['status']:>10s} loss {row['losses'][0]:.3g} -> "
                        f"{row['losses'][-1]:.3g} ({len(row['losses']) - 1} steps) "
                        f"test acc {row.get('test_acc', float('nan')):.3f}",
                        flush=True,
                    )
    meta = {
        "n": args.n,
        "hidden": args.hidden,
        "depth": 4,
        "steps": args.steps,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(summarize(rows, args.steps))


if __name__ == "__main__":
    main()
