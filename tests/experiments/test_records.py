"""Validation split, archived records, spread over seeds and equal-training-loss summaries."""

from __future__ import annotations

import gzip
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from curvlab.cli import main, summary_table
from curvlab.data import load_dataset
from curvlab.experiments import ResultsStore, Runner, make_config
from curvlab.experiments.plots import (
    NoResultsError,
    plot_run,
    run_figures,
    summary,
    summary_at_train_loss,
)
from curvlab.experiments.runner import load_data, validation_split
from curvlab.experiments.store import ReadOnlyStoreError, export_records

TINY = dict(subset=64, steps=3, hidden=96, depth=2, eval_every=1, eval_train_size=64)


def test_validation_split_is_balanced_disjoint_and_the_same_for_every_seed():
    _, labels = load_dataset("bundled", "train")
    held, rest = validation_split(labels, 200)
    assert len(held) == 200 and len(rest) == len(labels) - 200
    assert set(held.tolist()).isdisjoint(rest.tolist())
    assert sorted(held.tolist() + rest.tolist()) == list(range(len(labels)))
    counts = torch.bincount(labels[held], minlength=10)
    assert counts.max() - counts.min() <= 1
    again, _ = validation_split(labels, 200)
    assert torch.equal(held, again)
    assert torch.equal(rest, torch.sort(rest).values), "the rest keeps the original order"


@pytest.mark.parametrize("size", [0, -1, 2048])
def test_validation_split_rejects_sizes_that_leave_nothing(size):
    _, labels = load_dataset("bundled", "train")
    with pytest.raises(ValueError, match="validation"):
        validation_split(labels, size)


def test_config_rejects_a_negative_validation_size():
    with pytest.raises(ValueError, match="validation"):
        make_config("fullbatch", "bundled", validation=-5)


def test_runs_never_train_on_the_validation_split(tmp_path):
    config = make_config("fullbatch", "bundled", validation=256, **TINY)
    data = load_data(config, torch.device("cpu"))
    assert len(data.train_x) == 2048 - 256 and len(data.val_x) == 256
    train_rows = {tuple(r.tolist()) for r in data.train_x[:, ::37]}
    assert not any(tuple(r.tolist()) in train_rows for r in data.val_x[:, ::37])
    Runner(config, tmp_path, progress=False).run()
    evals = ResultsStore(tmp_path).evaluations()
    assert all(0.0 <= r["val_acc"] <= 1.0 and math.isfinite(r["val_loss"]) for r in evals)


def _two_seed_run(folder):
    config = make_config("fullbatch", "bundled", seeds=(1, 2), optimizers=("adam", "sgd"), **TINY)
    Runner(config, folder, progress=False).run()
    return folder


def test_summary_reports_the_mean_and_sample_spread_over_seeds(tmp_path):
    folder = _two_seed_run(tmp_path)
    rows = {r["optimizer"]: r for r in summary(folder)}
    last = [
        r for r in ResultsStore(folder).evaluations() if r["optimizer"] == "adam" and r["step"] == 3
    ]
    values = [r["test_loss"] for r in last]
    assert rows["adam"]["seeds"] == 2
    assert rows["adam"]["test_loss"] == pytest.approx(np.mean(values))
    assert rows["adam"]["test_loss_std"] == pytest.approx(np.std(values, ddof=1))
    assert rows["adam"]["test_loss_std"] > 0, "two seeds train differently"
    assert f"{rows['adam']['test_loss']:.4f} ± {rows['adam']['test_loss_std']:.4f}" in (
        summary_table(folder)
    )


