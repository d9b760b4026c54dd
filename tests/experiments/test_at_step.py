"""``curvlab summary --at-step N``: runs of different lengths compared at equal updates."""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.cli import loss_change_table, main, summary_table
from curvlab.experiments import ResultsStore, Runner, make_config
from curvlab.experiments.plots import NoResultsError, summary, summary_loss_change

# one epoch of the bundled 2,048 training images in batches of 64: 32 updates, evaluated
# every 8; SGD at a rate that blows the loss up within a few updates
TINY = dict(subset=64, steps=3, hidden=32, depth=2, eval_train_size=64, evals_per_epoch=4)
SEEDS = (1, 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("at-step")
    config = make_config(
        "loss-change",
        "bundled",
        **dict(
            TINY,
            epochs=1,
            batch_size=64,
            optimizers=("adam", "sgd"),
            seeds=SEEDS,
            lr={"fullbatch": {}, "minibatch": {"adam": 1e-3, "sgd": 1e4}},
        ),
    )
    Runner(config, out, progress=False).run()
    return out


def _evaluations(run, optimizer: str) -> list[dict]:
    return [r for r in ResultsStore(run).evaluations() if r["optimizer"] == optimizer]


def test_each_seed_is_taken_at_its_last_evaluation_up_to_the_step(run):
    steps = sorted({r["step"] for r in _evaluations(run, "adam")})
    assert steps == [0, 8, 16, 24, 32]
    for at_step, expected_step in ((20, 16), (16, 16), (0, 0), (1000, 32)):
        (row,) = [r for r in summary(run, at_step) if r["optimizer"] == "adam"]
        mine = [r for r in _evaluations(run, "adam") if r["step"] == expected_step]
        assert row["step"] == expected_step and row["seeds"] == len(SEEDS)
        assert row["test_loss"] == pytest.approx(np.mean([r["test_loss"] for r in mine]))
        assert row["test_loss_std"] == pytest.approx(np.std([r["test_loss"] for r in mine], ddof=1))
    assert summary(run, 1000) == summary(run)


def test_a_seed_that_diverged_later_is_not_marked_diverged_before(run):
    (final,) = [r for r in summary(run) if r["optimizer"] == "sgd"]
    assert final["diverged"], "SGD at 1e4 was meant to diverge"
    stopped = min(final["diverged"].values())
    assert stopped > 0
    (early,) = [r for r in summary(run, 0) if r["optimizer"] == "sgd"]
    assert early["diverged"] == {} and early["step"] == 0
    (late,) = [r for r in summary(run, stopped) if r["optimizer"] == "sgd"]
    assert late["diverged"] == {s: t for s, t in final["diverged"].items() if t <= stopped}


def test_the_loss_change_counts_only_the_updates_up_to_last(run):
    updates = [r for r in ResultsStore(run).updates() if r["optimizer"] == "adam"]
    first, last = 5, 20
    (row,) = [r for r in summary_loss_change(run, first, last) if r["optimizer"] == "adam"]
    late = [
        np.mean(
            [r["loss_change_pct"] for r in updates if r["seed"] == s and first <= r["step"] <= last]
        )
        for s in SEEDS
    ]
    assert row["updates"] == last and row["late"] == pytest.approx(np.mean(late))
    (full,) = [r for r in summary_loss_change(run, first) if r["optimizer"] == "adam"]
    assert full["updates"] == 32 and full["late"] != pytest.approx(row["late"])
    assert full["early"] == pytest.approx(row["early"])


def test_the_cli_prints_them_and_names_bad_combinations(run, capsys):
    assert main(["summary", str(run), "--at-step", "20"]) == 0
    assert capsys.readouterr().out.strip() == summary_table([run], at_step=20)
    assert main(["summary", str(run), "--loss-change", "5", "--at-step", "20"]) == 0
    assert capsys.readouterr().out.strip() == loss_change_table([run], 5, 20)
    for extra, message in (
        (["--at-train-loss", "1"], "--at-train-loss or --at-step, not both"),
        (["--per-source"], "--at-step takes no --per-source"),
        (["--loss-change", "30"], "last (20) must be at least first (30)"),
    ):
        assert main(["summary", str(run), "--at-step", "20", *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["summary", str(run), "--at-step", "-1"])
    assert "a number of updates >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at_step must be"):
        summary(run, -1)
    with pytest.raises(NoResultsError):
        summary(run / "missing", 3)
