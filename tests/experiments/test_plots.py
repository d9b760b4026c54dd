"""What a reader sees in the figures, checked on the matplotlib objects of small synthetic runs."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from curvlab.experiments import ResultsStore, plots
from curvlab.experiments.plots import (
    FIGURES,
    fullbatch_figure,
    loss_change_figure,
    minibatch_figure,
    no_bottleneck_figure,
    robust_limits,
    run_figures,
    seed_text,
)

CONFIG = {
    "experiment": "fullbatch",
    "dataset": "bundled",
    "hidden": 64,
    "depth": 2,
    "inverted_bottleneck": True,
    "loss": "ce",
    "seeds": [0],
}
RATES = {"gn": 0.5, "adam": 0.2, "sgd": 0.05}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def evals(phase="fullbatch", seeds=(0,), steps=12, blow_up=None, rates=RATES):
    """Eval records whose losses fall like ``2.3 exp(-rate step)``; ``blow_up`` = (opt, seed, at):
    that run's loss grows 1000-fold per step and it stops after update ``at``."""
    records, diverged = [], []
    for opt, rate in rates.items():
        for seed in seeds:
            for step in range(steps + 1):
                loss = 2.3 * math.exp(-rate * step) * (1 + 0.01 * seed)
                if blow_up is not None and (opt, seed) == blow_up[:2]:
                    if step > blow_up[2]:
                        diverged.append(_diverged(phase, opt, seed, step))
                        break
                    loss = 2.3 * 1000.0**step
                records.append(
                    {
                        "type": "eval",
                        "phase": phase,
                        "optimizer": opt,
                        "seed": seed,
                        "step": step,
                        "epoch": step / 4,
                        "train_loss": loss,
                        "test_loss": loss + 0.2,
                        "train_acc": min(1.0, 1 / (1 + loss)),
                        "test_acc": min(1.0, 0.9 / (1 + loss)),
                        "time_s": 0.1 * step,
                    }
                )
    return records, diverged


def updates(steps=100, spike=None):
    """Update records with loss changes near -17 % (gn), -8 % (adam), -3 % (sgd); ``spike`` = opt:
    that run's change jumps to 1e6 % over its last five updates, then it diverges."""
    rng = np.random.default_rng(0)
    records, diverged = [], []
    for opt, mean in {"gn": -17.0, "adam": -8.0, "sgd": -3.0}.items():
        for step in range(1, steps + 1):
            change = mean + rng.standard_normal()
            if opt == spike and step > steps - 5:
                change = 1e6
            records.append(
                {
                    "type": "update",
                    "phase": "minibatch",
                    "optimizer": opt,
                    "seed": 0,
                    "step": step,
                    "loss_change_pct": change,
                }
            )
        if opt == spike:
            diverged.append(_diverged("minibatch", opt, 0, steps))
    return records, diverged


def _diverged(phase, opt, seed, step):
    return {"type": "diverged", "phase": phase, "optimizer": opt, "seed": seed, "step": step}


def _legend_texts(fig):
    assert len(fig.legends) == 1, "one shared legend"
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _figures():
    full, _ = evals()
    mini, _ = evals("minibatch")
    changes, _ = updates()
    return {
        "fig1": fullbatch_figure(full, CONFIG),
        "fig2": minibatch_figure(mini, CONFIG),
        "fig3": loss_change_figure(changes, CONFIG),
        "fig5": no_bottleneck_figure(full + mini, dict(CONFIG, inverted_bottleneck=False)),
    }


@pytest.mark.parametrize("name", ["fig1", "fig2", "fig3", "fig5"])
def test_every_panel_has_a_title_and_both_axis_labels(name):
    fig = _figures()[name]
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


@pytest.mark.parametrize("name", ["fig1", "fig2", "fig3", "fig5"])
def test_one_shared_legend_names_every_optimizer(name):
    assert _legend_texts(_figures()[name])[:3] == ["Exact GN", "Adam", "SGD"]


def test_loss_axes_are_labelled_with_the_loss():
    records, _ = evals()
    fig = fullbatch_figure(records, dict(CONFIG, loss="mse"))
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "squared-error loss",
        "accuracy",
        "squared-error loss",
        "accuracy",
    ]


def test_loss_spanning_decades_is_drawn_on_a_log_scale():
    records, _ = evals(steps=12)  # gn falls from 2.3 to 2.3 e^-6
    fig = fullbatch_figure(records, CONFIG)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear", "log", "linear"]


def test_loss_within_a_decade_stays_linear():
    records, _ = evals(steps=4, rates={"gn": 0.1, "adam": 0.05})
    fig = fullbatch_figure(records, CONFIG)
    assert fig.axes[0].get_yscale() == "linear"


def test_diverged_run_is_clipped_and_the_others_keep_the_axis():
    records, diverged = evals(seeds=(0, 1, 2), blow_up=("adam", 1, 6))
    ax = fullbatch_figure(records, CONFIG, diverged).axes[0]
    low, high = ax.get_ylim()
    healthy = [r["train_loss"] for r in records if (r["optimizer"], r["seed"]) != ("adam", 1)]
    assert low <= min(healthy) and max(healthy) <= high < 1e6


