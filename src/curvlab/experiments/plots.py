"""PNG figures like the exact Gauss-Newton paper's Figures 1-5, drawn from a results store.

Each curve is the mean over the seeds that reached that point; with more than one seed a band
shows the minimum and maximum. What a reader of each figure can rely on:

* every panel has both axis labels, and one legend below the panels names every optimizer that
  ran, marking those with a diverged seed (``X`` on the curve: its last finite value);
* a loss panel is drawn on a log scale when its values span a decade or more;
* loss and loss-change axes are clipped to a robust range (Tukey's far-out fences,
  :func:`robust_limits`), so that one diverged run cannot flatten the others; values beyond it
  are drawn as triangles on the axis edge and counted in the panel;
* the title names the data, the model and the seeds used (``seed 1``, ``seeds 0, 1, 2``).

``curvlab plot runs/NAME`` redraws them from ``results.jsonl`` alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from curvlab.experiments.store import ResultsStore  # noqa: E402

LABELS = {
    "gn": "Exact GN",
    "gn-right-inverse": "Exact GN (right-inverse)",
    "gn-pinv": "Exact GN (pinv)",
    "gn-paper": "Exact GN (paper)",
    "adam": "Adam",
    "sgd": "SGD",
}
COLORS = {
    "gn": "tab:red",
    "gn-right-inverse": "tab:red",
    "gn-pinv": "tab:purple",
    "gn-paper": "tab:brown",
    "adam": "tab:blue",
    "sgd": "tab:green",
}
#: Line styles other than solid: the paper scheme's curves often lie on the right-inverse ones.
LINESTYLES = {"gn-paper": (0, (4, 3))}
#: Colors for optimizers without an entry in :data:`COLORS`, in order of appearance.
EXTRA_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
FIGURES = {
    "fullbatch": "fig1_fullbatch.png",
    "minibatch": "fig2_minibatch.png",
    "loss-change": "fig3_loss_change.png",
    "ntk-cka": "fig4_ntk_cka.png",
    "no-bottleneck": "fig5_no_bottleneck.png",
}
LOSS_LABELS = {"ce": "cross-entropy loss", "mse": "squared-error loss"}
#: A loss panel is drawn on a log scale when its largest value is at least this times its smallest.
LOG_SCALE_RATIO = 10.0
#: Tukey's far-out fences: the axis shows ``[q25 - k IQR, q75 + k IQR]`` with ``k`` this.
FENCE = 3.0
#: The axis is clipped only if that makes the kept values span at least this many times more of it.
MIN_GAIN = 2.0


class NoResultsError(ValueError):
    """The folder holds no results to plot."""


@dataclass(frozen=True)
class Curve:
    """One optimizer's values in one panel, aggregated over seeds.

    Attributes:
        x: Steps or epochs ``[T]``, increasing.
        mean: Mean over the seeds with a finite value at each ``x`` ``[T]``.
        low: Minimum over those seeds ``[T]``.
        high: Maximum over those seeds ``[T]``.
    """

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True)
class Line:
    """A curve as drawn: the mean over the seeds that did not diverge, or one diverged seed."""

    optimizer: str
    curve: Curve
    diverged_seed: int | None = None


@dataclass(frozen=True)
class PanelSpec:
    """What one panel shows: ``key`` of the ``phase`` records against ``x_key``."""

    phase: str
    key: str
    x_key: str
    title: str
    xlabel: str
    ylabel: str
    kind: str  # "loss" (log scale if it spans decades, robust limits), "accuracy", "change"


def _order(optimizer: str) -> tuple[int, str]:
    return (list(LABELS).index(optimizer) if optimizer in LABELS else len(LABELS), optimizer)


def _colors(optimizers: Iterable[str]) -> dict[str, str]:
    """A color per optimizer, in legend order; unknown ones get :data:`EXTRA_COLORS` in turn."""
    names = sorted(set(optimizers), key=_order)
    extra = iter(EXTRA_COLORS * (1 + len(names) // len(EXTRA_COLORS)))
    return {o: COLORS.get(o) or next(extra) for o in names}


def curves(records: Iterable[dict], phase: str, key: str, x_key: str) -> dict[str, Curve]:
    """Per optimizer, ``key`` of the ``phase`` records against ``x_key``, over seeds.

    Non-finite and missing values are left out, so a seed that diverged ends at its last finite
    value and the curve goes on with the other seeds.
    """
    by_opt: dict[str, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        value = r.get(key)
        if r.get("phase") != phase or value is None or not math.isfinite(value):
            continue
        by_opt[r["optimizer"]][r["seed"]][float(r[x_key])] = float(value)
    out = {}
    for opt, seeds in by_opt.items():
        xs = sorted(set().union(*(set(v) for v in seeds.values())))
        columns = [[s[x] for s in seeds.values() if x in s] for x in xs]
        out[opt] = Curve(
            x=np.array(xs),
            mean=np.array([np.mean(c) for c in columns]),
            low=np.array([min(c) for c in columns]),
            high=np.array([max(c) for c in columns]),
        )
    return out


def robust_limits(values: np.ndarray, log: bool = False) -> tuple[float, float] | None:
    """Axis limits that keep the bulk of ``values`` readable, or ``None`` to autoscale.

    Limits are Tukey's far-out fences ``[q25 - k IQR, q75 + k IQR]`` (``k`` = :data:`FENCE`)
    of the values (of their ``log10`` when ``log``), shrunk to the data range, with a 5 % margin.
    ``None`` when no value lies beyond the fences, or when clipping would not at least double
    (:data:`MIN_GAIN`) the share of the axis the kept values span: a transient spike stays in
    view, a diverged run's values do not.

    Args:
        values: Finite values ``[M]`` (positive when ``log``).
        log: Compute the fences in log space.
    """
    v = np.log10(values) if log else np.asarray(values, dtype=float)
    if v.size < 4:
        return None
    q25, q75 = np.percentile(v, [25, 75])
    spread = q75 - q25
    low, high = max(v.min(), q25 - FENCE * spread), min(v.max(), q75 + FENCE * spread)
    if spread <= 0 or v.max() - v.min() < MIN_GAIN * (high - low):
        return None
    margin = 0.05 * (high - low)
    low, high = low - margin, high + margin
    return (10**low, 10**high) if log else (low, high)


def _draw(ax: Axes, lines: list[Line], spec: PanelSpec, colors: dict[str, str]) -> None:
    """Draw the lines; log scale and robust limits as :data:`LOG_SCALE_RATIO` and :data:`FENCE`."""
    values = np.concatenate([line.curve.mean for line in lines]) if lines else np.array([])
    log = (
        spec.kind == "loss"
        and values.size > 0
        and values.min() > 0
        and values.max() >= LOG_SCALE_RATIO * values.min()
    )
    limits = robust_limits(values, log=log) if spec.kind in ("loss", "change") else None
    stopped = 0  # diverged runs often end at one point: each X is smaller than the one below
    for line in sorted(lines, key=lambda li: (_order(li.optimizer), li.diverged_seed or -1)):
        c, color = line.curve, colors[line.optimizer]
        marker = "o" if len(c.x) < 3 else None
        if line.diverged_seed is None:
            style = LINESTYLES.get(line.optimizer, "-")
            ax.plot(c.x, c.mean, color=color, lw=1.6, ls=style, marker=marker, ms=4)
            if (c.high > c.low).any():
                ax.fill_between(c.x, c.low, c.high, color=color, alpha=0.2, lw=0)
            continue
        ax.plot(c.x, c.mean, color=color, lw=1.0, ls="--", marker=marker, ms=3)
        end = c.mean[-1] if limits is None else min(max(c.mean[-1], limits[0]), limits[1])
        size = max(5.0, 12.0 - 2.5 * stopped)
        ax.plot(c.x[-1], end, marker="X", ms=size, color=color, mec="k", mew=0.6, clip_on=False)
        stopped += 1
    if log:
        ax.set_yscale("log")
    outside = 0 if limits is None else _clip(ax, lines, colors, limits)
    if spec.kind == "change":
        ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(spec.title)
    note = f"\n{outside} value{'s' * (outside != 1)} beyond the axis (\u25b2 \u25bc)"
    ax.set_xlabel(spec.xlabel + (note if outside else ""))
    ax.set_ylabel(spec.ylabel)
    ax.grid(alpha=0.3)


def _clip(ax: Axes, lines: list[Line], colors: dict[str, str], limits: tuple[float, float]) -> int:
    """Set the y limits; values beyond them become triangles on the edge. Returns their count."""
    low, high = limits
    ax.set_ylim(low, high)
    outside = 0
    for line in lines:
        c = line.curve
        for mask, edge, marker in ((c.mean > high, high, "^"), (c.mean < low, low, "v")):
            if mask.any():
                outside += int(mask.sum())
                ax.plot(
                    c.x[mask],
                    np.full(mask.sum(), edge),
                    ls="none",
                    marker=marker,
                    ms=5,
                    color=colors[line.optimizer],
                    clip_on=False,
                )
    return outside


def _legend(fig: Figure, colors: dict, diverged: dict, bands: bool) -> None:
    """One legend below the panels, with every optimizer that ran."""
    handles, labels = [], []
    for opt, color in colors.items():
        seeds = sorted(diverged.get(opt, ()))
        label = LABELS.get(opt, opt)
        if seeds:
            label += f" (diverged, dashed: {seed_text(seeds)})"
        handles.append(
            Line2D(
                [],
                [],
                color=color,
                lw=1.6,
                ls=LINESTYLES.get(opt, "-"),
                marker="X" if seeds else None,
                mec="k",
                mew=0.6,
                ms=8,
            )
        )
        labels.append(label)
    if bands:
        handles.append(Patch(color="0.5", alpha=0.3, lw=0))
        labels.append("min-max over seeds")
    fig.legend(
        handles, labels, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False
    )


def seed_text(seeds: Iterable[int]) -> str:
    """``"seed 1"``, ``"seeds 0, 1, 2"``; runs of four or more become ``"seeds 0-9"``."""
    seeds = sorted(set(seeds))
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        if j - i >= 3:
            parts.append(f"{seeds[i]}-{seeds[j]}")
        else:
            parts.extend(str(s) for s in seeds[i : j + 1])
        i = j + 1
    return f"seed{'s' * (len(seeds) != 1)} {', '.join(parts)}"


def _subtitle(config: dict, seeds: Iterable[int]) -> str:
    c = config
    return (
        f"{c['dataset']}, RevMLP hidden {c['hidden']}, {c['depth']} blocks"
        f"{'' if c['inverted_bottleneck'] else ', no inverted bottleneck'}, loss {c['loss']}"
        f", {seed_text(seeds)}"
    )


def figure(
    records: list[dict],
    config: dict,
    title: str,
    panels: list[PanelSpec],
    diverged: Iterable[dict] = (),
    smooth: bool = False,
) -> Figure:
    """One row of panels with a shared legend and a title naming the run and its seeds.

    Args:
        records: ``eval`` or ``update`` records.
        config: The run's config (the header's ``"config"``).
        title: Figure title, before the run description.
        panels: What each panel shows.
        diverged: ``diverged`` records (``phase``, ``optimizer``, ``seed``).
        smooth: Replace each curve of the panels after the first by its moving average
            (Figure 3).
    """
    phases = {p.phase for p in panels}
    ran = [r for r in records if r.get("phase") in phases]
    failed = {(d["phase"], d["optimizer"], d["seed"]) for d in diverged if d.get("phase") in phases}
    by_optimizer: dict[str, set[int]] = defaultdict(set)
    for _, opt, seed in failed:
        by_optimizer[opt].add(seed)
    colors = _colors([r["optimizer"] for r in ran] + [opt for _, opt, _ in failed])
    seeds = {r["seed"] for r in ran} | {seed for *_, seed in failed}
    width = 5.5 if len(panels) < 3 else 4.0
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels), 4.2), layout="constrained", squeeze=False
    )
    bands = False
    for i, (ax, spec) in enumerate(zip(axes[0], panels)):
        lines = _lines(ran, failed, spec)
        if smooth and i > 0:
            lines = [Line(li.optimizer, moving_average(li.curve), li.diverged_seed) for li in lines]
        bands |= any((li.curve.high > li.curve.low).any() for li in lines)
        _draw(ax, lines, spec, colors)
    _legend(fig, colors, by_optimizer, bands)
    fig.suptitle(f"{title} ({_subtitle(config, seeds or config.get('seeds', ()))})", fontsize=10)
    return fig


def _lines(records: list[dict], failed: set[tuple], spec: PanelSpec) -> list[Line]:
    """The panel's mean over the seeds that did not diverge, and one line per diverged seed."""

    def key(r: dict) -> tuple:
        return (r["phase"], r["optimizer"], r["seed"])

    kept = [r for r in records if key(r) not in failed]
    lines = [Line(opt, c) for opt, c in curves(kept, spec.phase, spec.key, spec.x_key).items()]
    for phase, opt, seed in sorted(failed):
        if phase == spec.phase:
            mine = [r for r in records if key(r) == (phase, opt, seed)]
            for c in curves(mine, spec.phase, spec.key, spec.x_key).values():
                lines.append(Line(opt, c, seed))
    return lines