def test_an_exported_archive_rebuilds_the_same_tables_and_is_reproducible(tmp_path):
    folder = _two_seed_run(tmp_path / "run")
    archive = export_records(folder, tmp_path / "records" / "run.jsonl.gz")
    assert summary(archive) == summary(folder)
    assert summary_table(archive, 1.5) == summary_table(folder, 1.5)
    first = archive.read_bytes()
    export_records(folder, archive)
    assert archive.read_bytes() == first, "same records, same bytes"
    with gzip.open(archive, "rt") as stream:
        kinds = [json.loads(line)["type"] for line in stream]
    assert kinds[0] == "header" and kinds.count("eval") == 2 * 2 * 4
    paths = plot_run(archive)
    assert paths and all(p.parent == archive.parent and p.name.startswith("run-") for p in paths)
    with pytest.raises(ReadOnlyStoreError, match="archived"):
        ResultsStore(archive).append({"type": "eval"})
    with pytest.raises(ValueError, match=r"\.jsonl\.gz"):
        export_records(folder, tmp_path / "run.json")


def _line_data(figures) -> dict[str, list[list[float]]]:
    data = {
        name: [line.get_ydata().tolist() for ax in fig.axes for line in ax.get_lines()]
        for name, fig in figures.items()
    }
    for fig in figures.values():
        plt.close(fig)
    return data


