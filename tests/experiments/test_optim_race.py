"""``curvlab run optim-race``: every optimizer on tiny runs of the bundled data, resume, table."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from curvlab.cli import main
from curvlab.experiments import optim_race, runner
from curvlab.experiments.optim_race import (
    MODELS,
    OPTIMIZERS,
    UNSUPPORTED,
    OptimRace,
    blow_up,
    make_race_config,
    plot_race,
    time_to_accuracy,
    time_to_accuracy_table,
)
from curvlab.experiments.store import ResultsStore, export_records

#: 1,792 training images after the 256 of the validation split: 14 batches of 128 per epoch.
TINY = dict(dataset="bundled", steps=6, evals_per_epoch=7, eval_train_size=256, device="cpu")
FIRST_ORDER = ("sgd", "adam")
#: Rates at which every optimizer trains both models on these tiny runs.
SAFE_LR = {name: 1e-3 for name in OPTIMIZERS} | {"sgd": 0.01, "adahesscale": 3e-4}


def _runs(folder) -> dict[tuple, list[dict]]:
    runs: dict[tuple, list[dict]] = {}
    for r in ResultsStore(folder).evaluations():
        runs.setdefault((r["phase"], r["optimizer"]), []).append(r)
    return runs


@pytest.fixture(scope="module")
def every_optimizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("race")
    OptimRace(make_race_config(SAFE_LR, **TINY), folder, progress=False).run()
    return folder


def test_every_supported_pair_runs_with_finite_losses(every_optimizer):
    runs = _runs(every_optimizer)
    expected = {(m, o) for m in MODELS for o in OPTIMIZERS if (m, o) not in UNSUPPORTED}
    assert set(runs) == expected
    assert ResultsStore(every_optimizer).diverged() == []
    for evaluations in runs.values():
        assert [r["step"] for r in evaluations] == [0, 2, 4, 6]
        assert all(math.isfinite(r[k]) for r in evaluations for k in ("train_loss", "val_loss"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", FIRST_ORDER)
def test_first_order_optimizers_decrease_the_loss(every_optimizer, model, name):
    evaluations = _runs(every_optimizer)[(model, name)]
    assert evaluations[-1]["train_loss"] < evaluations[0]["train_loss"]


def test_records_carry_the_rate_and_the_training_time(every_optimizer):
    config = make_race_config(SAFE_LR, **TINY)
    for (model, name), evaluations in _runs(every_optimizer).items():
        assert {r["lr"] for r in evaluations} == {config.lr[model][name]}
        times = [r["time_s"] for r in evaluations]
        assert times[0] == 0.0 and times == sorted(times) and times[-1] > 0


def _interrupt_after(monkeypatch, steps: int) -> None:
    """Make the ``steps``-th optimizer step of the process raise ``KeyboardInterrupt``."""
    count = {"n": 0}
    original = optim_race.build_optimizer

    def build(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        step = optimizer.step

        def interrupted(closure):
            count["n"] += 1
            if count["n"] == steps:
                raise KeyboardInterrupt
            return step(closure)

        optimizer.step = interrupted
        return optimizer

    monkeypatch.setattr(optim_race, "build_optimizer", build)


@pytest.mark.parametrize("name", ["adam", "kfac", "singd-dense", "ifshampoo"])
def test_a_killed_run_with_a_torn_tail_resumes_bit_identically(tmp_path, monkeypatch, name):
    config = make_race_config(
        SAFE_LR, **dict(TINY, steps=8, evals_per_epoch=4), models=("cnn",), optimizers=(name,)
    )
    OptimRace(config, tmp_path / "reference", progress=False).run()
    _interrupt_after(monkeypatch, 5)  # after the checkpoint of step 3, before the one of step 6
    with pytest.raises(KeyboardInterrupt):
        OptimRace(config, tmp_path / "resumed", progress=False).run()
    monkeypatch.undo()
    results = tmp_path / "resumed" / "results.jsonl"
    with results.open("ab") as stream:
        stream.write(b'{"type": "eval", "phase": "cnn", "optimi')  # killed mid-record
    OptimRace(config, tmp_path / "resumed", progress=False).run()
    assert results.read_bytes().endswith(b"\n")
    drop = ("time_s",)  # measured, so it differs
    reference, resumed = (
        [{k: v for k, v in r.items() if k not in drop} for r in ResultsStore(f).evaluations()]
        for f in (tmp_path / "reference", tmp_path / "resumed")
    )
    assert resumed == reference


def _eval(model, name, seed, step, acc, time_s, lr=0.1):
    return {
        "type": "eval",
        "phase": model,
        "optimizer": name,
        "seed": seed,
        "step": step,
        "lr": lr,
        "test_acc": acc,
        "time_s": time_s,
        "train_loss": 1.0,
    }


@pytest.fixture
def hand_made(tmp_path):
    """Two seeds of SGD that reach 0.8, one of two Adam seeds that does (the other diverges)."""
    store = ResultsStore(tmp_path / "hand")
    store.open({"experiment": "optim-race"})
    for record in [
        # sgd seed 1: 0.6 at step 10 (2 s), 0.9 at step 20 (4 s): 0.8 at step 16.67, 3.33 s
        _eval("cnn", "sgd", 1, 0, 0.1, 0.0),
        _eval("cnn", "sgd", 1, 10, 0.6, 2.0),
        _eval("cnn", "sgd", 1, 20, 0.9, 4.0),
        # sgd seed 2: 0.8 exactly at step 10 (3 s), last 0.85
        _eval("cnn", "sgd", 2, 0, 0.1, 0.0),
        _eval("cnn", "sgd", 2, 10, 0.8, 3.0),
        _eval("cnn", "sgd", 2, 20, 0.85, 5.0),
        # adam seed 1: 0.7 then 0.9 (step 15, 1.5 s); seed 2: stays at 0.5 and diverges
        _eval("cnn", "adam", 1, 0, 0.7, 0.0, lr=0.01),
        _eval("cnn", "adam", 1, 20, 0.9, 3.0, lr=0.01),
        _eval("cnn", "adam", 2, 0, 0.5, 0.0, lr=0.01),
        {"type": "diverged", "phase": "cnn", "optimizer": "adam", "seed": 2, "step": 3},
    ]:
        store.append(record)
    return tmp_path / "hand"


def test_time_to_accuracy_against_a_hand_computed_example(hand_made):
    sgd, adam = time_to_accuracy(hand_made, 0.8)  # SGD first: OPTIMIZERS order
    assert (sgd["optimizer"], sgd["reached"], sgd["diverged"]) == ("sgd", [1, 2], [])
    assert sgd["steps"] == pytest.approx((50 / 3 + 10) / 2)
    assert sgd["steps_std"] == pytest.approx(math.sqrt(2) * (50 / 3 - 10) / 2)
    assert sgd["time_s"] == pytest.approx((10 / 3 + 3) / 2)
    assert sgd["final_acc"] == pytest.approx(0.875)
    assert sgd["final_acc_std"] == pytest.approx(math.sqrt(2) * 0.025)
    assert (adam["reached"], adam["diverged"], adam["lr"]) == ([1], [2], 0.01)
    assert adam["steps"] == pytest.approx(10) and adam["time_s"] == pytest.approx(1.5)
    assert adam["final_acc"] == pytest.approx(0.7)


def test_the_table_prints_the_rows(hand_made):
    lines = time_to_accuracy_table(hand_made, 0.8).splitlines()
    assert lines[0].startswith("| model | optimizer | lr | reached 0.8 |")
    assert lines[2] == ("| cnn | sgd | 0.1 | 2/2 | 13 ± 5 | 3.2 ± 0.2 | 0.8750 ± 0.0354 | - |")
    assert lines[3] == "| cnn | adam | 0.01 | 1/2 | 10 | 1.5 | 0.7000 ± 0.2828 | seed 2 |"


def test_a_threshold_no_run_reaches_and_one_every_run_starts_at(hand_made):
    assert all(r["steps"] is None for r in time_to_accuracy(hand_made, 0.95))
    assert [r["steps"] for r in time_to_accuracy(hand_made, 0.0)] == [0.0, 0.0]


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_a_threshold_outside_zero_one_is_refused(hand_made, threshold):
    with pytest.raises(ValueError, match="threshold must be a test accuracy in"):
        time_to_accuracy(hand_made, threshold)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(optimizers=("lbfgs",)), r"unknown optimizers \['lbfgs'\]"),
        (dict(models=("resnet",)), r"unknown models \['resnet'\]"),
        (dict(lr={"shampoo": 0.1}), r"unknown optimizers \['shampoo'\] in lr"),
        (dict(dataset="cifar10"), "28x28 images"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(nesterov=True), r"unknown settings \['nesterov'\]"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_race_config(**kwargs)


def test_cli_run_summary_export_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "bundled", "--steps", "4", "--evals-per-epoch", "7", "--no-progress"]
    args = ["run", "optim-race", "--models", "cnn", "--optimizers", "sgd,kfac", *common]
    assert main([*args, "--lr", "sgd=0.05", "--out", str(out)]) == 0
    assert {(r["optimizer"], r["lr"]) for r in ResultsStore(out).evaluations()} == {
        ("sgd", 0.05),
        ("kfac", make_race_config().lr["cnn"]["kfac"]),
    }
    assert (out / "optim_race_cnn.png").is_file()
    archive = export_records(out, tmp_path / "race.jsonl.gz")
    capsys.readouterr()
    assert main(["summary", str(archive), "--at-test-acc", "0.3"]) == 0
    assert capsys.readouterr().out.strip() == time_to_accuracy_table(archive, 0.3)
    with gzip.open(archive) as stream:
        assert json.loads(stream.readline())["config"]["experiment"] == "optim-race"
    assert [p.name for p in plot_race(archive, tmp_path)] == ["optim_race_cnn.png"]


def test_cli_sweep_picks_a_rate_per_model_on_the_validation_split(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "optim-race", "--models", "cnn", "--optimizer", "adam", "--lrs", "1e-4,3e-3"]
    common = ["--dataset", "bundled", "--steps", "4", "--no-progress", "--out", str(out)]
    assert main([*args, *common]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert report["rank_by"] == "val_loss"
    assert report["best"]["lr"] == min(report["rows"], key=lambda r: r["val_loss"])["lr"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "optim-race", "--subset", "64"], "--subset belong to the other experiments"),
        (["run", "fullbatch", "--models", "cnn"], "--models belongs to optim-race"),
        (["sweep", "optim-race", "--optimizer", "sgd", "--lrs", "0.1"], "give one model"),
        (
            ["sweep", "fullbatch", "--optimizer", "sgd", "--lrs", "0.1", "--models", "cnn"],
            "--models",
        ),
    ],
)
def test_cli_refuses_options_of_other_experiments(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "optim-race", "--optimizers", "lbfgs"], "--optimizers"),
        (["run", "optim-race", "--lr", "lbfgs=0.1"], "--lr"),
        (["summary", "runs/none", "--at-test-acc", "1.5"], "--at-test-acc"),
    ],
)
def test_cli_bad_values_exit_with_a_message_naming_the_option(capsys, args, message):
    with pytest.raises(SystemExit) as exit_code:
        main(args)
    assert exit_code.value.code == 2
    assert message in capsys.readouterr().err


def test_unsupported_pairs_are_skipped_and_said(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(optim_race.UNSUPPORTED, ("revmlp", "adahesscale"), "a reason")
    config = make_race_config(**TINY, models=("revmlp",), optimizers=("adahesscale",))
    OptimRace(config, tmp_path, progress=False).run()
    assert ResultsStore(tmp_path).evaluations() == []
    assert "skipping revmlp adahesscale" in capsys.readouterr().out


def test_the_models_take_fashion_mnist_images():
    config = make_race_config()
    for name in MODELS:
        model = optim_race.build_model(name, config)
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def _losses(*losses, seed=1, name="rootfree-adam"):
    return [
        _eval("cnn", name, seed, 10 * i, 0.5, float(i)) | {"train_loss": loss}
        for i, loss in enumerate(losses)
    ]


def test_blow_up_is_a_rise_over_the_lowest_earlier_loss():
    assert blow_up(_losses(2.3, 0.5, 0.4, 0.9, 3.0)) is None  # noise, and 7.5x the lowest
    assert blow_up(_losses(2.3, 0.5, 0.38, 327.0, 200.0)) == 30  # the CNN seed 44's shape
    assert blow_up(_losses(2.3, 0.5, 0.38, 327.0)[::-1]) == 30  # in any order
    assert blow_up(_losses(2.3, 0.5, 0.38, 3.0), factor=5) == 30
    assert blow_up(_losses(2.3, float("nan"), 0.4)) is None  # non-finite: divergence's job


def test_the_summary_flags_a_blow_up_under_the_divergence_bound(tmp_path):
    store = ResultsStore(tmp_path / "blown")
    store.open({"experiment": "optim-race"})
    for record in (
        _losses(2.3, 0.5, 0.38, 327.0, 200.0, seed=44)
        + _losses(2.3, 0.5, 0.4, seed=42)
        + _losses(2.3, 0.1, 9.0, seed=43)  # blew up, but diverged: reported as diverged
        + [{"type": "diverged", "phase": "cnn", "optimizer": "rootfree-adam", "seed": 43}]
    ):
        store.append(record)
    (row,) = time_to_accuracy(tmp_path / "blown", 0.8)
    assert (row["diverged"], row["blew_up"]) == ([43], {44: 30})
    assert (
        time_to_accuracy_table(tmp_path / "blown", 0.8)
        .splitlines()[2]
        .endswith("| seed 43, seed 44 blew up at 30 |")
    )


def test_the_runner_records_a_blow_up_and_goes_on(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(model, x, y, loss="ce", chunk=4096):  # train, test, val per evaluation
        calls.append(None)
        return [2.3, 0.5, 30.0, 20.0][(len(calls) - 1) // 3], 0.5

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    config = make_race_config(SAFE_LR, **TINY, models=("cnn",), optimizers=("sgd",))
    OptimRace(config, tmp_path, progress=False).run()
    records = sorted(ResultsStore(tmp_path).evaluations(), key=lambda r: r["step"])
    assert [r["step"] for r in records] == [0, 2, 4, 6]  # not stopped, not diverged
    assert [r["blew_up"] for r in records] == [False, False, True, True]
    assert ResultsStore(tmp_path).diverged() == []