def moving_average(curve: Curve, points: int = 25) -> Curve:
    """The mean curve averaged over windows of ``len(x) // points`` values (no band)."""
    width = max(1, len(curve.x) // points)
    mean = np.convolve(curve.mean, np.ones(width) / width, mode="valid")
    return Curve(curve.x[width - 1 :], mean, mean, mean)


def _loss_label(config: dict) -> str:
    return LOSS_LABELS.get(config.get("loss"), "loss")


def fullbatch_figure(records, config, diverged=(), title="Figure 1: full batch") -> Figure:
    """Figure 1: full-batch train loss and accuracy (and test, for reference) per update."""
    loss, x = _loss_label(config), "update (= epoch)"
    panels = [
        PanelSpec("fullbatch", "train_loss", "step", "train loss", x, loss, "loss"),
        PanelSpec("fullbatch", "train_acc", "step", "train accuracy", x, "accuracy", "accuracy"),
        PanelSpec("fullbatch", "test_loss", "step", "test loss", x, loss, "loss"),
        PanelSpec("fullbatch", "test_acc", "step", "test accuracy", x, "accuracy", "accuracy"),
    ]
    return figure(records, config, title, panels, diverged)


def minibatch_figure(records, config, diverged=(), title="Figure 2: mini-batch") -> Figure:
    """Figure 2: mini-batch train loss, test loss and test accuracy per epoch."""
    loss = _loss_label(config)
    panels = [
        PanelSpec("minibatch", "train_loss", "epoch", "train loss", "epoch", loss, "loss"),
        PanelSpec("minibatch", "test_loss", "epoch", "test loss", "epoch", loss, "loss"),
        PanelSpec(
            "minibatch", "test_acc", "epoch", "test accuracy", "epoch", "accuracy", "accuracy"
        ),
    ]
    return figure(records, config, title, panels, diverged)


def loss_change_figure(updates, config, diverged=()) -> Figure:
    """Figure 3: per-update % change of the mini-batch loss (raw, and a moving average)."""
    ylabel = "change of the batch loss (%)"
    panels = [
        PanelSpec(
            "minibatch",
            "loss_change_pct",
            "step",
            "% change of the mini-batch loss per update",
            "update",
            ylabel,
            "change",
        ),
        PanelSpec(
            "minibatch", "loss_change_pct", "step", "moving average", "update", ylabel, "change"
        ),
    ]
    return figure(
        updates, config, "Figure 3: loss change per update", panels, diverged, smooth=True
    )


def ntk_cka_figure(records, config, diverged=()) -> Figure:
    """Figure 4: NTK similarity to init, its rate of change, and the blocks' CKA to init per update.

    The records' phase is the first of ``config["phases"]`` that has NTK fields.
    """
    phases = list(config.get("phases", ("fullbatch",)))
    with_kernel = {r.get("phase") for r in records if r.get("ntk_similarity") is not None}
    phase = next((p for p in phases if p in with_kernel), phases[0])
    x = "update"
    probe = (
        f"similarity ({config.get('ntk_mode', 'full')} NTK, {config.get('ntk_probe', 64)} images)"
    )
    panels = [
        PanelSpec(
            phase, "ntk_similarity", "step", "NTK similarity to init", x, probe, "similarity"
        ),
        PanelSpec(
            phase, "ntk_rate", "step", "NTK rate of change", x, "relative change / update", "loss"
        ),
    ]
    for role in ("first", "middle", "last"):
        panels.append(
            PanelSpec(
                phase,
                f"cka_{role}",
                "step",
                f"CKA to init: {role} block",
                x,
                "linear CKA",
                "similarity",
            )
        )
    return figure(records, config, "Figure 4: NTK and CKA", panels, diverged)


def no_bottleneck_figure(records, config, diverged=()) -> Figure:
    """Figure 5: both phases without the inverted bottleneck."""
    loss = _loss_label(config)
    panels = [
        PanelSpec(
            "fullbatch", "train_loss", "step", "full batch: train loss", "update", loss, "loss"
        ),
        PanelSpec(
            "minibatch", "train_loss", "epoch", "mini-batch: train loss", "epoch", loss, "loss"
        ),
        PanelSpec(
            "minibatch", "test_loss", "epoch", "mini-batch: test loss", "epoch", loss, "loss"
        ),
        PanelSpec(
            "minibatch",
            "test_acc",
            "epoch",
            "mini-batch: test accuracy",
            "epoch",
            "accuracy",
            "accuracy",
        ),
    ]
    return figure(records, config, "Figure 5: no inverted bottleneck", panels, diverged)


#: Config fields that the figures' titles state: sources plotted together must agree on them.
SHARED_FIELDS = ("experiment", "dataset", "hidden", "depth", "inverted_bottleneck", "loss")


def run_figures(folder: str | Path | Sequence[str | Path]) -> dict[str, Figure]:
    """Every figure the run's results support, keyed by file name (see :data:`FIGURES`).

    ``folder`` is a results folder or records file, or several of them whose runs are disjoint
    (e.g. a sweep's chosen point holding one seed and a folder holding the others); several must
    agree on :data:`SHARED_FIELDS` of their configs.

    Raises:
        NoResultsError: no ``results.jsonl`` or no evaluation in it, or several sources that
            record the same run or disagree on a shared field.
    """
    store = _Union(folder)
    records = store.evaluations()
    config = store.config()
    diverged = store.diverged()
    phases = {r["phase"] for r in records}
    if config["experiment"] == "no-bottleneck":
        return {FIGURES["no-bottleneck"]: no_bottleneck_figure(records, config, diverged)}
    out = {}
    if config["experiment"] == "ntk-cka":
        out[FIGURES["ntk-cka"]] = ntk_cka_figure(records, config, diverged)
    if "fullbatch" in phases:
        out[FIGURES["fullbatch"]] = fullbatch_figure(records, config, diverged)
    if "minibatch" in phases:
        out[FIGURES["minibatch"]] = minibatch_figure(records, config, diverged)
    updates = store.updates()
    if updates:
        out[FIGURES["loss-change"]] = loss_change_figure(updates, config, diverged)
    return out


def plot_run(
    folder: str | Path | Sequence[str | Path], out: str | Path | None = None
) -> list[Path]:
    """Draw every figure the results support as PNGs; returns their paths.

    With one source and no ``out``, the PNGs go into the run folder; for an archived records file
    (``DIR/NAME.jsonl.gz``) beside it, named ``NAME-FIGURE.png``, so that several archives in one
    folder keep their own figures. Several sources (see :func:`run_figures`) need ``out``, the
    folder to write ``FIGURE.png`` into.

    Raises:
        NoResultsError: no ``results.jsonl`` or no evaluation in it (see :func:`run_figures`).
        ValueError: several sources and no ``out``.
    """
    sources = [folder] if isinstance(folder, (str, Path)) else list(folder)
    if out is None and len(sources) != 1:
        raise ValueError(f"plotting {len(sources)} sources together needs an output folder (out)")
    if out is None:
        store = ResultsStore(split_source(sources[0])[0])
        prefix = store.path.name.removesuffix(".jsonl.gz") + "-" if store.read_only else ""
        target = store.folder
    else:
        prefix, target = "", Path(out)
        target.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in run_figures(sources).items():
        path = target / f"{prefix}{name}"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of string cells: the head, the rule, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


#: Metrics of a summary row: the mean over seeds, and ``NAME_std`` their standard deviation.
SUMMARY_METRICS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "time_s",
    # ntk-cka only (Figure 4): the kernel's similarity to and change from init, the blocks' CKA.
    "ntk_similarity",
    "ntk_change",
    "cka_first",
    "cka_middle",
    "cka_last",
)


