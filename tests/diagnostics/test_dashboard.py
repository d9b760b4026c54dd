"""The dashboard figure, its PNG (by the monitor and by ``curvlab dashboard``), TensorBoard."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from curvlab.cli import main
from curvlab.diagnostics import Monitor, read_log
from curvlab.diagnostics.dashboard import COLUMNS, PANELS, dashboard_figure, write_dashboard
from tests.diagnostics.test_monitor import monitored_step, problem

PNG = b"\x89PNG\r\n\x1a\n"


def train(log_dir, preset="full", steps=3, **options) -> list[dict]:
    model, loss_func, x, y = problem("ce-mean")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    schedule = {"gradient_histogram_2d": 1, "hessian_trace": 2} if preset == "full" else None
    with Monitor(model, loss_func, preset, log_dir=log_dir, schedule=schedule, **options) as mon:
        for step in range(steps):
            monitored_step(model, loss_func, x, y, mon, step, optimizer)
            optimizer.step()
    return read_log(log_dir)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return train(tmp_path_factory.mktemp("run"))


def titles(fig) -> list[str]:
    return [ax.get_title().split("\n")[-1] for ax in fig.axes]


def test_figure_has_every_panel_under_its_column(records):
    fig = dashboard_figure(records)
    heads = [ax.get_title().split("\n")[0] for ax in fig.axes if "\n" in ax.get_title()]
    assert sorted(titles(fig)) == sorted(PANELS) and heads == list(COLUMNS)


def test_tracked_panels_plot_their_instruments_over_steps(records):
    fig = dashboard_figure(records)
    tests = fig.axes[titles(fig).index("Gradient tests")]
    labels = [line.get_label() for line in tests.get_lines()]
    assert labels == list(PANELS["Gradient tests"]) and tests.get_xlabel() == "step"


def test_untracked_panels_say_so(tmp_path):
    fig = dashboard_figure(train(tmp_path, preset=["loss", "grad_norm"], steps=2))
    said = {t: [x.get_text() for x in ax.texts] for t, ax in zip(titles(fig), fig.axes)}
    assert said["Hessian trace"] == ["not tracked"] and said["Loss"] == []


def test_histogram_panels_show_the_latest_histograms(records):
    fig = dashboard_figure(records)
    one = fig.axes[titles(fig).index("Gradient elements (1d histogram)")]
    two = fig.axes[titles(fig).index("Gradient elements vs parameters (2d histogram)")]
    assert one.patches and two.collections and "step 2" in two.get_xlabel()


def test_monitor_redraws_the_png(tmp_path):
    train(tmp_path, preset="economy", steps=3, dashboard_every=2)
    assert (tmp_path / "dashboard.png").read_bytes()[:8] == PNG


def test_cli_dashboard_writes_the_png(records, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    write_dashboard(records, folder / "first.png")
    (folder / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["dashboard", str(folder)]) == 0
    assert (folder / "dashboard.png").read_bytes()[:8] == PNG and "wrote" in capsys.readouterr().out


def test_cli_dashboard_names_a_folder_without_a_log(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path)]) == 2
    assert "monitor.jsonl" in capsys.readouterr().err


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    train(tmp_path, preset="economy", steps=2, tensorboard=True)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_tensorboard_without_the_package_names_it(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    model, loss_func, _, _ = problem("ce-mean")
    with pytest.raises(ModuleNotFoundError, match="'tensorboard' package"):
        Monitor(model, loss_func, log_dir=tmp_path, tensorboard=True)
