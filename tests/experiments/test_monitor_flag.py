"""``curvlab run ... --monitor PRESET``: the Monitor's log and dashboard in the run directory."""

from __future__ import annotations

import copy

import pytest
import torch

from curvlab.cli import main
from curvlab.diagnostics import Monitor, read_log
from curvlab.experiments import Runner, make_config
from curvlab.experiments import runner as runner_module
from curvlab.nn import RevMLP

TINY = dict(subset=64, steps=4, hidden=96, depth=2, eval_every=2, eval_train_size=64)


def test_cli_monitor_writes_log_and_dashboard_for_every_optimizer(tmp_path):
    out = tmp_path / "run"
    args = ["run", "fullbatch", "--dataset", "bundled", "--out", str(out), "--no-progress"]
    args += ["--no-plot", "--subset", "64", "--steps", "3", "--hidden", "96", "--depth", "2"]
    args += ["--optimizers", "gn,sgd", "--monitor", "economy"]
    assert main(args) == 0
    for name in ("sgd", "gn"):
        folder = out / "monitor" / f"fullbatch-{name}-seed42"
        records = read_log(folder)
        assert [r["step"] for r in records] == [0, 1, 2]
        assert all("loss" in r and "grad_norm" in r for r in records)
        # the per-sample instruments see the batch too (the runner's loss is the monitor's)
        assert all("norm_test" in r and "batch_grad_norms" in r for r in records)
        assert all("alpha" in r for r in records[1:])
        assert (folder / "dashboard.png").stat().st_size > 0


@pytest.mark.parametrize("preset", ["economy", "business"])
def test_a_monitored_exact_gn_takes_the_same_steps_and_reports_its_gradients(preset):
    config = make_config("fullbatch", "bundled", optimizers=("gn",), **TINY)
    data = runner_module.load_data(config, torch.device("cpu"))
    x, y = data.train_x[:64], data.train_y[:64]
    torch.manual_seed(0)
    model = RevMLP(x.shape[1], 10, 96, 2)
    plain = copy.deepcopy(model)
    gn = runner_module.build_optimizer("gn", model, 0.5, config)
    gn_plain = runner_module.build_optimizer("gn", plain, 0.5, config)
    losses, seen = [], set()
    with Monitor(model, torch.nn.CrossEntropyLoss(), preset, schedule=1) as monitor:
        for step in range(3):
            with monitor.outside():  # the reference's forward is not the step's
                reference = batch_grad_norm(model, x, y)
            before = runner_module.update(gn, model, x, y, "ce", monitor, step)
            assert runner_module.update(gn_plain, plain, x, y, "ce") == pytest.approx(before)
            record = monitor.latest()
            assert record["step"] == step
            assert record["grad_norm"] == pytest.approx(reference, rel=1e-4)
            assert record["loss"] == pytest.approx(before, rel=1e-6)
            losses.append(before)
            seen |= set(record)
            assert all(p.grad is None for p in model.parameters()), "the gradient is dropped"
    assert losses[-1] < losses[0]
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert {"alpha", "update_size", "distance"} <= seen
    if preset == "business":
        assert {"hessian_trace", "tic_diag"} <= seen


def batch_grad_norm(model, x, y) -> float:
    """The mean cross-entropy's gradient norm at the model's parameters, by plain autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return float(
        torch.linalg.vector_norm(
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        )
    )


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
