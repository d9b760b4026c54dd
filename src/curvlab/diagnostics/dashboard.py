"""The dashboard: a PNG of a monitor log in the spirit of Cockpit's view.

Three columns of panels over the training steps, as Cockpit arranges its instruments: the
**step** (alpha, distance and update size, CABS and the early-stopping criterion), the
**gradients** (gradient norm and mean GSNR, the three gradient tests, the latest 1d and 2d
gradient histograms) and the **curvature** (the Hessian's largest eigenvalue, its trace, TIC),
with the loss along the bottom. A panel whose instruments were not tracked says so.

:func:`dashboard_figure` builds the :class:`matplotlib.figure.Figure` from the records of
:func:`curvlab.diagnostics.read_log` (no pyplot state: safe inside training);
:func:`write_dashboard` saves it; ``curvlab dashboard RUN_DIR`` and the monitor's
``dashboard_every=`` call :func:`write_dashboard` on ``log_dir/monitor.jsonl``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

DASHBOARD_NAME = "dashboard.png"
"""The dashboard's file name in ``log_dir``."""

PANELS: dict[str, tuple[str, ...]] = {
    "Alpha": ("alpha",),
    "Distance and update size": ("distance", "update_size"),
    "CABS and early stopping": ("cabs", "early_stopping"),
    "Gradient norm and mean GSNR": ("grad_norm", "mean_gsnr"),
    "Gradient tests": ("norm_test", "inner_product_test", "orthogonality_test"),
    "Gradient elements (1d histogram)": ("gradient_histogram_1d",),
    "Hessian max eigenvalue": ("hessian_max_eig",),
    "Hessian trace": ("hessian_trace",),
    "TIC": ("tic_diag", "tic_trace"),
    "Gradient elements vs parameters (2d histogram)": ("gradient_histogram_2d",),
    "Loss": ("loss",),
}
"""Every panel's title and the instruments it shows."""

COLUMNS = ("Step", "Gradients", "Curvature")
"""The column headings (Cockpit's step, gradient and curvature instruments)."""

# (row, column) of each panel on a 4 x 3 grid; the loss spans the bottom row's first two.
_PLACES: dict[str, tuple[int, Any]] = {
    "Alpha": (0, 0),
    "Distance and update size": (1, 0),
    "CABS and early stopping": (2, 0),
    "Gradient norm and mean GSNR": (0, 1),
    "Gradient tests": (1, 1),
    "Gradient elements (1d histogram)": (2, 1),
    "Hessian max eigenvalue": (0, 2),
    "Hessian trace": (1, 2),
    "TIC": (2, 2),
    "Loss": (3, slice(0, 2)),
    "Gradient elements vs parameters (2d histogram)": (3, 2),
}


def _series(records: Sequence[dict], name: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(name)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _latest(records: Sequence[dict], name: str) -> tuple[int, dict] | None:
    for record in reversed(records):
        if isinstance(record.get(name), dict):
            return record["step"], record[name]
    return None


def _not_tracked(ax: Axes) -> None:
    ax.text(0.5, 0.5, "not tracked", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(ax: Axes, records: Sequence[dict], names: Sequence[str], ylabel: str) -> None:
    drawn = False
    for name in names:
        steps, values = _series(records, name)
        if steps:
            style = "o" if name == "alpha" else ("o-" if len(steps) <= 30 else "-")
            ax.plot(steps, values, style, markersize=3, label=name)
            drawn = True
    if not drawn:
        _not_tracked(ax)
        return
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if len(names) > 1:
        ax.legend(fontsize="small")


def _hist_1d(ax: Axes, records: Sequence[dict]) -> None:
    latest = _latest(records, "gradient_histogram_1d")
    if latest is None:
        _not_tracked(ax)
        return
    step, value = latest
    edges = value["edges"]
    ax.stairs(value["counts"], edges, fill=True)
    ax.set_yscale("log")
    ax.set_xlabel(f"per-sample gradient element (step {step})")
    ax.set_ylabel("count")


def _hist_2d(ax: Axes, records: Sequence[dict]) -> None:
    latest = _latest(records, "gradient_histogram_2d")
    if latest is None:
        _not_tracked(ax)
        return
    step, value = latest
    counts = [[math.log10(1 + c) for c in row] for row in value["counts"]]
    g, p = value["grad_edges"], value["param_edges"]
    transposed = [list(col) for col in zip(*counts, strict=True)]  # parameters on the y axis
    ax.pcolormesh(g, p, transposed, cmap="viridis")
    ax.set_xlabel(f"per-sample gradient element (step {step})")
    ax.set_ylabel("parameter value")


def dashboard_figure(records: Sequence[dict], title: str | None = None) -> Figure:
    """The dashboard of a monitor log's records (see the module doc).

    Args:
        records: The records, as :func:`curvlab.diagnostics.read_log` returns them.
        title: The figure's title (default: the last step's number).

    Returns:
        The figure; its axes carry the titles of :data:`PANELS`.
    """
    fig = Figure(figsize=(15, 13), layout="constrained")
    grid = fig.add_gridspec(4, 3)
    last = records[-1]["step"] if records else None
    fig.suptitle(title or f"curvlab dashboard (step {last})")
    for panel, (row, col) in _PLACES.items():
        ax = fig.add_subplot(grid[row, col])
        ax.set_title(panel, fontsize="medium")
        names = PANELS[panel]
        if panel.startswith("Gradient elements ("):
            _hist_1d(ax, records)
        elif panel.startswith("Gradient elements vs"):
            _hist_2d(ax, records)
        else:
            ylabel = "value" if len(names) > 1 else names[0]
            _lines(ax, records, names, ylabel)
            if panel == "Alpha" and ax.get_lines():
                ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)  # the minimum
            if panel in ("Distance and update size", "Gradient tests", "Loss"):
                if ax.get_lines() and all(
                    v > 0 for line in ax.get_lines() for v in line.get_ydata()
                ):
                    ax.set_yscale("log")
        if row == 0:
            ax.set_title(f"{COLUMNS[col]}\n{panel}", fontsize="medium")
    return fig


def write_dashboard(
    records_or_dir: Sequence[dict] | str | os.PathLike, path: str | os.PathLike | None = None
) -> Path:
    """Draw the dashboard and save it as a PNG.

    Args:
        records_or_dir: The records, or a ``log_dir`` (its ``monitor.jsonl`` is read).
        path: The PNG (default: ``log_dir/dashboard.png``; required with records).

    Returns:
        The PNG's path.

    Raises:
        ValueError: For records without ``path``.
        FileNotFoundError: For a folder without ``monitor.jsonl``.
    """
    from curvlab.diagnostics.monitor import LOG_NAME, read_log

    if isinstance(records_or_dir, str | os.PathLike):
        folder = Path(records_or_dir)
        if not (folder / LOG_NAME).exists():
            raise FileNotFoundError(f"{folder} has no {LOG_NAME} (a Monitor's log_dir?)")
        records = read_log(folder)
        path = folder / DASHBOARD_NAME if path is None else path
    else:
        records = list(records_or_dir)
        if path is None:
            raise ValueError("write_dashboard(records, path): path is required with records")
    path = Path(path)
    fig = dashboard_figure(records)
    temporary = path.with_name(path.name + ".tmp.png")
    fig.savefig(temporary, dpi=80)
    os.replace(temporary, path)  # a reader never sees half a PNG
    return path
