"""The curvlab command: run, resume, plot, summarize and sweep the paper's experiments.

Every option's help text shows its default; where the bundled subset uses a smaller one, both.
Bad values exit with code 2 and a message naming the option. See docs/experiments.md.

Examples::

    curvlab run fullbatch --dataset bundled --out runs/demo
    curvlab run minibatch --dataset fashion-mnist --hidden 2048 --epochs 10 --out runs/fmnist-mb
    curvlab plot runs/demo
    curvlab summary runs/demo
    curvlab sweep fullbatch --optimizer adam --lrs 1e-4,1e-3,1e-2 --dataset bundled --out runs/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from curvlab import __version__
from curvlab.experiments.config import (
    ALL_OPTIMIZERS,
    BUNDLED_DEFAULTS,
    EXPERIMENTS,
    OPTIMIZERS,
    RACE_MODELS,
    RACE_OPTIMIZERS,
    ExperimentConfig,
    default_lr,
    make_config,
)

#: The width study (:mod:`curvlab.experiments.width_scaling`), run by ``curvlab run`` too.
WIDTH_SCALING = "width-scaling"
#: The optimizers' time-to-accuracy study (:mod:`curvlab.experiments.optim_race`).
OPTIM_RACE = "optim-race"
#: Every optimizer name an experiment takes (the paper's and the race's).
_ALL_NAMES = ALL_OPTIMIZERS + tuple(o for o in RACE_OPTIMIZERS if o not in ALL_OPTIMIZERS)

#: The defaults of every setting on the full datasets.
_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(ExperimentConfig)
    if f.default is not dataclasses.MISSING
}


def _int_type(what: str, accept: Callable[[int], bool]) -> Callable[[str], int]:
    """``argparse`` type: an integer that ``accept`` admits (argparse names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def _float_type(what: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
    """``argparse`` type: a number that ``accept`` admits (NaN never is)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_type("a positive integer", lambda v: v > 0)
_non_negative_int = _int_type("an integer >= 0", lambda v: v >= 0)
_non_negative_float = _float_type("a number >= 0", lambda v: v >= 0)
_positive_float = _float_type("a number > 0", lambda v: v > 0)
_number_above_one = _float_type("a number > 1", lambda v: v > 1)


def _csv(kind: Callable, what: str, check: Callable | None = None):
    """``argparse`` type: a non-empty comma-separated list of ``kind`` values."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty list {text!r}")
        if check is not None and not all(check(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def _default(name: str, bundled: bool = True) -> str:
    """The ``(default: ...)`` note of a setting, with the bundled subset's value when it differs."""
    full = _DEFAULTS[name]
    if bundled and name in BUNDLED_DEFAULTS and BUNDLED_DEFAULTS[name] != full:
        return f"(default: {BUNDLED_DEFAULTS[name]} with --dataset bundled, else {full})"
    return f"(default: {full})"


def _rates(text: str) -> dict[str, float]:
    """``argparse`` type of ``--lr``: ``NAME=VALUE`` pairs, every value > 0."""
    rates = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in _ALL_NAMES:
            raise argparse.ArgumentTypeError(
                f"expected NAME=VALUE pairs with NAME in {_ALL_NAMES}, got {item!r}"
            )
        try:
            rates[name] = float(value)
        except ValueError:
            rates[name] = float("nan")
        if not rates[name] > 0:
            raise argparse.ArgumentTypeError(
                f"expected NAME=VALUE pairs with VALUE a number > 0, got {item!r}"
            )
    return rates


def _add_config_arguments(p: argparse.ArgumentParser, extra: tuple[str, ...] = ()) -> None:
    p.add_argument(
        "experiment",
        choices=EXPERIMENTS + extra,
        help="named after the paper's figures"
        + (f"; {', '.join(extra)}: see docs/ntk.md and docs/optim_race.md" if extra else "")
        + " (required)",
    )
    p.add_argument(
        "--dataset",
        default="bundled",
        choices=("bundled", "fashion-mnist", "mnist", "cifar10"),
        help="training and test data; bundled: the Fashion-MNIST subset inside the package "
        "(default: bundled)",
    )
    p.add_argument(
        "--data",
        dest="data_path",
        metavar="DIR",
        help="folder of the dataset files (default: $CURVLAB_DATA, then the system folder, e.g. "
        "/usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--seeds",
        type=_csv(int, "comma-separated non-negative integers", lambda v: v >= 0),
        metavar="LIST",
        help="comma-separated seeds, one run per seed and optimizer (default: 42)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help=f"full-batch updates (one per epoch) {_default('steps')}",
    )
    p.add_argument(
        "--epochs", type=_positive_int, metavar="N", help=f"mini-batch epochs {_default('epochs')}"
    )
    p.add_argument(
        "--subset",
        type=_positive_int,
        metavar="N",
        help=f"full-batch training-set size, class-balanced (paper: 1024) {_default('subset')}",
    )
    p.add_argument(
        "--batch-size",
        dest="batch_size",
        type=_positive_int,
        metavar="N",
        help=f"mini-batch size {_default('batch_size')}",
    )
    p.add_argument(
        "--hidden",
        type=_positive_int,
        metavar="N",
        help=f"expansion width of every branch (paper: 8000) {_default('hidden')}",
    )
    p.add_argument(
        "--depth",
        type=_positive_int,
        metavar="N",
        help="number of reversible blocks (default: 4, 12 with --dataset cifar10)",
    )
    p.add_argument(
        "--norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LayerNorm in the branches (default: off)",
    )
    p.add_argument("--loss", choices=("ce", "mse"), help=f"training loss {_default('loss')}")
    p.add_argument(
        "--ce-hessian",
        dest="ce_hessian",
        choices=("identity", "exact"),
        help="CE function-space step: the authors' identity Hessian or the Newton step "
        f"{_default('ce_hessian')}",
    )
    p.add_argument(
        "--scheme",
        dest="gn_scheme",
        choices=("right-inverse", "pinv", "paper"),
        help="ExactGN scheme (default: right-inverse, paper for no-bottleneck)",
    )
    p.add_argument(
        "--solver",
        dest="gn_solver",
        choices=("cholesky", "eigh", "svd", "damped"),
        help=f"ExactGN's Gram solver {_default('gn_solver')}",
    )
    p.add_argument(
        "--damping",
        dest="gn_damping",
        type=_non_negative_float,
        metavar="X",
        help=f"damping of the Gram solves {_default('gn_damping')}",
    )
    p.add_argument(
        "--output-damping",
        dest="gn_output_damping",
        type=_non_negative_float,
        metavar="X",
        help="Levenberg-Marquardt damping of the exact CE Newton step (with --ce-hessian exact) "
        f"{_default('gn_output_damping')}",
    )
    p.add_argument(
        "--eval-every",
        dest="eval_every",
        type=_positive_int,
        metavar="N",
        help=f"full-batch evaluation (and checkpoint) period in updates {_default('eval_every')}",
    )
    p.add_argument(
        "--eval-first",
        dest="eval_first",
        type=_int_type("an integer >= 0", lambda v: v >= 0),
        metavar="N",
        help="full batch: also evaluate after each of the first N updates, for comparisons at "
        "equal training loss of fast optimizers (default: 0)",
    )
    p.add_argument(
        "--evals-per-epoch",
        dest="evals_per_epoch",
        type=_positive_int,
        metavar="N",
        help=f"mini-batch evaluations (and checkpoints) per epoch {_default('evals_per_epoch')}",
    )
    p.add_argument(
        "--eval-train-size",
        dest="eval_train_size",
        type=_positive_int,
        metavar="N",
        help=f"training samples used to report the train loss {_default('eval_train_size')}",
    )
    p.add_argument(
        "--validation",
        type=_non_negative_int,
        metavar="N",
        help="hold out a class-balanced validation split of N training images (the same for "
        "every seed); evaluations then report val loss and acc, and sweeps rank by val loss "
        f"{_default('validation')}",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="auto: CUDA when available (default: auto)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: progress bars)"
    )
    p.add_argument(
        "--monitor",
        choices=("economy", "business", "full"),
        help="curvlab.diagnostics.Monitor preset on the Adam and SGD updates: JSONL log and "
        "dashboard PNG in RUN_DIR/monitor/ (default: none)",
    )
    p.add_argument(
        "--diverge-factor",
        dest="diverge_factor",
        type=_number_above_one,
        metavar="X",
        help="a run whose loss exceeds X times its initial loss is recorded as diverged and "
        f"stopped {_default('diverge_factor')}",
    )
    p.add_argument(
        "--ntk-probe",
        dest="ntk_probe",
        type=_positive_int,
        metavar="N",
        help="ntk-cka: training images of the fixed NTK and CKA probe (default: 64)",
    )
    p.add_argument(
        "--ntk-mode",
        dest="ntk_mode",
        choices=("full", "trace", "diagonal"),
        help="ntk-cka: the kernel compared, [N, N, C, C], [N, N] or [N, C, C] (default: full)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="results folder (default: runs/EXPERIMENT-DATASET; sweep: "
        "runs/sweep-EXPERIMENT-DATASET-OPTIMIZER)",
    )


#: The options ``_config`` passes to :func:`make_config` (their ``dest`` names).
_CONFIG_OPTIONS = (
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
    "eval_first",
    "evals_per_epoch",
    "eval_train_size",
    "device",
    "diverge_factor",
    "ntk_probe",
    "ntk_mode",
    "optimizers",
    "validation",
)


def _config(args: argparse.Namespace, **extra):
    names = _CONFIG_OPTIONS
    overrides = {k: getattr(args, k, None) for k in names}
    overrides.update(extra)
    return make_config(args.experiment, args.dataset, **overrides)


def _stopped(diverged: dict[int, int]) -> str:
    """``seed S after N, ...`` of a row's ``{seed: step}`` of diverged seeds."""
    return ", ".join(f"seed {seed} after {step}" for seed, step in diverged.items())


def _status(row: dict) -> str:
    """``ok``, or which seeds diverged and after how many updates."""
    if not row["diverged"]:
        return "ok"
    where = _stopped(row["diverged"])
    return f"diverged ({len(row['diverged'])} of {row['seeds']} seeds: {where} updates)"


def _cell(row: dict, key: str, digits: int = 4) -> str:
    """``mean`` of one seed, ``mean ± std`` of several; ``-`` where the row lacks the metric."""
    if row.get(key) is None:
        return "-"
    if row["seeds"] > 1 and f"{key}_std" in row:
        return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"
    return f"{row[key]:.{digits}f}"


def _metric_columns(rows: list[dict]) -> list[tuple[str, str, int]]:
    """(key, heading, digits) of the metric columns: validation and kernel ones where recorded."""
    columns = [("train_loss", "train loss", 4), ("train_acc", "train acc", 4)]
    if any(r.get("val_loss") is not None for r in rows):
        columns += [("val_loss", "val loss", 4), ("val_acc", "val acc", 4)]
    columns += [("test_loss", "test loss", 4), ("test_acc", "test acc", 4)]
    if any(r.get("ntk_similarity") is not None for r in rows):
        columns += [
            ("ntk_similarity", "NTK similarity", 4),
            ("ntk_change", "NTK change", 4),
            ("cka_first", "CKA first", 4),
            ("cka_middle", "CKA middle", 4),
            ("cka_last", "CKA last", 4),
        ]
    return columns


def summary_table(
    folder: Path | Sequence[Path],
    at_train_loss: float | None = None,
    at_step: int | None = None,
) -> str:
    """The Markdown table ``curvlab summary`` prints (docs/reproduction.md quotes them).

    Means over seeds, with ``± std`` (sample standard deviation) when there are several.
    With ``at_train_loss`` every row is taken where the run's training loss first reaches
    that value (interpolated between evaluations) instead of at its last evaluation; with
    ``at_step`` at its last evaluation at or before that update.

    Raises:
        ValueError: both ``at_train_loss`` and ``at_step`` are given.
    """
    from curvlab.experiments.plots import markdown_table, summary, summary_at_train_loss

    if at_train_loss is not None and at_step is not None:
        raise ValueError("give --at-train-loss or --at-step, not both")
    if at_train_loss is None:
        rows = summary(folder, at_step)
        columns = _metric_columns(rows)
        head = ["phase", "optimizer", "seeds", "step", "epoch"] + [c[1] for c in columns]
        lines = [head + ["time s", "status"]]
        for r in rows:
            cells = [
                r["phase"],
                r["optimizer"],
                str(r["seeds"]),
                str(r["step"]),
                _cell(r, "epoch", 2),
            ]
            cells += [_cell(r, key, digits) for key, _, digits in columns]
            lines.append(cells + [_cell(r, "time_s", 1), _status(r)])
    else:
        rows = summary_at_train_loss(folder, at_train_loss)
        columns = [c for c in _metric_columns(rows) if c[0] != "train_loss"]
        head = ["phase", "optimizer", "train loss", "seeds", "step", "epoch"]
        lines = [head + [c[1] for c in columns] + ["not reached"]]
        for r in rows:
            cells = [r["phase"], r["optimizer"], f"{at_train_loss:g}", str(r["seeds"])]
            cells += [_cell(r, "step", 1), _cell(r, "epoch", 2)]
            cells += [_cell(r, key, digits) for key, _, digits in columns]
            lines.append(cells + [_missed(r)])
    return markdown_table(lines[0], lines[1:])


def _missed(row: dict) -> str:
    """The ``not reached`` cell of an equal-training-loss row: its missing seeds, or ``-``."""
    return ", ".join(f"seed {s}" for s in row["missed"]) or "-"


def _setting(config: dict, phase: str, optimizer: str) -> tuple[str, str]:
    """A source's learning rate and (GN only) Gram damping, as ``curvlab sweep`` names them."""
    from curvlab.experiments.config import rate_of

    rates = config["lr"][phase]
    try:
        lr = f"{rate_of(rates, optimizer):g}"
    except KeyError:
        lr = "-"
    damping = f"{config.get('gn_damping', 0.0):g}" if optimizer.startswith("gn") else ""
    return lr, damping


def per_source_table(sources: Sequence[Path | str], at_train_loss: float | None = None) -> str:
    """One row per source and (phase, optimizer), labelled with its rate and damping.

    The table of a sweep: every point's records summarized on their own (means over its
    seeds), so points of the same optimizer, which record the same seeds, sit side by side. A
    source ``A+B+...`` is one point whose seeds are archived in several files (e.g. a seed run
    later); its parts must agree on the rate and damping of every row. With ``at_train_loss``
    every row is taken where its runs' training loss first reaches that value, as in
    :func:`summary_table`.

    Raises:
        ValueError: the parts of a ``A+B`` source differ in a row's rate or damping.
    """
    from curvlab.experiments.plots import (
        JOIN,
        markdown_table,
        split_source,
        summary,
        summary_at_train_loss,
    )
    from curvlab.experiments.store import ResultsStore

    rows = []
    for source in sources:
        parts = str(source).split(JOIN)
        configs = [ResultsStore(split_source(part)[0]).config() for part in parts]
        found = (
            summary(parts) if at_train_loss is None else summary_at_train_loss(parts, at_train_loss)
        )
        for row in found:
            settings = {_setting(c, row["phase"], row["optimizer"]) for c in configs}
            if len(settings) > 1:
                raise ValueError(
                    f"{source}: its parts run {row['phase']} {row['optimizer']} at different "
                    f"settings (lr, damping) {sorted(settings)}; one row is one setting"
                )
            rows.append((row, configs[0]))
    drop = ("train_acc",) if at_train_loss is None else ("train_acc", "train_loss")
    columns = [c for c in _metric_columns([r for r, _ in rows]) if c[0] not in drop]
    head = ["phase", "optimizer", "lr", "damping", "seeds"]
    if at_train_loss is not None:
        head += ["train loss", "step"]
    head += [c[1] for c in columns] + ["status" if at_train_loss is None else "not reached"]
    lines = [head]
    for row, config in rows:
        lr, damping = _setting(config, row["phase"], row["optimizer"])
        cells = [row["phase"], row["optimizer"], lr, damping, str(row["seeds"])]
        if at_train_loss is not None:
            cells += [f"{at_train_loss:g}", _cell(row, "step", 1)]
        cells += [_cell(row, key, digits) for key, _, digits in columns]
        cells.append(_status(row) if at_train_loss is None else _missed(row))
        lines.append(cells)
    return markdown_table(lines[0], lines[1:])


def loss_change_table(sources: Sequence[Path], first: int, last: int | None = None) -> str:
    """Figure 3's table: the mean per-update change (%) of the batch loss, early and late.

    See :func:`~curvlab.experiments.plots.summary_loss_change`; ``last`` counts only the
    updates up to that one.
    """
    from curvlab.experiments.plots import markdown_table, summary_loss_change

    head = ["phase", "optimizer", "seeds", "updates"]
    head += [f"change % (updates < {first})", f"change % (updates >= {first})", "diverged"]
    lines = []
    for r in summary_loss_change(sources, first, last):
        updates = "-" if r["updates"] is None else f"{r['updates']:.0f}"
        cells = [r["phase"], r["optimizer"], str(r["seeds"]), updates]
        lines.append(
            cells + [_cell(r, "early", 2), _cell(r, "late", 2), _stopped(r["diverged"]) or "-"]
        )
    return markdown_table(head, lines)


#: ``curvlab run width-scaling``'s own options (dest names), ignored by the paper's experiments.
_WIDTH_OPTIONS = ("families", "mlp_widths", "cnn_widths", "train_size", "cnn_steps", "cnn_lr")
#: The paper's settings that ``width-scaling`` does not take (it has its own models).
_NOT_WIDTH_OPTIONS = tuple(
    name
    for name in _CONFIG_OPTIONS
    if name not in ("data_path", "seeds", "steps", "depth", "device")
)


def _add_width_arguments(p: argparse.ArgumentParser) -> None:
    positive = _csv(int, "comma-separated positive integers", lambda v: v > 0)
    p.add_argument(
        "--families",
        type=_csv(str, "a comma-separated subset of mlp,cnn", lambda v: v in ("mlp", "cnn")),
        metavar="LIST",
        help="width-scaling only: model families (default: mlp,cnn)",
    )
    p.add_argument(
        "--mlp-widths",
        dest="mlp_widths",
        type=positive,
        metavar="LIST",
        help="width-scaling only: MLP hidden widths (default: 32,128,512,1024)",
    )
    p.add_argument(
        "--cnn-widths",
        dest="cnn_widths",
        type=positive,
        metavar="LIST",
        help="width-scaling only: CNN channels (default: 4,8,16,32)",
    )
    p.add_argument(
        "--train-size",
        dest="train_size",
        type=_positive_int,
        metavar="N",
        help="width-scaling only: class-balanced training images (default: 512)",
    )
    p.add_argument(
        "--cnn-steps",
        dest="cnn_steps",
        type=_int_type("an integer >= 2 (half per task for forgetting)", lambda v: v >= 2),
        metavar="N",
        help="width-scaling only: the CNNs' gradient-descent steps (default: --steps)",
    )
    p.add_argument(
        "--cnn-lr",
        dest="cnn_lr",
        type=_positive_float,
        metavar="C",
        help="width-scaling only: the CNNs' rate factor c of c N_p / lambda_max "
        "(default: --lr sgd=C)",
    )


def _add_race_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        type=_csv(
            str,
            f"a comma-separated subset of {','.join(RACE_MODELS)}",
            lambda v: v in RACE_MODELS,
        ),
        metavar="LIST",
        help=f"optim-race only: the models (default: {','.join(RACE_MODELS)})",
    )


def _cmd_width_scaling(args: argparse.Namespace) -> int:
    """``curvlab run width-scaling``: the width study (docs/ntk.md)."""
    from curvlab.experiments.width_scaling import (
        WidthScaling,
        WidthScalingConfig,
        plot_width_scaling,
    )

    given = [
        name
        for name in (*_NOT_WIDTH_OPTIONS, "monitor", "models")
        if getattr(args, name, None) is not None
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"width-scaling: {flags} belong to the paper's experiments")
    if args.lr and set(args.lr) != {"sgd"}:
        raise ValueError("width-scaling: --lr takes sgd=X (gradient descent's rate)")
    values = {
        "dataset": args.dataset,
        "data_path": args.data_path,
        "seeds": args.seeds,
        "steps": args.steps,
        "depth": args.depth,
        "device": args.device,
        "lr": args.lr["sgd"] if args.lr else None,
        **{name: getattr(args, name) for name in _WIDTH_OPTIONS},
    }
    config = WidthScalingConfig(**{k: v for k, v in values.items() if v is not None})
    out = Path(args.out or f"runs/width-scaling-{config.dataset}")
    print(f"curvlab run width-scaling on {config.dataset} -> {out / 'results.jsonl'}")
    WidthScaling(config, out, progress=not args.no_progress).run()
    if not args.no_plot:
        for path in plot_width_scaling(out):
            print(f"wrote {path}")
    return 0


#: The paper's settings that ``optim-race`` takes (it has its own models and optimizers).
_RACE_OPTIONS = (
    "data_path",
    "seeds",
    "steps",
    "epochs",
    "batch_size",
    "hidden",
    "depth",
    "evals_per_epoch",
    "eval_train_size",
    "validation",
    "device",
    "diverge_factor",
    "optimizers",
)


def _race(args: argparse.Namespace, out: Path | None = None, **extra):
    """The :class:`~curvlab.experiments.optim_race.OptimRace` of ``curvlab run/sweep optim-race``.

    Raises:
        ValueError: an option of the paper's experiments or of width-scaling was given, or a
            setting is out of range (the message names it).
    """
    from curvlab.experiments.optim_race import OptimRace, make_race_config

    other = [n for n in _CONFIG_OPTIONS if n not in _RACE_OPTIONS] + ["monitor", *_WIDTH_OPTIONS]
    given = [name for name in other if getattr(args, name, None) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"optim-race: {flags} belong to the other experiments")
    values = {name: getattr(args, name, None) for name in _RACE_OPTIONS}
    values.update(dataset=args.dataset, models=getattr(args, "models", None), **extra)
    rates = values.pop("lr", None) or getattr(args, "lr", None)
    config = make_race_config(lr=rates, **values)
    out = Path(out or args.out or f"runs/optim-race-{config.dataset}")
    return OptimRace(config, out, progress=not args.no_progress)


def _cmd_optim_race(args: argparse.Namespace) -> int:
    """``curvlab run optim-race``: the optimizers' time to accuracy (docs/optim_race.md)."""
    from curvlab.experiments.optim_race import plot_race

    race = _race(args)
    print(f"curvlab run optim-race on {race.config.dataset} -> {race.store.path}")
    race.run()
    print(summary_table(race.store.folder))
    if not args.no_plot:
        for path in plot_race(race.store.folder):
            print(f"wrote {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from curvlab.experiments.plots import plot_run
    from curvlab.experiments.runner import Runner

    if args.experiment == WIDTH_SCALING:
        return _cmd_width_scaling(args)
    if args.experiment == OPTIM_RACE:
        return _cmd_optim_race(args)
    given = [name for name in _WIDTH_OPTIONS if getattr(args, name, None) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{args.experiment}: {flags} belong to width-scaling")
    if getattr(args, "models", None) is not None:
        raise ValueError(f"{args.experiment}: --models belongs to optim-race")

    lr = None
    if args.lr:
        lr = {"fullbatch": dict(args.lr), "minibatch": dict(args.lr)}
    config = _config(args, lr=lr)
    out = Path(args.out or f"runs/{config.experiment}-{config.dataset}")
    print(f"curvlab run {config.experiment} on {config.dataset} -> {out / 'results.jsonl'}")
    monitor = getattr(args, "monitor", None)
    Runner(config, out, progress=not args.no_progress, monitor=monitor).run()
    print(summary_table(out))
    if not args.no_plot:
        for path in plot_run(out):
            print(f"wrote {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from curvlab.experiments.plots import NoResultsError, plot_run

    try:
        paths = plot_run(args.folder, args.out)
    except (NoResultsError, ValueError) as error:
        print(f"curvlab plot: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from curvlab.experiments.plots import NoResultsError
    from curvlab.experiments.width_scaling import is_width_study, width_summary_table

    try:
        if is_width_study(args.folder[0]):
            if (
                len(args.folder) > 1
                or args.per_source
                or args.at_train_loss
                or args.at_test_acc
                or args.loss_change
                or args.at_step is not None
            ):
                raise ValueError(
                    "a width study's summary takes one folder or records file, and no "
                    "--per-source, --at-train-loss, --at-test-acc, --loss-change or --at-step"
                )
            print(width_summary_table(args.folder[0]))
            return 0
        if args.loss_change is not None:
            if args.per_source or args.at_train_loss is not None or args.at_test_acc is not None:
                raise ValueError(
                    "--loss-change takes no --per-source, --at-train-loss or --at-test-acc"
                )
            print(loss_change_table([Path(f) for f in args.folder], args.loss_change, args.at_step))
            return 0
        if args.at_step is not None and (args.per_source or args.at_test_acc is not None):
            raise ValueError("--at-step takes no --per-source or --at-test-acc")
        if args.at_test_acc is not None:
            from curvlab.experiments.optim_race import time_to_accuracy_table

            if args.at_train_loss is not None:
                raise ValueError("give --at-train-loss or --at-test-acc, not both")
            print(time_to_accuracy_table([Path(f) for f in args.folder], args.at_test_acc))
            return 0
        if args.per_source:
            print(per_source_table([Path(f) for f in args.folder], args.at_train_loss))
            return 0
        print(summary_table([Path(f) for f in args.folder], args.at_train_loss, args.at_step))
    except (NoResultsError, ValueError) as error:
        print(f"curvlab summary: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """Archive a run folder's records as one small ``.jsonl.gz`` file."""
    from curvlab.experiments.store import export_records

    try:
        path = export_records(args.folder, args.out, args.exclude or (), args.seeds)
    except (ValueError, FileNotFoundError) as error:
        print(f"curvlab export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return 0


def _sweep_points(args: argparse.Namespace) -> list[dict]:
    """Every (learning rate, damping) of a sweep; the damping only for ExactGN."""
    is_gn = args.optimizer == "gn" or args.optimizer.startswith("gn-")
    if args.dampings and not is_gn:
        raise ValueError(f"--dampings applies to ExactGN (gn, gn-SCHEME), not {args.optimizer!r}")
    dampings = args.dampings or (None,)
    return [{"lr": lr, "damping": d} for lr in args.lrs for d in dampings]


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Short runs of one optimizer over a grid; ranks them by validation (or train) loss.

    ``--dampings`` adds ExactGN's damping to the grid: the Gram-solve damping, or with
    ``--ce-hessian exact`` the function-space (output) damping.
    """
    from curvlab.experiments.plots import summary
    from curvlab.experiments.runner import Runner

    out = Path(args.out or f"runs/sweep-{args.experiment}-{args.dataset}-{args.optimizer}")
    damping_field = "gn_output_damping" if args.ce_hessian == "exact" else "gn_damping"
    validation = args.validation
    if validation is None and args.experiment == OPTIM_RACE:
        validation = 1  # the race holds out a validation split by default
    rank_by = args.rank_by or ("val_loss" if validation else "train_loss")
    if rank_by == "val_loss" and not validation:
        raise ValueError("--rank-by val_loss needs --validation N")
    if args.experiment == OPTIM_RACE and len(args.models or RACE_MODELS) != 1:
        raise ValueError("sweep optim-race: give one model with --models (rates are per model)")
    if args.experiment != OPTIM_RACE and args.models is not None:
        raise ValueError(f"{args.experiment}: --models belongs to optim-race")
    rows = []
    for point in _sweep_points(args):
        rate, damping = point["lr"], point["damping"]
        name = f"lr={rate:g}" + ("" if damping is None else f",damping={damping:g}")
        folder = out / name
        if args.experiment == OPTIM_RACE:
            lr = {args.optimizer: rate}
            _race(args, folder, lr=lr, optimizers=(args.optimizer,)).run()
        else:
            lr = {"fullbatch": {args.optimizer: rate}, "minibatch": {args.optimizer: rate}}
            extra = {} if damping is None else {damping_field: damping}
            config = _config(args, lr=lr, optimizers=(args.optimizer,), **extra)
            Runner(config, folder, progress=not args.no_progress).run()
        for row in summary(folder):
            rows.append({"lr": rate, "damping": damping, **row})
            shown = "" if row.get("val_loss") is None else f", val loss {row['val_loss']:.4f}"
            print(
                f"{args.optimizer} {name} {row['phase']}: train loss {row['train_loss']:.4f}"
                f"{shown}, {_status(row)}"
            )
    trained = [r for r in rows if not r["diverged"] and math.isfinite(r.get(rank_by, math.nan))]
    best = min(trained, key=lambda r: r[rank_by]) if trained else None
    report = {"rank_by": rank_by, "rows": rows, "best": best}
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    if best:
        setting = f"lr {best['lr']:g}" + (
            "" if best["damping"] is None else f", damping {best['damping']:g}"
        )
        print(f"best {args.optimizer} by final {rank_by} (diverged runs excluded): {setting}")
    else:
        print(f"no {args.optimizer} run of the sweep trained without diverging")
    print(f"wrote {out / 'sweep.json'}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    """Redraw a Monitor's dashboard PNG from its log (``RUN_DIR/monitor.jsonl``)."""
    from curvlab.diagnostics.dashboard import write_dashboard

    try:
        path = write_dashboard(args.run_dir, args.out)
    except FileNotFoundError as error:
        print(f"curvlab dashboard: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlab`` command."""
    parser = argparse.ArgumentParser(
        prog="curvlab",
        description=__doc__.split("\n\n")[0],
        epilog="Run 'curvlab COMMAND --help' for a command's options. See docs/experiments.md.",
    )
    parser.add_argument("--version", action="version", version=f"curvlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rates = default_lr(4)
    lr_default = ", ".join(
        f"{phase}: " + ",".join(f"{k}={v:g}" for k, v in rates[phase].items()) for phase in rates
    )
    run = sub.add_parser(
        "run",
        help="run (or resume) an experiment of the exact-GN paper",
        description="Run an experiment, or resume it where it stopped: the same command again "
        "continues a killed run; more --steps, --epochs, --optimizers or --seeds extend a "
        "finished one.",
    )
    _add_config_arguments(run, (WIDTH_SCALING, OPTIM_RACE))
    _add_width_arguments(run)
    _add_race_arguments(run)
    run.add_argument(
        "--optimizers",
        type=_csv(
            str,
            f"a comma-separated subset of {','.join(_ALL_NAMES)}",
            lambda v: v in _ALL_NAMES,
        ),
        metavar="LIST",
        help=f"optimizers to run, one after the other (default: {','.join(OPTIMIZERS)}; ntk-cka: "
        "gn-right-inverse,gn-pinv,gn-paper,adam,sgd; gn-SCHEME is ExactGN with that scheme; "
        f"optim-race: {','.join(RACE_OPTIMIZERS)})",
    )
    run.add_argument(
        "--lr",
        type=_rates,
        metavar="NAME=X,...",
        help="learning rates of both phases, e.g. gn=2,adam=1e-3 (default: "
        f"{lr_default}; gn scales with --depth as 0.5 and 0.1 times it)",
    )
    run.add_argument(
        "--no-plot", action="store_true", help="do not draw the figures at the end (default: draw)"
    )
    run.set_defaults(func=_cmd_run)

    plot = sub.add_parser(
        "plot",
        help="redraw the figures of a results folder (or records files)",
        description="One source: the PNGs go into its folder (beside a records file, prefixed "
        "by its name). Several sources whose runs are disjoint (the same experiment, dataset and "
        "model) are drawn together into --out.",
    )
    plot.add_argument(
        "folder",
        nargs="+",
        help="a run folder holding results.jsonl, or a NAME.jsonl.gz; several are drawn together; "
        "SOURCE#OPT,OPT draws only those optimizers of it",
    )
    plot.add_argument(
        "--out", default=None, help="folder for the PNGs (needed with several sources)"
    )
    plot.set_defaults(func=_cmd_plot)

    summ = sub.add_parser(
        "summary",
        help="final metrics of a results folder (or records file) as a Markdown table",
        description="Means over seeds, with ± the sample standard deviation when there are "
        "several; validation columns when the run held out a validation split.",
    )
    summ.add_argument(
        "folder",
        nargs="+",
        help="a run folder holding results.jsonl, or a NAME.jsonl.gz; several whose runs are "
        "disjoint are summarized together; SOURCE#OPT,OPT takes only those optimizers of it",
    )
    summ.add_argument(
        "--at-train-loss",
        dest="at_train_loss",
        type=_positive_float,
        metavar="X",
        help="compare every run where its training loss first reaches X (interpolated "
        "between evaluations) instead of at its last evaluation (default: last evaluation)",
    )
    summ.add_argument(
        "--at-step",
        dest="at_step",
        type=_int_type("a number of updates >= 0", lambda v: v >= 0),
        metavar="N",
        help="compare every run at its last evaluation at or before update N, e.g. runs of "
        "different lengths at equal steps; with --loss-change: count only updates up to N "
        "(default: last evaluation, every update)",
    )
    summ.add_argument(
        "--at-test-acc",
        dest="at_test_acc",
        type=_float_type("a test accuracy in [0, 1]", lambda v: 0 <= v <= 1),
        metavar="A",
        help="optim-race: updates and training seconds until the test accuracy first reaches A "
        "(interpolated between evaluations), with the final test accuracy, per model and "
        "optimizer (default: none)",
    )
    summ.add_argument(
        "--per-source",
        dest="per_source",
        action="store_true",
        help="one row per folder or records file, labelled with its learning rate and GN "
        "damping: the table of a sweep's points; A+B is one point whose seeds are in two "
        "sources (default: all sources as one)",
    )
    summ.add_argument(
        "--loss-change",
        dest="loss_change",
        type=_int_type("a positive number of updates", lambda v: v > 0),
        metavar="K",
        help="loss-change runs (Figure 3): each optimizer's mean per-update change (%%) of its "
        "mini-batch loss over updates 0..K-1 and over the rest, mean ± std over the seeds "
        "that did not diverge (default: none)",
    )
    summ.set_defaults(func=_cmd_summary)

    export = sub.add_parser(
        "export",
        help="archive a results folder's records as a small NAME.jsonl.gz",
        description="Write the records that summaries and figures read (header, config, eval, "
        "update, diverged; each once) gzip-compressed, e.g. to commit beside the docs; "
        "'curvlab summary' and 'curvlab plot' read the archive.",
    )
    export.add_argument("folder", help="a run folder holding results.jsonl")
    export.add_argument("out", help="the archive to write, NAME.jsonl.gz")
    export.add_argument(
        "--exclude",
        type=_csv(str, "comma-separated optimizer names"),
        metavar="LIST",
        help="leave these optimizers' runs out (superseded by runs archived elsewhere, so "
        "that archives summarized together stay disjoint) (default: none)",
    )
    export.add_argument(
        "--seeds",
        type=_csv(int, "comma-separated seeds"),
        metavar="LIST",
        help="keep only these seeds' runs, e.g. the finished ones while another trains "
        "(default: every seed)",
    )
    export.set_defaults(func=_cmd_export)

    sweep = sub.add_parser(
        "sweep",
        help="learning-rate (and GN damping) sweep of one optimizer",
        description="One run per grid point in OUT/lr=X[,damping=Y]; the best by the final "
        "validation loss (with --validation N: never the test set) or else the training loss.",
    )
    _add_config_arguments(sweep, (OPTIM_RACE,))
    _add_race_arguments(sweep)
    sweep.add_argument(
        "--optimizer",
        required=True,
        choices=_ALL_NAMES,
        help=f"optim-race takes {', '.join(RACE_OPTIMIZERS)} (required)",
    )
    sweep.add_argument(
        "--lrs",
        required=True,
        type=_csv(float, "comma-separated positive numbers", lambda v: v > 0),
        metavar="LIST",
        help="learning rates, e.g. 1e-4,1e-3,1e-2 (required)",
    )
    sweep.add_argument(
        "--dampings",
        type=_csv(float, "comma-separated numbers >= 0", lambda v: v >= 0),
        metavar="LIST",
        help="ExactGN only: dampings crossed with the rates (the Gram-solve damping, or the "
        "output damping with --ce-hessian exact) (default: the config's)",
    )
    sweep.add_argument(
        "--rank-by",
        dest="rank_by",
        choices=("val_loss", "train_loss"),
        help="final metric that picks the best (default: val_loss with --validation, else "
        "train_loss)",
    )
    sweep.set_defaults(func=_cmd_sweep)

    dash = sub.add_parser(
        "dashboard", help="draw a training monitor's dashboard PNG from RUN_DIR/monitor.jsonl"
    )
    dash.add_argument("run_dir", metavar="RUN_DIR", help="a Monitor's log_dir")
    dash.add_argument("--out", help="the PNG (default: RUN_DIR/dashboard.png)")
    dash.set_defaults(func=_cmd_dashboard)
    return parser


def _data_hint(message: str) -> str:
    """A data loader's message in the CLI's terms (``--data`` for the loaders' ``root``)."""
    for api, cli in (
        ("pass root=<directory with the files>", "pass --data <directory with the files>"),
        ("as root, or set", "as --data, or set"),
        ("no root given", "no --data given"),
    ):
        message = message.replace(api, cli)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` console script.

    Returns:
        0 on success, 2 for bad input (a message names it), 130 when interrupted.
    """
    from curvlab.data.errors import DataFileError, DataNotFoundError
    from curvlab.experiments.plots import NoResultsError
    from curvlab.experiments.store import ConfigMismatchError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataNotFoundError as error:
        print(f"curvlab: error: {_data_hint(str(error))}", file=sys.stderr)
        return 2
    except (DataFileError, ConfigMismatchError, NoResultsError, ValueError) as error:
        print(f"curvlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # a new line first: the cursor is still on the progress bar's line
        print("\ncurvlab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