def test_figure3_axis_is_robust_to_a_diverged_run():
    records, diverged = updates(spike="adam")
    fig = loss_change_figure(records, CONFIG, diverged)
    healthy = [r["loss_change_pct"] for r in records if r["loss_change_pct"] < 1e5]
    low, high = fig.axes[0].get_ylim()
    assert low <= min(healthy) and max(healthy) <= high < 100
    assert fig.axes[1].get_ylim()[1] < 100, "the moving average is clipped too"


def test_clipped_values_are_counted_under_the_panel():
    records, diverged = updates(spike="adam")
    ax = loss_change_figure(records, CONFIG, diverged).axes[0]
    assert "5 values beyond the axis" in ax.get_xlabel()


def test_diverged_optimizer_is_visible_and_marked_in_the_legend():
    records, diverged = evals(blow_up=("sgd", 0, 0))  # only the evaluation before training
    fig = fullbatch_figure(records, CONFIG, diverged)
    assert _legend_texts(fig) == ["Exact GN", "Adam", "SGD (diverged, dashed: seed 0)"]
    sgd = [line for line in fig.axes[0].get_lines() if line.get_color() == plots.COLORS["sgd"]]
    assert sgd and all(len(line.get_xdata()) >= 1 for line in sgd)
    low, high = fig.axes[0].get_ylim()
    assert all(low <= y <= high for line in sgd for y in line.get_ydata())


def test_non_finite_values_do_not_hide_an_optimizer():
    records, _ = evals()
    for r in records:
        if r["optimizer"] == "adam" and r["step"] > 3:
            r["train_loss"] = math.nan if r["step"] % 2 else math.inf
    ax = fullbatch_figure(records, CONFIG).axes[0]
    adam = [line for line in ax.get_lines() if line.get_color() == plots.COLORS["adam"]]
    assert len(adam) == 1 and np.isfinite(adam[0].get_ydata()).all()
    assert ax.get_yscale() == "log"


def test_a_diverged_seed_leaves_the_mean_of_the_others():
    records, diverged = evals(seeds=(0, 1), blow_up=("adam", 1, 3))
    ax = fullbatch_figure(records, CONFIG, diverged).axes[0]
    adam = [line for line in ax.get_lines() if line.get_color() == plots.COLORS["adam"]]
    solid = [line for line in adam if line.get_linestyle() == "-"]
    expected = [r["train_loss"] for r in records if (r["optimizer"], r["seed"]) == ("adam", 0)]
    np.testing.assert_allclose(solid[0].get_ydata(), expected)


@pytest.mark.parametrize(
    ("seeds", "text"),
    [
        ([1], "seed 1"),
        ([0, 1, 2], "seeds 0, 1, 2"),
        ([2, 0], "seeds 0, 2"),
        (range(10), "seeds 0-9"),
        ([0, 1, 2, 3, 7], "seeds 0-3, 7"),
    ],
)
def test_seed_text(seeds, text):
    assert seed_text(seeds) == text


@pytest.mark.parametrize(("seeds", "text"), [((1,), "seed 1)"), ((0, 1, 2), "seeds 0, 1, 2)")])
def test_title_names_the_seeds(seeds, text):
    records, _ = evals(seeds=seeds)
    title = fullbatch_figure(records, CONFIG)._suptitle.get_text()
    assert title.startswith("Figure 1: full batch (bundled") and title.endswith(text)


def test_robust_limits_leave_well_behaved_values_alone():
    assert robust_limits(np.linspace(-20.0, 5.0, 50)) is None


def test_robust_limits_keep_a_transient_spike():
    # `make demo`'s test losses: Adam and SGD peak at 2.7 times the initial loss, then settle
    adam = [5.44, 11.85, 14.07, 14.56, 11.88, 6.75, 2.95, 2.31, 3.74, 2.64, 1.89, 2.02, 1.98, 1.55]
    sgd = [5.44, 11.05, 14.83, 7.24, 6.54, 4.22, 3.26, 2.86, 2.24, 1.32, 1.16, 1.16, 1.24, 1.1]
    gn = [5.44, 3.65, 2.59, 2.05, 1.75, 1.58, 1.49, 1.44, 1.41, 1.39, 1.38, 1.37, 1.36, 1.35]
    values = np.array(adam + [1.1] * 16 + sgd + [0.9] * 16 + gn + [1.3] * 16)
    assert robust_limits(values, log=True) is None


def test_robust_limits_cut_a_far_outlier():
    values = np.concatenate([np.linspace(-20.0, 5.0, 50), [1e6]])
    low, high = robust_limits(values)
    assert low <= -20.0 and 5.0 <= high < 1e3


def test_run_figures_reads_diverged_records_from_the_store(tmp_path):
    store = ResultsStore(tmp_path)
    store.open(CONFIG)
    records, diverged = evals(seeds=(0,), blow_up=("gn", 0, 2))
    for record in records + diverged:
        store.append(record)
    figures = run_figures(tmp_path)
    assert list(figures) == [FIGURES["fullbatch"]]
    assert "Exact GN (diverged, dashed: seed 0)" in _legend_texts(figures[FIGURES["fullbatch"]])
    paths = plots.plot_run(tmp_path)
    assert paths == [tmp_path / FIGURES["fullbatch"]] and paths[0].stat().st_size > 0
