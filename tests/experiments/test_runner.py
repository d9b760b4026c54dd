"""The experiment runner, results store, plots and CLI on tiny real runs of the bundled data."""

from __future__ import annotations

import json

import pytest
import torch

from curvlab.cli import main
from curvlab.experiments import ConfigMismatchError, ResultsStore, Runner, make_config
from curvlab.experiments import runner as runner_module
from curvlab.experiments.plots import FIGURES, NoResultsError, plot_run, summary

TINY = dict(subset=64, steps=3, hidden=96, depth=2, eval_every=1, eval_train_size=64)
EVAL_KEYS = {"experiment", "optimizer", "step", "train_loss", "train_acc", "test_loss", "test_acc"}


def _evals(folder):
    return ResultsStore(folder).evaluations()


def test_fullbatch_run_writes_header_evaluations_and_figure(tmp_path):
    config = make_config("fullbatch", "bundled", **TINY)
    Runner(config, tmp_path, progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    header = records[0]
    assert header["type"] == "header"
    assert header["config"]["hidden"] == 96 and header["config"]["ce_hessian"] == "identity"
    assert {"torch", "python", "curvlab"} <= set(header["versions"])
    evals = _evals(tmp_path)
    assert {r["optimizer"] for r in evals} == {"gn", "adam", "sgd"}
    for r in evals:
        assert EVAL_KEYS | {"time_s"} <= set(r)
        assert 0.0 <= r["train_acc"] <= 1.0
    # one evaluation before training and one after every update
    assert sorted(r["step"] for r in evals if r["optimizer"] == "gn") == [0, 1, 2, 3]
    gn = [r["train_loss"] for r in evals if r["optimizer"] == "gn"]
    assert gn[-1] < gn[0], "exact GN must lower the full-batch training loss"
    paths = plot_run(tmp_path)
    assert paths == [tmp_path / FIGURES["fullbatch"]]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_initialization_for_every_optimizer(tmp_path):
    config = make_config("fullbatch", "bundled", **dict(TINY, steps=1))
    Runner(config, tmp_path, progress=False).run()
    start = [r for r in _evals(tmp_path) if r["step"] == 0]
    assert len(start) == 3
    assert len({(r["train_loss"], r["test_loss"]) for r in start}) == 1


def _interrupt_after(monkeypatch, calls: int):
    original = runner_module.update
    count = {"n": 0}

    def update(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "update", update)


@pytest.mark.parametrize("experiment", ["fullbatch", "minibatch"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, experiment):
    overrides = dict(TINY, epochs=2, batch_size=64, optimizers=("gn", "adam"), evals_per_epoch=2)
    config = make_config(experiment, "bundled", **overrides)
    Runner(config, tmp_path / "reference", progress=False).run()

    _interrupt_after(
        monkeypatch, 3 if experiment == "fullbatch" else 40
    )  # dies in the middle of the second optimizer's run
    with pytest.raises(KeyboardInterrupt):
        Runner(config, tmp_path / "resumed", progress=False).run()
    partial = _evals(tmp_path / "resumed")
    assert 0 < len(partial) < len(_evals(tmp_path / "reference"))
    monkeypatch.undo()
    Runner(config, tmp_path / "resumed", progress=False).run()

    reference, resumed = _evals(tmp_path / "reference"), _evals(tmp_path / "resumed")
    assert [(r["optimizer"], r["step"]) for r in resumed] == [
        (r["optimizer"], r["step"]) for r in reference
    ]
    for a, b in zip(reference, resumed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5, abs=1e-7)
        assert b["test_acc"] == pytest.approx(a["test_acc"])
    # a finished run started again does nothing
    Runner(config, tmp_path / "resumed", progress=False).run()
    assert len(_evals(tmp_path / "resumed")) == len(resumed)


def test_other_config_in_same_folder_is_refused(tmp_path):
    Runner(
        make_config("fullbatch", "bundled", **dict(TINY, steps=1)), tmp_path, progress=False
    ).run()
    other = make_config("fullbatch", "bundled", **dict(TINY, steps=1, hidden=128))
    with pytest.raises(ConfigMismatchError, match="hidden"):
        Runner(other, tmp_path, progress=False).run()


def test_finished_run_can_be_extended_by_more_steps_and_optimizers(tmp_path):
    short = make_config("fullbatch", "bundled", **dict(TINY, steps=2, optimizers=("gn",)))
    Runner(short, tmp_path, progress=False).run()
    longer = make_config("fullbatch", "bundled", **dict(TINY, steps=3, optimizers=("gn", "adam")))
    Runner(longer, tmp_path, progress=False).run()
    store = ResultsStore(tmp_path)
    assert store.config()["steps"] == 3
    steps = {(r["optimizer"], r["step"]) for r in store.evaluations()}
    assert steps == {("gn", s) for s in range(4)} | {("adam", s) for s in range(4)}
    reference = make_config("fullbatch", "bundled", **dict(TINY, steps=3, optimizers=("gn",)))
    Runner(reference, tmp_path / "reference", progress=False).run()
    last = [r for r in store.evaluations() if r["optimizer"] == "gn"][-1]
    assert last["train_loss"] == pytest.approx(_evals(tmp_path / "reference")[-1]["train_loss"])


def test_an_added_optimizer_may_bring_its_own_rate_a_recorded_one_may_not_change(tmp_path):
    def config(optimizers, **rates):
        return make_config(
            "fullbatch",
            "bundled",
            **dict(TINY, steps=1, optimizers=optimizers),
            lr={"fullbatch": rates},
        )

    Runner(config(("gn-pinv",)), tmp_path, progress=False).run()  # gn-pinv takes gn's rate
    Runner(config(("gn-pinv", "adam"), adam=3e-4), tmp_path, progress=False).run()
    store = ResultsStore(tmp_path)
    assert {r["optimizer"] for r in store.evaluations()} == {"gn-pinv", "adam"}
    assert store.config()["lr"]["fullbatch"]["adam"] == 3e-4
    with pytest.raises(ConfigMismatchError, match="lr"):
        Runner(config(("gn-pinv", "adam"), adam=1e-3), tmp_path, progress=False).run()
    with pytest.raises(ConfigMismatchError, match="lr"):  # gn-pinv was trained at gn's rate
        Runner(config(("gn-pinv", "adam"), adam=3e-4, gn=7.0), tmp_path, progress=False).run()
    # a GN variant not recorded yet may take a rate of its own
    Runner(
        config(("gn-pinv", "adam", "gn-paper"), adam=3e-4, **{"gn-paper": 0.5}),
        tmp_path,
        progress=False,
    ).run()
    assert ResultsStore(tmp_path).config()["lr"]["fullbatch"]["gn-paper"] == 0.5


def test_eval_first_adds_early_evaluations_and_changes_no_update(tmp_path):
    def run(folder, **extra):
        config = make_config(
            "fullbatch", "bundled", **dict(TINY, steps=6, eval_every=5, optimizers=("gn",), **extra)
        )
        Runner(config, folder, progress=False).run()
        return {r["step"]: r["train_loss"] for r in ResultsStore(folder).evaluations()}

    plain, early = run(tmp_path / "plain"), run(tmp_path / "early", eval_first=3)
    assert sorted(plain) == [0, 5, 6]
    assert sorted(early) == [0, 1, 2, 3, 5, 6]
    assert all(early[step] == plain[step] for step in plain)
    with pytest.raises(ValueError, match="eval_first"):
        make_config("fullbatch", "bundled", eval_first=-1)


def test_run_recorded_before_a_new_setting_existed_resumes(tmp_path):
    config = make_config("fullbatch", "bundled", **dict(TINY, steps=1, optimizers=("gn",)))
    old = config.to_dict()
    del old["gn_output_damping"]  # as written by a version without that setting
    store = ResultsStore(tmp_path)
    store.open(old)
    store.save_checkpoint(store.checkpoint_path("fullbatch", "gn", 42), {"step": 0})
    store.open(config.to_dict(), defaults={"gn_output_damping": 0.0})
    with pytest.raises(ConfigMismatchError, match="gn_output_damping"):
        store.open(config.to_dict(), defaults={"gn_output_damping": 0.5})


def test_divergence_is_recorded_not_hidden(tmp_path):
    config = make_config(
        "fullbatch", "bundled", **TINY, optimizers=("sgd",), lr={"fullbatch": {"sgd": 1e6}}
    )
    Runner(config, tmp_path, progress=False).run()
    records = ResultsStore(tmp_path).records()
    diverged = [r for r in records if r.get("type") == "diverged"]
    assert len(diverged) == 1 and diverged[0]["optimizer"] == "sgd"


def test_loss_change_records_every_update_and_draws_figure_3(tmp_path):
    config = make_config(
        "loss-change", "bundled", **dict(TINY, epochs=1, batch_size=64, optimizers=("gn", "adam"))
    )
    Runner(config, tmp_path, progress=False).run()
    updates = ResultsStore(tmp_path).updates()
    assert len(updates) == 2 * (2048 // 64)
    for r in updates:
        expected = 100 * (r["batch_loss_after"] - r["batch_loss_before"]) / r["batch_loss_before"]
        assert r["loss_change_pct"] == pytest.approx(expected)
    names = {p.name for p in plot_run(tmp_path)}
    assert names == {FIGURES["minibatch"], FIGURES["loss-change"]}


def test_no_bottleneck_runs_both_phases_with_the_paper_scheme(tmp_path):
    config = make_config(
        "no-bottleneck", "bundled", **dict(TINY, epochs=1, batch_size=512, optimizers=("gn",))
    )
    assert config.gn_scheme == "paper" and not config.inverted_bottleneck
    Runner(config, tmp_path, progress=False).run()
    assert {r["phase"] for r in _evals(tmp_path)} == {"fullbatch", "minibatch"}
    assert [p.name for p in plot_run(tmp_path)] == [FIGURES["no-bottleneck"]]
    rows = summary(tmp_path)
    assert {(r["phase"], r["optimizer"]) for r in rows} == {
        ("fullbatch", "gn"),
        ("minibatch", "gn"),
    }


def test_gn_learning_rate_defaults_to_the_authors_effective_step():
    assert make_config("fullbatch", "bundled").lr["fullbatch"]["gn"] == pytest.approx(0.5 * 4)
    assert make_config("minibatch", "cifar10").lr["minibatch"]["gn"] == pytest.approx(0.1 * 12)
    config = make_config("fullbatch", "bundled", lr={"fullbatch": {"adam": 1e-3}})
    assert config.lr["fullbatch"]["adam"] == 1e-3 and config.lr["fullbatch"]["sgd"] == 0.03


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(experiment="figure-9"), "unknown experiment"),
        (dict(optimizers=("lbfgs",)), "unknown optimizers"),
        (dict(widht=3), "unknown config fields"),
        (dict(lr={"warmup": {"gn": 1.0}}), "unknown phase"),
    ],
)
def test_config_errors_name_the_problem(kwargs, match):
    experiment = kwargs.pop("experiment", "fullbatch")
    with pytest.raises(ValueError, match=match):
        make_config(experiment, "bundled", **kwargs)