def test_disjoint_sources_plot_as_the_run_that_holds_them_all(tmp_path, capsys):
    both = _two_seed_run(tmp_path / "both")
    for seed in (1, 2):
        config = make_config(
            "fullbatch", "bundled", seeds=(seed,), optimizers=("adam", "sgd"), **TINY
        )
        Runner(config, tmp_path / f"seed{seed}", progress=False).run()
    split = [tmp_path / "seed1", export_records(tmp_path / "seed2", tmp_path / "seed2.jsonl.gz")]
    expected = _line_data(run_figures(both))
    assert expected and all(expected.values())
    assert _line_data(run_figures(split)) == expected
    out = tmp_path / "figures"
    assert main(["plot", *map(str, split), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    assert main(["plot", *map(str, split)]) == 2
    assert "output folder" in capsys.readouterr().err
    with pytest.raises(NoResultsError, match="both record"):
        run_figures([both, tmp_path / "seed1"])
    narrow = make_config(
        "fullbatch", "bundled", seeds=(3,), optimizers=("adam",), **{**TINY, "hidden": 64}
    )
    Runner(narrow, tmp_path / "narrow", progress=False).run()
    with pytest.raises(NoResultsError, match="hidden=64"):
        run_figures([tmp_path / "seed1", tmp_path / "narrow"])


def test_an_archive_may_leave_out_superseded_optimizers(tmp_path, capsys):
    folder = _two_seed_run(tmp_path / "run")
    archive = export_records(folder, tmp_path / "no-sgd.jsonl.gz", exclude=["sgd"])
    rows = summary(archive)
    assert [r["optimizer"] for r in rows] == ["adam"]
    assert rows == [r for r in summary(folder) if r["optimizer"] == "adam"]
    with pytest.raises(ValueError, match=r"\['rmsprop'\].*records \['adam', 'sgd'\]"):
        export_records(folder, tmp_path / "x.jsonl.gz", exclude=["rmsprop"])
    out = tmp_path / "cli.jsonl.gz"
    assert main(["export", str(folder), str(out), "--exclude", "sgd"]) == 0
    assert out.read_bytes() == archive.read_bytes()


def test_an_archive_may_keep_only_some_seeds(tmp_path):
    folder = _two_seed_run(tmp_path / "run")
    archive = export_records(folder, tmp_path / "seed-2.jsonl.gz", seeds=[2])
    evaluations = ResultsStore(archive).evaluations()
    assert evaluations and {r["seed"] for r in evaluations} == {2}
    assert evaluations == [r for r in ResultsStore(folder).evaluations() if r["seed"] == 2]
    assert [r["seeds"] for r in summary(archive)] == [1, 1]
    with pytest.raises(ValueError, match=r"\[7\].*records seeds \[1, 2\]"):
        export_records(folder, tmp_path / "x.jsonl.gz", seeds=[7])
    out = tmp_path / "cli.jsonl.gz"
    assert main(["export", str(folder), str(out), "--seeds", "2"]) == 0
    assert out.read_bytes() == archive.read_bytes()


def _write_evals(folder, losses_by_seed):
    store = ResultsStore(folder)
    store.open({"experiment": "fullbatch"})
    for seed, losses in losses_by_seed.items():
        for step, (train, test) in enumerate(losses):
            store.append(
                {
                    "type": "eval",
                    "phase": "fullbatch",
                    "optimizer": "gn",
                    "seed": seed,
                    "step": step,
                    "epoch": float(step),
                    "train_loss": train,
                    "train_acc": 0.5,
                    "test_loss": test,
                    "test_acc": 0.5,
                    "time_s": float(step),
                }
            )
    return folder


def test_equal_train_loss_interpolates_in_log_loss_and_names_who_missed(tmp_path):
    # seed 1 crosses 0.1 half-way (in log) between step 1 (loss 1.0) and step 2 (loss 0.01)
    folder = _write_evals(
        tmp_path,
        {1: [(2.0, 3.0), (1.0, 2.0), (0.01, 1.0)], 2: [(2.0, 3.0), (1.5, 2.5), (0.5, 2.0)]},
    )
    (row,) = summary_at_train_loss(folder, 0.1)
    assert row["seeds"] == 1 and row["missed"] == [2]
    assert row["step"] == pytest.approx(1.5)
    assert row["test_loss"] == pytest.approx(1.5)
    assert row["time_s"] == pytest.approx(1.5)
    (early,) = summary_at_train_loss(folder, 5.0)
    assert early["step"] == 0 and early["seeds"] == 2
    with pytest.raises(ValueError, match="target"):
        summary_at_train_loss(folder, 0.0)


def test_cli_export_summary_and_sweep_by_validation_loss(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--dataset", "bundled", "--subset", "64", "--steps", "2", "--hidden", "96"]
    args += ["--depth", "2", "--eval-train-size", "64", "--no-progress", "--validation", "128"]
    assert main(["run", "fullbatch", *args, "--optimizers", "adam", "--out", str(run)]) == 0
    archive = tmp_path / "run.jsonl.gz"
    assert main(["export", str(run), str(archive)]) == 0
    capsys.readouterr()
    assert main(["summary", str(archive)]) == 0
    assert "val loss" in capsys.readouterr().out
    assert main(["summary", str(archive), "--at-train-loss", "100"]) == 0
    assert "| fullbatch | adam | 100 | 1 |" in capsys.readouterr().out
    out = tmp_path / "sweep"
    sweep = ["sweep", "fullbatch", *args, "--optimizer", "gn", "--lrs", "0.5,1"]
    assert main([*sweep, "--dampings", "0,1e-3", "--out", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert report["rank_by"] == "val_loss" and len(report["rows"]) == 4
    best = min(report["rows"], key=lambda r: r["val_loss"])
    assert report["best"]["lr"] == best["lr"] and report["best"]["damping"] == best["damping"]
    assert (out / "lr=1,damping=0.001" / "results.jsonl").exists()
    bad = ["sweep", "fullbatch", *args, "--optimizer", "adam", "--lrs", "1e-3", "--dampings", "0"]
    assert main(bad) == 2
    assert "--dampings applies to ExactGN" in capsys.readouterr().err


def test_disjoint_runs_of_several_archives_are_summarized_together(tmp_path):
    both = _two_seed_run(tmp_path / "both")
    one = make_config("fullbatch", "bundled", seeds=(1,), optimizers=("adam", "sgd"), **TINY)
    two = make_config("fullbatch", "bundled", seeds=(2,), optimizers=("adam", "sgd"), **TINY)
    Runner(one, tmp_path / "one", progress=False).run()
    Runner(two, tmp_path / "two", progress=False).run()
    parts = [export_records(tmp_path / n, tmp_path / f"{n}.jsonl.gz") for n in ("one", "two")]

    def timeless(rows):  # wall time differs between two runs of the same seed
        return [{k: v for k, v in r.items() if not k.startswith("time_s")} for r in rows]

    assert timeless(summary(parts)) == timeless(summary(both))
    with pytest.raises(NoResultsError, match="both record"):
        summary([parts[0], tmp_path / "both"])