#: Ends a source's path and begins the optimizers it contributes: ``PATH#adam,gn-paper``.
SELECT = "#"
#: Joins the parts of one ``--per-source`` row: ``A+B``, one sweep point archived in two files.
JOIN = "+"


def split_source(source: str | Path) -> tuple[Path, frozenset[str] | None]:
    """A source's path, and the optimizers it is narrowed to (``None``: all it records).

    ``docs/records/run.jsonl.gz#gn-right-inverse,adam`` contributes only those two optimizers'
    runs, so a records file holding one superseded run (e.g. SGD at a rate that diverged, rerun
    at another rate in a file of its own) can be summarized and drawn beside the rerun.

    Raises:
        NoResultsError: ``SELECT`` is followed by no optimizer name.
    """
    text = str(source)
    if SELECT not in text:
        return Path(source), None
    path, _, names = text.rpartition(SELECT)
    chosen = frozenset(name.strip() for name in names.split(",") if name.strip())
    if not chosen:
        raise NoResultsError(f"{source}: no optimizer named after '{SELECT}'")
    return Path(path), chosen


class _Union:
    """The records of one or several stores, as one.

    Several sources must not record the same (phase, optimizer, seed): each run has one home. A
    source may be narrowed to some of its optimizers (:func:`split_source`).
    """

    def __init__(self, sources: str | Path | Sequence[str | Path]) -> None:
        if isinstance(sources, (str, Path)):
            sources = [sources]
        if not sources:
            raise NoResultsError("no results: no folder or records file given")
        self._evaluations: list[dict] = []
        self._updates: list[dict] = []
        self._diverged: list[dict] = []
        self._configs: list[tuple[str, dict]] = []
        owner: dict[tuple, str] = {}
        for source in sources:
            path, chosen = split_source(source)
            store = ResultsStore(path)
            if not store.path.exists():
                where = store.folder if not store.folder.is_dir() else store.path
                raise NoResultsError(f"no results in {source}: {where} does not exist")
            evaluations = store.evaluations()
            if store.header() is None or not evaluations:
                raise NoResultsError(f"no results in {source}: {store.path} holds no evaluation")
            updates, diverged = store.updates(), store.diverged()
            if chosen is not None:
                recorded = {r["optimizer"] for r in evaluations}
                if not chosen <= recorded:
                    raise NoResultsError(
                        f"{source}: {store.path} records no {', '.join(sorted(chosen - recorded))}"
                        f" (it records {', '.join(sorted(recorded))})"
                    )
                evaluations, updates, diverged = (
                    [r for r in records if r["optimizer"] in chosen]
                    for records in (evaluations, updates, diverged)
                )
            for run in {(r["phase"], r["optimizer"], r["seed"]) for r in evaluations}:
                if run in owner:
                    raise NoResultsError(
                        f"{source} and {owner[run]} both record {run[0]} {run[1]} seed {run[2]}; "
                        "summarize them separately"
                    )
                owner[run] = str(source)
            self._evaluations += evaluations
            self._updates += updates
            self._diverged += diverged
            self._configs.append((str(source), store.config()))

    def evaluations(self) -> list[dict]:
        return self._evaluations

    def updates(self) -> list[dict]:
        return self._updates

    def diverged(self) -> list[dict]:
        return self._diverged

    def config(self) -> dict:
        """The first source's config (its latest), once every source agrees on it.

        Agreeing means equal :data:`SHARED_FIELDS`, the fields that the figures state.

        Raises:
            NoResultsError: two sources differ on such a field.
        """
        first, config = self._configs[0]
        for source, other in self._configs[1:]:
            for key in SHARED_FIELDS:
                if other.get(key) != config.get(key):
                    raise NoResultsError(
                        f"{source} has {key}={other.get(key)!r} but {first} has "
                        f"{config.get(key)!r}; plot them separately"
                    )
        return config