def test_cli_run_plot_summary(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "fullbatch", "--dataset", "bundled", "--out", str(out), "--no-progress"]
    args += ["--subset", "64", "--steps", "2", "--hidden", "96", "--depth", "2"]
    args += ["--optimizers", "gn,adam", "--lr", "adam=1e-3", "--eval-train-size", "64"]
    args += ["--ce-hessian", "exact", "--output-damping", "0.1"]
    assert main(args) == 0
    header = ResultsStore(out).header()
    assert header["config"]["lr"]["fullbatch"]["adam"] == 1e-3
    assert header["config"]["optimizers"] == ["gn", "adam"]
    assert header["config"]["gn_output_damping"] == 0.1
    assert (out / FIGURES["fullbatch"]).exists()
    (out / FIGURES["fullbatch"]).unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / FIGURES["fullbatch"]).exists()
    capsys.readouterr()
    assert main(["summary", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| fullbatch | gn | 1 | 2 |" in table and "| fullbatch | adam | 1 | 2 |" in table


def test_cli_sweep_picks_the_lowest_final_train_loss(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "fullbatch", "--optimizer", "sgd", "--lrs", "1e-5,1e-2", "--out", str(out)]
    args += ["--subset", "64", "--steps", "2", "--hidden", "96", "--depth", "2", "--no-progress"]
    assert main(args) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [r["lr"] for r in result["rows"]] == [1e-5, 1e-2]
    assert result["best"]["train_loss"] == min(r["train_loss"] for r in result["rows"])


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "fullbatch", "--lr", "lbfgs=1"])
    assert "NAME=VALUE" in capsys.readouterr().err
    out = tmp_path / "run"
    args = ["run", "fullbatch", "--dataset", "mnist", "--data", str(tmp_path / "none")]
    assert main([*args, "--out", str(out)]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err
    assert not out.exists()
    assert main(["plot", str(tmp_path)]) == 2
    assert "no results" in capsys.readouterr().err
    with pytest.raises(NoResultsError):
        plot_run(tmp_path)


def test_checkpoint_holds_model_and_optimizer_state(tmp_path):
    config = make_config("fullbatch", "bundled", **TINY, optimizers=("adam",))
    Runner(config, tmp_path, progress=False).run()
    path = ResultsStore(tmp_path).checkpoint_path("fullbatch", "adam", 42)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3 and state["optimizer"]["state"]
