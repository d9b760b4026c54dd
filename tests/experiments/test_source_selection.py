"""``SOURCE#OPT,OPT``: a records source narrowed to some of its optimizers.

A run superseded by a rerun kept elsewhere (SGD at a rate that diverged, rerun at another rate)
would make the two sources overlap; narrowing the first lets both be summarized and drawn.
"""

from __future__ import annotations

import pytest

from curvlab.cli import loss_change_table, main, per_source_table, summary_table
from curvlab.experiments import Runner, make_config
from curvlab.experiments.plots import (
    NoResultsError,
    plot_run,
    split_source,
    summary,
    summary_loss_change,
)

TINY = dict(subset=64, steps=2, hidden=96, depth=2, eval_every=1, eval_train_size=64)


def _run(out, optimizers, lr):
    config = make_config(
        "loss-change",
        "bundled",
        **dict(
            TINY, epochs=1, batch_size=64, optimizers=optimizers, seeds=(1,), lr={"minibatch": lr}
        ),
    )
    Runner(config, out, progress=False).run()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    first = _run(tmp_path_factory.mktemp("first"), ("gn", "sgd"), {"gn": 0.5, "sgd": 0.1})
    rerun = _run(tmp_path_factory.mktemp("rerun"), ("sgd",), {"sgd": 0.01})
    return first, rerun


def test_split_source_reads_the_optimizers_after_the_mark(tmp_path):
    assert split_source(tmp_path / "r.jsonl.gz") == (tmp_path / "r.jsonl.gz", None)
    path, chosen = split_source(f"{tmp_path}/r.jsonl.gz#gn, adam")
    assert path == tmp_path / "r.jsonl.gz" and chosen == {"gn", "adam"}
    with pytest.raises(NoResultsError, match="no optimizer named"):
        split_source(f"{tmp_path}/r.jsonl.gz#")


def test_overlapping_sources_are_refused_and_a_narrowed_one_is_not(runs):
    first, rerun = runs
    with pytest.raises(NoResultsError, match="both record minibatch sgd seed 1"):
        summary([first, rerun])
    rows = {r["optimizer"]: r for r in summary([f"{first}#gn", rerun])}
    assert set(rows) == {"gn", "sgd"}
    assert rows["sgd"]["test_loss"] == summary(rerun)[0]["test_loss"]
    assert rows["gn"]["test_loss"] == summary(f"{first}#gn")[0]["test_loss"]
    assert rows["sgd"]["test_loss"] != summary(f"{first}#sgd")[0]["test_loss"]


def test_the_narrowed_source_contributes_only_its_optimizers_updates(runs):
    first, rerun = runs
    rows = {r["optimizer"]: r for r in summary_loss_change([f"{first}#gn", rerun], 1)}
    assert rows["sgd"]["early"] == summary_loss_change(rerun, 1)[0]["early"]
    assert rows["gn"]["early"] == summary_loss_change(f"{first}#gn", 1)[0]["early"]
    assert "| sgd |" in loss_change_table([f"{first}#gn", rerun], 1)


def test_an_optimizer_the_source_does_not_record_is_named(runs):
    first, _ = runs
    with pytest.raises(NoResultsError, match=r"records no adam \(it records gn, sgd\)"):
        summary(f"{first}#gn,adam")


def test_tables_figures_and_the_command_line_take_narrowed_sources(runs, tmp_path, capsys):
    first, rerun = runs
    assert "| sgd |" in summary_table([f"{first}#gn", rerun])
    table = per_source_table([f"{first}#gn", rerun])
    assert "| gn | 0.5 |" in table and "| sgd | 0.01 |" in table and "| sgd | 0.1 |" not in table
    assert plot_run([f"{first}#gn", rerun], tmp_path / "figures")
    assert plot_run(f"{first}#gn")[0].parent == first
    assert main(["summary", f"{first}#gn", str(rerun)]) == 0
    assert "| sgd |" in capsys.readouterr().out
    assert main(["summary", f"{first}#adam"]) == 2
    assert "records no adam" in capsys.readouterr().err
