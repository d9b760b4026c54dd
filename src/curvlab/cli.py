"""The ``curvlab`` command: run, resume, plot, summarize and sweep the paper's experiments.

Examples::

    curvlab run fullbatch --dataset bundled --out runs/demo
    curvlab run minibatch --dataset fashion-mnist --hidden 2048 --epochs 10 --out runs/fmnist-mb
    curvlab plot runs/demo
    curvlab summary runs/demo
    curvlab sweep fullbatch --optimizer adam --lrs 1e-4,1e-3,1e-2 --dataset bundled --out runs/sweep
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from curvlab.experiments.config import EXPERIMENTS, OPTIMIZERS, make_config


def _csv(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None

    return parse


def _rates(text: str) -> dict[str, float]:
    rates = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"--lr expects NAME=VALUE pairs with NAME in {OPTIMIZERS}, got {item!r}"
            )
        try:
            rates[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr: {value!r} is not a number") from None
    return rates


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", choices=EXPERIMENTS, help="named after the paper's figures")
    p.add_argument(
        "--dataset", default="bundled", choices=("bundled", "fashion-mnist", "mnist", "cifar10")
    )
    p.add_argument("--data", dest="data_path", help="folder of the dataset files")
    p.add_argument("--seeds", type=_csv(int), help="comma-separated seeds (default 42)")
    p.add_argument("--steps", type=int, help="full-batch updates")
    p.add_argument("--epochs", type=int, help="mini-batch epochs")
    p.add_argument("--subset", type=int, help="full-batch training-set size (paper: 1024)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="mini-batch size")
    p.add_argument("--hidden", type=int, help="expansion width (paper: 8000)")
    p.add_argument("--depth", type=int, help="number of reversible blocks (paper: 4)")
    p.add_argument(
        "--norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LayerNorm in the branches",
    )
    p.add_argument("--loss", choices=("ce", "mse"))
    p.add_argument(
        "--ce-hessian",
        dest="ce_hessian",
        choices=("identity", "exact"),
        help="CE function-space step: the authors' identity Hessian or the Newton step",
    )
    p.add_argument("--scheme", dest="gn_scheme", choices=("right-inverse", "pinv", "paper"))
    p.add_argument("--solver", dest="gn_solver", choices=("cholesky", "eigh", "svd", "damped"))
    p.add_argument("--damping", dest="gn_damping", type=float, help="damping of the Gram solves")
    p.add_argument(
        "--output-damping",
        dest="gn_output_damping",
        type=float,
        help="Levenberg-Marquardt damping of the exact CE Newton step (with --ce-hessian exact)",
    )
    p.add_argument("--eval-every", dest="eval_every", type=int, help="full-batch evaluation period")
    p.add_argument("--evals-per-epoch", dest="evals_per_epoch", type=int)
    p.add_argument("--eval-train-size", dest="eval_train_size", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, **extra):
    names = (
        "data_path",
        "seeds",
        "steps",
        "epochs",
        "subset",
        "batch_size",
        "hidden",
        "depth",
        "norm",
        "loss",
        "ce_hessian",
        "gn_scheme",
        "gn_solver",
        "gn_damping",
        "gn_output_damping",
        "eval_every",
        "evals_per_epoch",
        "eval_train_size",
        "device",
        "optimizers",
    )
    overrides = {k: getattr(args, k, None) for k in names}
    overrides.update(extra)
    return make_config(args.experiment, args.dataset, **overrides)


def _print_summary(folder: Path) -> None:
    from curvlab.experiments.plots import summary

    rows = summary(folder)
    print(
        "| phase | optimizer | step | epoch | train loss | train acc | test loss | test acc | time s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['optimizer']} | {r['step']} | {r['epoch']:.2f} | "
            f"{r['train_loss']:.4f} | {r['train_acc']:.4f} | {r['test_loss']:.4f} | "
            f"{r['test_acc']:.4f} | {r['time_s']:.1f} |"
        )


def _cmd_run(args: argparse.Namespace) -> int:
    from curvlab.experiments.plots import plot_run
    from curvlab.experiments.runner import Runner

    lr = None
    if args.lr:
        lr = {"fullbatch": dict(args.lr), "minibatch": dict(args.lr)}
    config = _config(args, lr=lr)
    out = Path(args.out or f"runs/{config.experiment}-{config.dataset}")
    print(f"curvlab run {config.experiment} on {config.dataset} -> {out / 'results.jsonl'}")
    Runner(config, out, progress=not args.no_progress).run()
    _print_summary(out)
    if not args.no_plot:
        for path in plot_run(out):
            print(f"wrote {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from curvlab.experiments.plots import plot_run

    for path in plot_run(args.folder):
        print(f"wrote {path}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    _print_summary(Path(args.folder))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Short runs of one optimizer at several learning rates; ranks them by final train loss."""
    from curvlab.experiments.plots import summary
    from curvlab.experiments.runner import Runner

    out = Path(args.out or f"runs/sweep-{args.experiment}-{args.dataset}-{args.optimizer}")
    rows = []
    for rate in args.lrs:
        lr = {"fullbatch": {args.optimizer: rate}, "minibatch": {args.optimizer: rate}}
        config = _config(args, lr=lr, optimizers=(args.optimizer,))
        folder = out / f"lr={rate:g}"
        Runner(config, folder, progress=not args.no_progress).run()
        for row in summary(folder):
            rows.append({"lr": rate, **row})
            print(
                f"{args.optimizer} lr={rate:g} {row['phase']}: train loss "
                f"{row['train_loss']:.4f}, test acc {row['test_acc']:.4f}"
            )
    finite = [r for r in rows if r["train_loss"] == r["train_loss"]]
    best = min(finite, key=lambda r: r["train_loss"]) if finite else None
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1))
    if best:
        print(f"best {args.optimizer} lr by final train loss: {best['lr']:g}")
    print(f"wrote {out / 'sweep.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlab`` command."""
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) an experiment of the exact-GN paper")
    _add_config_arguments(run)
    run.add_argument("--optimizers", type=_csv(str), help=f"subset of {','.join(OPTIMIZERS)}")
    run.add_argument("--lr", type=_rates, help="learning rates, e.g. gn=2,adam=1e-3")
    run.add_argument("--out", help="results folder (default runs/EXPERIMENT-DATASET)")
    run.add_argument("--no-plot", action="store_true", help="do not draw the figures at the end")
    run.set_defaults(func=_cmd_run)

    plot = sub.add_parser("plot", help="redraw the figures of a results folder")
    plot.add_argument("folder")
    plot.set_defaults(func=_cmd_plot)

    summ = sub.add_parser("summary", help="final metrics of a results folder as a Markdown table")
    summ.add_argument("folder")
    summ.set_defaults(func=_cmd_summary)

    sweep = sub.add_parser("sweep", help="learning-rate sweep of one optimizer")
    _add_config_arguments(sweep)
    sweep.add_argument("--optimizer", required=True, choices=OPTIMIZERS)
    sweep.add_argument("--lrs", required=True, type=_csv(float), help="e.g. 1e-4,1e-3,1e-2")
    sweep.add_argument("--out", help="sweep folder (one sub-folder per learning rate)")
    sweep.set_defaults(func=_cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` console script."""
    from curvlab.data.errors import DataFileError, DataNotFoundError
    from curvlab.experiments.plots import NoResultsError
    from curvlab.experiments.store import ConfigMismatchError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        DataFileError,
        DataNotFoundError,
        ConfigMismatchError,
        NoResultsError,
        ValueError,
    ) as error:
        print(f"curvlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvlab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