def _spread(rows: list[dict], into: dict) -> None:
    """Put the mean and the standard deviation over ``rows`` of every metric they all hold."""
    for key in SUMMARY_METRICS:
        values = [r[key] for r in rows if r.get(key) is not None]
        if len(values) == len(rows):
            into[key] = float(np.mean(values))
            into[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summary(folder: str | Path | Sequence[str | Path], at_step: int | None = None) -> list[dict]:
    """Last evaluation of every (phase, optimizer), mean and spread over seeds, for tables.

    Every row holds ``phase``, ``optimizer``, ``seeds`` (how many), ``step``, the mean of every
    metric of :data:`SUMMARY_METRICS` the evaluations hold (``val_*`` only with a validation
    split) and ``NAME_std``, its sample standard deviation over seeds (0 for one seed), and
    ``diverged``: ``{seed: step}`` of the seeds whose run diverged (stopped after ``step``
    updates; empty when none did). A diverged seed's metrics are its last evaluation before it
    stopped.

    Args:
        folder: A run folder, or an archived records file (``NAME.jsonl.gz``), or several of
            either whose runs are disjoint (e.g. a sweep's chosen run of the tuning seed and the
            other seeds' runs).
        at_step: Take every run's last evaluation at or before this update instead (runs of
            different lengths compared at equal steps, e.g. a costly scheme run for fewer
            epochs); ``diverged`` then lists only the seeds that stopped by then.

    Raises:
        ValueError: ``at_step`` is negative.
        NoResultsError: the folder or its ``results.jsonl`` does not exist, or holds no evaluation
            (at or before ``at_step``).
    """
    if at_step is not None and at_step < 0:
        raise ValueError(f"at_step must be a number of updates >= 0, got {at_step!r}")
    store = _Union(folder)
    records = [r for r in store.evaluations() if at_step is None or r["step"] <= at_step]
    if not records:
        raise NoResultsError(f"no evaluation at or before update {at_step}")
    diverged = {
        (r["phase"], r["optimizer"], r["seed"]): r["step"]
        for r in store.diverged()
        if at_step is None or r["step"] <= at_step
    }
    last: dict[tuple, dict] = {}
    for r in records:
        key = (r["phase"], r["optimizer"], r["seed"])
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for (phase, opt, _), r in last.items():
        grouped[(phase, opt)].append(r)
    rows = []
    for (phase, opt), rs in sorted(grouped.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        row = {"phase": phase, "optimizer": opt, "seeds": len(rs), "step": rs[0]["step"]}
        _spread(rs, row)
        row["diverged"] = {
            r["seed"]: diverged[(phase, opt, r["seed"])]
            for r in rs
            if (phase, opt, r["seed"]) in diverged
        }
        rows.append(row)
    return rows


def _crossing(evaluations: list[dict], target: float) -> dict | None:
    r"""The metrics where a run's training loss first falls to ``target``, or ``None``.

    Between the last evaluation above the target and the first at or below it, every metric is
    interpolated linearly in :math:`\log` (training loss), with weight
    :math:`w = (\log \ell_a - \log t) / (\log \ell_a - \log \ell_b)`; a run that starts at or
    below the target reports its first evaluation.
    """
    previous = None
    for r in sorted(evaluations, key=lambda r: r["step"]):
        loss = r["train_loss"]
        if loss is not None and math.isfinite(loss) and loss <= target:
            if previous is None or previous["train_loss"] <= 0 or loss <= 0:
                return dict(r)
            a, b = math.log(previous["train_loss"]), math.log(loss)
            w = (a - math.log(target)) / (a - b) if a != b else 1.0
            out = dict(r)
            for key in ("step", *SUMMARY_METRICS):
                if previous.get(key) is not None and r.get(key) is not None:
                    out[key] = (1 - w) * previous[key] + w * r[key]
            out["train_loss"] = target
            return out
        previous = r if loss is not None and math.isfinite(loss) else previous
    return None


def summary_at_train_loss(folder: str | Path | Sequence[str | Path], target: float) -> list[dict]:
    """Every (phase, optimizer) compared where its training loss first reaches ``target``.

    The paper's claim is about generalization, so comparing test losses at equal steps mixes
    in how fast each optimizer trains; at equal training loss it does not. For every seed the
    crossing is interpolated between evaluations (see :func:`_crossing`); a row holds the mean
    and spread over the seeds that reach the target (``step`` is then the mean interpolated
    update), ``seeds`` how many did, and ``missed``, the seeds that never did (diverged or not
    trained far enough).

    Args:
        folder: A run folder, an archived records file, or several (see :func:`summary`).
        target: Training loss to compare at, > 0.

    Raises:
        ValueError: ``target`` is not > 0.
        NoResultsError: no evaluations.
    """
    if not target > 0:
        raise ValueError(f"target training loss must be > 0, got {target!r}")
    store = _Union(folder)
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in store.evaluations():
        runs[(r["phase"], r["optimizer"], r["seed"])].append(r)
    grouped: dict[tuple, list[tuple[int, dict | None]]] = defaultdict(list)
    for (phase, opt, seed), rs in runs.items():
        grouped[(phase, opt)].append((seed, _crossing(rs, target)))
    rows = []
    for (phase, opt), found in sorted(grouped.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        reached = [c for _, c in found if c is not None]
        row = {
            "phase": phase,
            "optimizer": opt,
            "train_loss": target,
            "seeds": len(reached),
            "missed": sorted(seed for seed, c in found if c is None),
        }
        if reached:
            row["step"] = float(np.mean([c["step"] for c in reached]))
            _spread(reached, row)
            row["train_loss"] = target
        rows.append(row)
    return rows


def summary_loss_change(
    folder: str | Path | Sequence[str | Path], first: int, last: int | None = None
) -> list[dict]:
    r"""Figure 3's numbers: each run's mean per-update change of the batch loss, early and late.

    Every ``update`` record holds :math:`100\,(\ell_b(\theta_{t+1}) - \ell_b(\theta_t)) /
    \ell_b(\theta_t)`, the change of update :math:`t`'s own mini-batch loss. For every seed
    this takes the mean over updates :math:`t <` ``first`` (``early``) and over the others
    (``late``); a row holds, per (phase, optimizer), the mean and sample standard deviation of
    both over seeds, ``seeds`` and ``updates`` (the mean number of updates per seed). A seed
    whose run diverged is left out of the means (its last updates' changes are the blow-up, not
    the optimizer's progress) and listed in ``diverged`` (``{seed: step}``).

    Args:
        folder: A run folder, an archived records file, or several (see :func:`summary`).
        first: How many updates count as early, > 0.
        last: Count only updates up to this one (runs of different lengths compared over the
            same updates); a seed that diverged after it is counted, not listed.

    Raises:
        ValueError: ``first`` is not > 0, or ``last`` is below ``first``.
        NoResultsError: no evaluations, or no update records (not a ``loss-change`` run).
    """
    if not first > 0:
        raise ValueError(f"first must be a positive number of updates, got {first!r}")
    if last is not None and last < first:
        raise ValueError(f"last ({last}) must be at least first ({first})")
    store = _Union(folder)
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in store.updates():
        if last is not None and r["step"] > last:
            continue
        if r.get("loss_change_pct") is not None and math.isfinite(r["loss_change_pct"]):
            runs[(r["phase"], r["optimizer"], r["seed"])].append(r)
    if not runs:
        raise NoResultsError("no update records with loss_change_pct: not a loss-change run")
    diverged = {
        (r["phase"], r["optimizer"], r["seed"]): r["step"]
        for r in store.diverged()
        if last is None or r["step"] <= last
    }
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for (phase, opt, seed), rs in runs.items():
        early = [r["loss_change_pct"] for r in rs if r["step"] < first]
        late = [r["loss_change_pct"] for r in rs if r["step"] >= first]
        grouped[(phase, opt)].append(
            {
                "seed": seed,
                "diverged": diverged.get((phase, opt, seed)),
                "early": float(np.mean(early)) if early else None,
                "late": float(np.mean(late)) if late else None,
                "updates": len(rs),
            }
        )
    rows = []
    for (phase, opt), runs_of in sorted(
        grouped.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))
    ):
        found = [f for f in runs_of if f["diverged"] is None]
        row = {"phase": phase, "optimizer": opt, "seeds": len(found), "first": first}
        row["diverged"] = {
            f["seed"]: f["diverged"]
            for f in sorted(runs_of, key=lambda f: f["seed"])
            if f["diverged"] is not None
        }
        row["updates"] = float(np.mean([f["updates"] for f in found])) if found else None
        for key in ("early", "late"):
            values = [f[key] for f in found if f[key] is not None]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows
