"""PNG figures like the exact Gauss-Newton paper's Figures 1, 2, 3 and 5, drawn from a results store.

Each curve is the mean over seeds; with more than one seed a band shows the minimum and maximum.
``curvlab plot runs/NAME`` redraws them from ``results.jsonl`` alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from curvlab.experiments.store import ResultsStore  # noqa: E402

LABELS = {"gn": "Exact GN", "adam": "Adam", "sgd": "SGD"}
COLORS = {"gn": "tab:red", "adam": "tab:blue", "sgd": "tab:green"}
FIGURES = {
    "fullbatch": "fig1_fullbatch.png",
    "minibatch": "fig2_minibatch.png",
    "loss-change": "fig3_loss_change.png",
    "no-bottleneck": "fig5_no_bottleneck.png",
}


class NoResultsError(ValueError):
    """The folder holds no results to plot."""


def _curves(records: list[dict], phase: str, key: str, x_key: str) -> dict[str, tuple]:
    """Per optimizer: x, mean, min, max of ``key`` over seeds (only x values every seed has)."""
    by_opt: dict[str, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("phase") == phase and r.get(key) is not None:
            by_opt[r["optimizer"]][r["seed"]][r[x_key]] = r[key]
    out = {}
    for opt, seeds in by_opt.items():
        xs = sorted(set.intersection(*(set(v) for v in seeds.values())))
        if not xs:
            continue
        values = np.array([[seeds[s][x] for x in xs] for s in seeds], dtype=float)
        out[opt] = (np.array(xs), values.mean(0), values.min(0), values.max(0))
    return out


def _panel(ax, curves: dict[str, tuple], title: str, xlabel: str, log: bool = False) -> None:
    for opt in sorted(curves, key=lambda o: list(LABELS).index(o) if o in LABELS else 99):
        x, mean, low, high = curves[opt]
        color = COLORS.get(opt)
        ax.plot(x, mean, label=LABELS.get(opt, opt), color=color, lw=1.6)
        if (high > low).any():
            ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if log and any((c[1] > 0).all() for c in curves.values()):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _legend(axes) -> None:
    """One legend, in the first panel, with every optimizer that appears anywhere."""
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        np.ravel(axes)[0].legend(handles, labels, fontsize=8)


def _subtitle(header: dict) -> str:
    c = header["config"]
    return (
        f"{c['dataset']}, RevMLP hidden {c['hidden']}, {c['depth']} blocks"
        f"{'' if c['inverted_bottleneck'] else ', no inverted bottleneck'}, loss {c['loss']}"
        f", seeds {len(c['seeds'])}"
    )


def _finish(fig, header: dict, title: str, path: Path) -> Path:
    _legend(fig.axes)
    fig.suptitle(f"{title} ({_subtitle(header)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fullbatch(records: list[dict], header: dict, path: Path, title: str) -> Path:
    """Figure 1: full-batch train loss and accuracy (and test, for reference) per step."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, key, name, log in zip(
        axes,
        ("train_loss", "train_acc", "test_loss", "test_acc"),
        ("train loss", "train accuracy", "test loss", "test accuracy"),
        (True, False, True, False),
    ):
        _panel(ax, _curves(records, "fullbatch", key, "step"), name, "update (= epoch)", log)
    return _finish(fig, header, title, path)


def plot_minibatch(records: list[dict], header: dict, path: Path, title: str) -> Path:
    """Figure 2: mini-batch train loss, test loss and test accuracy per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, name, log in zip(
        axes,
        ("train_loss", "test_loss", "test_acc"),
        ("train loss", "test loss", "test accuracy"),
        (True, True, False),
    ):
        _panel(ax, _curves(records, "minibatch", key, "epoch"), name, "epoch", log)
    return _finish(fig, header, title, path)


def plot_loss_change(updates: list[dict], header: dict, path: Path) -> Path:
    """Figure 3: per-update % change of the mini-batch loss (raw and a moving average)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    curves = _curves(updates, "minibatch", "loss_change_pct", "step")
    _panel(axes[0], curves, "% change of the mini-batch loss per update", "update")
    smooth = {}
    for opt, (x, mean, _, _) in curves.items():
        width = max(1, len(x) // 25)
        kernel = np.ones(width) / width
        m = np.convolve(mean, kernel, mode="valid")
        smooth[opt] = (x[width - 1 :], m, m, m)
    _panel(axes[1], smooth, "moving average", "update")
    for ax in axes:
        ax.axhline(0.0, color="k", lw=0.6)
    return _finish(fig, header, "Figure 3: loss change per update", path)


def plot_no_bottleneck(records: list[dict], header: dict, path: Path) -> Path:
    """Figure 5: both phases without the inverted bottleneck."""
    panels = (
        ("fullbatch", "train_loss", "step", "full batch: train loss", "update", True),
        ("minibatch", "train_loss", "epoch", "mini-batch: train loss", "epoch", True),
        ("minibatch", "test_loss", "epoch", "mini-batch: test loss", "epoch", True),
        ("minibatch", "test_acc", "epoch", "mini-batch: test accuracy", "epoch", False),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (phase, key, x_key, name, xlabel, log) in zip(axes, panels):
        _panel(ax, _curves(records, phase, key, x_key), name, xlabel, log)
    return _finish(fig, header, "Figure 5: no inverted bottleneck", path)


def plot_run(folder: str | Path) -> list[Path]:
    """Draw every figure the run's results support; returns the PNG paths.

    Raises:
        NoResultsError: no ``results.jsonl`` or no evaluation in it.
    """
    store = ResultsStore(folder)
    header = store.header()
    records = store.evaluations()
    if header is None or not records:
        raise NoResultsError(f"no results to plot in {store.path}")
    header = {**header, "config": store.config()}  # the latest, if the run was extended
    folder = Path(folder)
    experiment = header["config"]["experiment"]
    phases = {r["phase"] for r in records}
    paths = []
    if experiment == "no-bottleneck":
        paths.append(plot_no_bottleneck(records, header, folder / FIGURES["no-bottleneck"]))
        return paths
    if "fullbatch" in phases:
        title = "Figure 1: full batch"
        paths.append(plot_fullbatch(records, header, folder / FIGURES["fullbatch"], title))
    if "minibatch" in phases:
        title = "Figure 2: mini-batch"
        paths.append(plot_minibatch(records, header, folder / FIGURES["minibatch"], title))
    updates = store.updates()
    if updates:
        paths.append(plot_loss_change(updates, header, folder / FIGURES["loss-change"]))
    return paths


def summary(folder: str | Path) -> list[dict]:
    """Last evaluation of every (phase, optimizer), averaged over seeds, for tables."""
    records = ResultsStore(folder).evaluations()
    last: dict[tuple, dict] = {}
    for r in records:
        key = (r["phase"], r["optimizer"], r["seed"])
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for (phase, opt, _), r in last.items():
        grouped[(phase, opt)].append(r)
    rows = []
    for (phase, opt), rs in sorted(grouped.items()):
        row = {"phase": phase, "optimizer": opt, "seeds": len(rs), "step": rs[0]["step"]}
        for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "time_s"):
            row[key] = float(np.mean([r[key] for r in rs]))
        rows.append(row)
    return rows
