"""``curvlab summary --loss-change K``: Figure 3's early and late per-update loss change."""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.cli import loss_change_table, main
from curvlab.experiments import ResultsStore, Runner, make_config
from curvlab.experiments.plots import NoResultsError, summary_loss_change

TINY = dict(subset=64, steps=3, hidden=96, depth=2, eval_every=1, eval_train_size=64)
FIRST = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss-change")
    config = make_config(
        "loss-change",
        "bundled",
        **dict(TINY, epochs=1, batch_size=64, optimizers=("gn", "sgd"), seeds=(1, 2)),
    )
    Runner(config, out, progress=False).run()
    return out


def test_rows_are_the_per_seed_means_of_the_update_records(run):
    updates = ResultsStore(run).updates()
    rows = {r["optimizer"]: r for r in summary_loss_change(run, FIRST)}
    assert set(rows) == {"gn", "sgd"}
    for name, row in rows.items():
        early, late = [], []
        for seed in (1, 2):
            mine = [r for r in updates if r["optimizer"] == name and r["seed"] == seed]
            early.append(np.mean([r["loss_change_pct"] for r in mine if r["step"] < FIRST]))
            late.append(np.mean([r["loss_change_pct"] for r in mine if r["step"] >= FIRST]))
        assert row["seeds"] == 2 and row["updates"] == 2048 // 64
        assert row["early"] == pytest.approx(np.mean(early))
        assert row["early_std"] == pytest.approx(np.std(early, ddof=1))
        assert row["late"] == pytest.approx(np.mean(late))
        assert row["late_std"] == pytest.approx(np.std(late, ddof=1))
    assert rows["gn"]["early"] < 0  # GN's steps lower their own batch's loss


def test_the_cli_prints_the_table(run, capsys):
    assert main(["summary", str(run), "--loss-change", str(FIRST)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == loss_change_table([run], FIRST)
    head = printed.splitlines()[0]
    assert f"change % (updates < {FIRST})" in head and "seeds" in head
    assert len(printed.splitlines()) == 4  # head, rule, gn, sgd


def test_bad_arguments_are_named(run, tmp_path, capsys):
    with pytest.raises(ValueError, match="first must be a positive"):
        summary_loss_change(run, 0)
    with pytest.raises(SystemExit):
        main(["summary", str(run), "--loss-change", "0"])
    assert "positive number of updates" in capsys.readouterr().err
    config = make_config("fullbatch", "bundled", **dict(TINY, optimizers=("sgd",)))
    Runner(config, tmp_path, progress=False).run()
    with pytest.raises(NoResultsError, match="not a loss-change run"):
        summary_loss_change(tmp_path, FIRST)


def test_a_diverged_seed_is_named_and_left_out_of_the_means(tmp_path):
    config = make_config(
        "loss-change",
        "bundled",
        **dict(TINY, epochs=1, batch_size=256, optimizers=("sgd",), seeds=(1,)),
        lr={"minibatch": {"sgd": 1e6}},
    )
    Runner(config, tmp_path, progress=False).run()
    (row,) = summary_loss_change(tmp_path, FIRST)
    assert row["seeds"] == 0 and row["early"] is None and row["updates"] is None
    assert list(row["diverged"]) == [1]
    line = loss_change_table([tmp_path], FIRST).splitlines()[-1]
    assert "seed 1 after" in line
