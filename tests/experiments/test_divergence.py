"""A run whose loss leaves every bound is recorded as diverged, stopped, and marked by summary."""

from __future__ import annotations

import pytest
import torch

from curvlab.cli import main
from curvlab.experiments import ResultsStore, Runner, make_config, summary
from curvlab.experiments import runner as runner_module

# SGD at a tiny rate: the true loss barely moves, so the patched factors below decide everything
TINY = dict(
    subset=32,
    steps=8,
    hidden=16,
    depth=1,
    eval_every=1,
    eval_train_size=32,
    optimizers=("sgd",),
    lr={"fullbatch": {"sgd": 1e-9}},
)


def _scale_losses(monkeypatch, name: str, factor) -> None:
    """Multiply what ``runner.<name>`` returns (the loss, or the loss of a (loss, acc) pair)."""
    original = getattr(runner_module, name)
    count = {"n": 0}

    def scaled(*args, **kwargs):
        count["n"] += 1
        value = original(*args, **kwargs)
        if isinstance(value, tuple):
            return (value[0] * factor(count["n"]), *value[1:])
        return value * factor(count["n"])

    monkeypatch.setattr(runner_module, name, scaled)


def _run(folder, **overrides) -> ResultsStore:
    config = make_config("fullbatch", "bundled", **{**TINY, **overrides})
    return Runner(config, folder, progress=False).run()


def test_a_finite_loss_past_the_bound_is_recorded_as_diverged_and_stops_the_run(
    tmp_path, monkeypatch
):
    # update n returns 10^(n-1) times its loss: update 5 sees 1e4 times the initial loss
    _scale_losses(monkeypatch, "update", lambda n: 10.0 ** (n - 1))
    store = _run(tmp_path)
    [diverged] = store.diverged()
    assert diverged["step"] == 4 and "exceeds 1000 times the initial loss" in diverged["message"]
    assert 1e3 * diverged["initial_loss"] < diverged["loss"] < float("inf")
    assert max(r["step"] for r in store.evaluations()) == 4
    state = torch.load(store.checkpoint_path("fullbatch", "sgd", 42), weights_only=True)
    assert state["diverged"] and state["step"] == 4


def test_a_diverged_run_is_not_restarted_by_more_steps(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _scale_losses(patch, "update", lambda n: 10.0 ** (n - 1))
        _run(tmp_path)
    store = _run(tmp_path, steps=12)
    assert max(r["step"] for r in store.evaluations()) == 4 and len(store.diverged()) == 1


def test_the_bound_is_also_checked_on_the_evaluated_loss(tmp_path, monkeypatch):
    # evaluate is called for the train and then the test set: call 5 is step 2's train loss
    _scale_losses(monkeypatch, "evaluate", lambda n: 1e4 if n >= 5 else 1.0)
    [diverged] = _run(tmp_path).diverged()
    assert diverged["step"] == 2 and "exceeds" in diverged["message"]


def test_the_bound_is_a_setting(tmp_path, monkeypatch):
    _scale_losses(monkeypatch, "update", lambda n: 10.0 ** (n - 1))
    [diverged] = _run(tmp_path, diverge_factor=50.0).diverged()
    assert diverged["step"] == 2  # update 3 sees 100 times the initial loss


def test_a_step_the_optimizer_refuses_is_recorded_as_diverged(tmp_path, monkeypatch):
    original = runner_module.update

    def update(*args, **kwargs):
        if update.calls == 2:
            raise FloatingPointError("the step raised the loss 1e6-fold and was undone")
        update.calls += 1
        return original(*args, **kwargs)

    update.calls = 0
    monkeypatch.setattr(runner_module, "update", update)
    [diverged] = _run(tmp_path).diverged()
    assert diverged["step"] == 2 and "update 3 refused: the step raised" in diverged["message"]


def test_summary_marks_diverged_runs(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.open(make_config("fullbatch", "bundled", seeds=(1, 2)).to_dict())
    metrics = dict(epoch=0.0, train_loss=1.0, train_acc=0.5, test_loss=1.0, test_acc=0.5, time_s=0)
    for optimizer, seed, last in (("adam", 1, 3), ("adam", 2, 3), ("sgd", 1, 3), ("sgd", 2, 2)):
        base = {"phase": "fullbatch", "optimizer": optimizer, "seed": seed}
        for step in range(last + 1):
            store.append({"type": "eval", **base, "step": step, **metrics})
    store.append(
        {"type": "diverged", "phase": "fullbatch", "optimizer": "sgd", "seed": 2, "step": 2}
    )
    rows = {r["optimizer"]: r for r in summary(tmp_path)}
    assert rows["sgd"]["diverged"] == {2: 2} and rows["adam"]["diverged"] == {}
    assert main(["summary", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| fullbatch | adam |") and table[2].endswith("| ok |")
    assert table[3].endswith("| diverged (1 of 2 seeds: seed 2 after 2 updates) |")


def test_summary_says_ok_for_runs_that_did_not_diverge(tmp_path, capsys):
    _run(tmp_path, steps=1)
    assert [r["diverged"] for r in summary(tmp_path)] == [{}]
    assert main(["summary", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("| ok |")


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_a_bound_at_or_below_the_initial_loss_is_refused(factor):
    with pytest.raises(ValueError, match="diverge_factor must be > 1"):
        make_config("fullbatch", "bundled", diverge_factor=factor)
