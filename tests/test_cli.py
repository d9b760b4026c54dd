"""The curvlab command: bad input exits with code 2 and names the option; help and version."""

from __future__ import annotations

import argparse
import re

import pytest

from curvlab import __version__
from curvlab.cli import build_parser, main
from curvlab.experiments import ResultsStore
from curvlab.experiments.config import BUNDLED_DEFAULTS
from curvlab.experiments.runner import Runner

TINY = ["--subset", "64", "--steps", "1", "--hidden", "96", "--depth", "2", "--no-progress"]
TINY += ["--optimizers", "adam", "--eval-train-size", "64", "--no-plot"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--subset", "0"),
        ("--subset", "-5"),
        ("--eval-every", "0"),
        ("--steps", "0"),
        ("--epochs", "-1"),
        ("--hidden", "0"),
        ("--hidden", "wide"),
        ("--seeds", ""),
        ("--seeds", ","),
        ("--seeds", "-1"),
        ("--batch-size", "0"),
        ("--depth", "0"),
        ("--evals-per-epoch", "0"),
        ("--eval-train-size", "0"),
        ("--optimizers", ""),
        ("--optimizers", "gn,lbfgs"),
        ("--lr", "gn=0"),
        ("--damping", "-1"),
        ("--diverge-factor", "1"),
    ],
)
def test_bad_run_option_exits_2_naming_it(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "fullbatch", option, value, "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected" in capsys.readouterr().err
    assert not out.exists()


def test_empty_sweep_rates_exit_2_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "fullbatch", "--optimizer", "sgd", "--lrs", ""])
    assert exit_info.value.code == 2 and "argument --lrs: expected" in capsys.readouterr().err


def test_a_setting_the_data_cannot_satisfy_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "fullbatch", *TINY, "--out", str(out)]
    assert main([*args, "--subset", "5000"]) == 2
    assert "subset=5000 exceeds the 2048 training images" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()
    assert main(args) == 0


def test_a_config_error_at_the_first_update_does_not_block_the_corrected_command(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "fullbatch", *TINY, "--optimizers", "gn", "--out", str(out)]
    assert main([*args, "--hidden", "8"]) == 2  # ExactGN: no exact right inverse at N = 64
    assert "hidden >= N" in capsys.readouterr().err
    assert main(args) == 0
    assert ResultsStore(out).config()["hidden"] == 96


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_summary_of_a_folder_without_results_is_an_error_naming_it(tmp_path, capsys, folder):
    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
    assert main(["summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"no results in {path}" in err


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "cifar10"])
@pytest.mark.parametrize("with_data", [True, False])
def test_missing_data_error_names_the_data_option(
    tmp_path, capsys, monkeypatch, dataset, with_data
):
    monkeypatch.delenv("CURVLAB_DATA", raising=False)
    monkeypatch.setattr("curvlab.data.paths.SYSTEM_DIRS", {dataset: (tmp_path / "system",)})
    args = ["run", "fullbatch", "--dataset", dataset, "--out", str(tmp_path / "run")]
    if with_data:
        args += ["--data", str(tmp_path / "none")]
    assert main(args) == 2
    err = capsys.readouterr().err.replace(str(tmp_path), "TMP")  # the path may hold "root"
    assert "--data" in err and "root" not in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_message_starts_below_the_progress_bar(tmp_path, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "run", interrupted)
    assert main(["run", "fullbatch", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.startswith("\ncurvlab: interrupted;")


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"curvlab {__version__}\n"


@pytest.mark.parametrize("command", [None, "run", "plot", "summary", "sweep"])
def test_help_has_no_rest_markup(command):
    parser = build_parser() if command is None else _subparsers()[command]
    text = parser.format_help()
    assert "``" not in text and not re.search(r":[a-z]+:`", text), text


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_every_option_has_help_that_shows_its_default(command):
    for action in _subparsers()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings or action.dest
        assert re.search(r"\((default: .+|required)\)", action.help), action.help


def test_help_shows_the_smaller_defaults_of_the_bundled_subset():
    actions = {a.dest: a for a in _subparsers()["run"]._actions}
    for name, value in BUNDLED_DEFAULTS.items():
        assert f"default: {value} with --dataset bundled, else " in actions[name].help, name
