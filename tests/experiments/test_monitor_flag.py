"""``curvlab run ... --monitor PRESET``: the Monitor's log and dashboard in the run directory."""

from __future__ import annotations

import pytest

from curvlab.cli import main
from curvlab.diagnostics import read_log
from curvlab.experiments import Runner, make_config
from curvlab.experiments import runner as runner_module

TINY = dict(subset=64, steps=4, hidden=96, depth=2, eval_every=2, eval_train_size=64)


def test_cli_monitor_writes_log_and_dashboard_for_first_order_runs(tmp_path):
    out = tmp_path / "run"
    args = ["run", "fullbatch", "--dataset", "bundled", "--out", str(out), "--no-progress"]
    args += ["--no-plot", "--subset", "64", "--steps", "3", "--hidden", "96", "--depth", "2"]
    args += ["--optimizers", "gn,sgd", "--monitor", "economy"]
    assert main(args) == 0
    folder = out / "monitor" / "fullbatch-sgd-seed42"
    records = read_log(folder)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all("loss" in r and "grad_norm" in r for r in records)
    assert (folder / "dashboard.png").stat().st_size > 0
    assert not (out / "monitor" / "fullbatch-gn-seed42").exists()  # ExactGN is not monitored


def test_interrupted_monitored_run_resumes_its_log(tmp_path, monkeypatch):
    config = make_config("fullbatch", "bundled", optimizers=("adam",), **TINY)
    Runner(config, tmp_path / "reference", progress=False, monitor="business").run()
    original, calls = runner_module.update, {"n": 0}

    def update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint at step 2, in the middle of step 3
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "update", update)
    with pytest.raises(KeyboardInterrupt):
        Runner(config, tmp_path / "resumed", progress=False, monitor="business").run()
    folder = tmp_path / "resumed" / "monitor" / "fullbatch-adam-seed42"
    assert [r["step"] for r in read_log(folder)] == [0, 1, 2]  # step 2 is repeated on resume
    monkeypatch.undo()
    Runner(config, tmp_path / "resumed", progress=False, monitor="business").run()
    resumed = read_log(folder)
    reference = read_log(tmp_path / "reference" / "monitor" / "fullbatch-adam-seed42")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(resumed, reference, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert (folder / "dashboard.png").exists()


def test_monitor_preset_and_loss_are_checked():
    with pytest.raises(ValueError, match="monitor must be one of"):
        Runner(make_config("fullbatch", "bundled", **TINY), "unused", monitor="first")
    with pytest.raises(ValueError, match="monitor needs loss='ce'"):
        Runner(make_config("fullbatch", "bundled", loss="mse", **TINY), "unused", monitor="full")
