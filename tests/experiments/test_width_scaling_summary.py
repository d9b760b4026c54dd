"""The width study's per-family settings, resume with changed settings, archive and summary."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvlab.cli import main
from curvlab.experiments import ResultsStore
from curvlab.experiments.store import ConfigMismatchError, export_records
from curvlab.experiments.width_scaling import (
    TABLE_COLUMNS,
    WidthScaling,
    WidthScalingConfig,
    is_width_study,
    width_records,
    width_summary_table,
)
from tests.experiments.sourced_tables import sourced_tables

ROOT = Path(__file__).resolve().parents[2]
#: ``<!-- curvlab summary docs/records/width-scaling-NAME.jsonl.gz -->`` before a table.
SOURCE = re.compile(r"^<!-- curvlab summary (docs/records/width-scaling-[\w.=-]+\.jsonl\.gz) -->$")

TINY = dict(
    seeds=(1, 2),
    mlp_widths=(8,),
    cnn_widths=(2,),
    depth=2,
    train_size=32,
    steps=4,
    probe=8,
    test_size=64,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-seed run with CNN-only steps and rate factor."""
    folder = tmp_path_factory.mktemp("width")
    config = WidthScalingConfig(**TINY, cnn_steps=6, cnn_lr=0.5, lr=1.5)
    WidthScaling(config, folder, progress=False).run()
    return folder, config


def test_the_cnns_take_their_own_steps_and_rate_factor(run):
    folder, config = run
    records = width_records(folder)
    assert {r["family"] for r in records} == {"mlp", "cnn"}
    for r in records:
        steps, factor = (6, 0.5) if r["family"] == "cnn" else (4, 1.5)
        assert r["steps"] == steps
        assert r["lr"] == pytest.approx(factor * config.probe / r["ntk_max_eig"])
    assert config.steps_of("mlp") == 4 and config.lr_of("mlp") == 1.5
    # without the CNN settings both families share steps and lr
    shared = WidthScalingConfig(**TINY)
    assert shared.steps_of("cnn") == shared.steps and shared.lr_of("cnn") == shared.lr


def test_the_forgetting_unit_matches_a_direct_computation(tmp_path):
    config = WidthScalingConfig(**{**TINY, "seeds": (1,), "families": ("mlp",)})
    WidthScaling(config, tmp_path, progress=False).run()
    (record,) = [r for r in width_records(tmp_path) if r["question"] == "forgetting"]
    runner = WidthScaling(config, tmp_path)
    data = runner._data()
    task_a, task_b = runner._subset(data, 1, range(5)), runner._subset(data, 1, range(5, 10))
    model = runner._model("mlp", 8, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=record["lr"])
    on_a = data["test_y"] < 5
    x_test, y_test = data["test_x"][on_a], data["test_y"][on_a]

    def train(x, y):
        for _ in range(config.steps // 2):
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sgd.step()

    def accuracies():  # 10-way, and within task A's classes 0-4
        with torch.no_grad():
            logits = model(x_test)
        return (
            float((logits.argmax(1) == y_test).double().mean()),
            float((logits[:, :5].argmax(1) == y_test).double().mean()),
        )

    train(*task_a)
    full_a, within_a = accuracies()
    train(*task_b)
    full_b, within_b = accuracies()
    assert record["net_acc_a_after_a"] == pytest.approx(full_a)
    assert record["net_acc_a_after_b"] == pytest.approx(full_b)
    assert record["net_task_acc_a_after_a"] == pytest.approx(within_a)
    assert record["net_task_acc_a_after_b"] == pytest.approx(within_b)
    assert record["net_task_forgetting"] == pytest.approx(within_a - within_b)
    assert record["net_forgetting"] == pytest.approx(full_a - full_b)
    for key in ("lin_task_acc_a_after_a", "lin_task_acc_a_after_b", "lin_acc_a_after_b"):
        assert 0 <= record[key] <= 1


def test_the_summary_table_is_the_mean_and_std_over_seeds(run):
    folder, _ = run
    table = width_summary_table(folder).splitlines()
    assert table[0].startswith("| family | width | seeds | test acc net / lin |")
    assert len(table) == 2 + 2  # head, rule, MLP 8, CNN 2
    records = width_records(folder)
    for line, family in zip(table[2:], ("mlp", "cnn"), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [family.upper(), "8" if family == "mlp" else "2", "2"]
        for cell, (question, _, fields) in zip(cells[3:], TABLE_COLUMNS, strict=True):
            of = [r for r in records if r["family"] == family and r["question"] == question]
            expected = []
            for field in fields:
                values = [r[field] for r in of]
                assert len(values) == 2
                expected.append(f"{np.mean(values):.3g} ± {np.std(values, ddof=1):.2g}")
            assert cell == " / ".join(expected)


def test_the_archive_keeps_the_units_and_curvlab_summary_prints_the_table(run, tmp_path, capsys):
    folder, _ = run
    archive = export_records(folder, tmp_path / "width.jsonl.gz")
    assert width_records(archive) == width_records(folder)
    assert is_width_study(archive) and is_width_study(folder)
    assert not is_width_study(tmp_path / "missing")
    assert main(["summary", str(archive)]) == 0
    assert capsys.readouterr().out.strip() == width_summary_table(folder)
    assert main(["summary", str(archive), "--per-source"]) == 2
    assert "a width study's summary takes one folder" in capsys.readouterr().err


def test_a_run_with_units_resumes_with_more_seeds_and_refuses_other_changes(tmp_path):
    config = WidthScalingConfig(**{**TINY, "seeds": (1,), "families": ("mlp",)})
    WidthScaling(config, tmp_path, progress=False).run()
    first = width_records(tmp_path)
    assert len(first) == 2
    with pytest.raises(ConfigMismatchError, match=r"differs in \['steps'\]"):
        WidthScaling(
            WidthScalingConfig(**{**TINY, "seeds": (1,), "families": ("mlp",), "steps": 8}),
            tmp_path,
            progress=False,
        ).run()
    assert width_records(tmp_path) == first  # nothing dropped
    more = WidthScalingConfig(**{**TINY, "seeds": (1, 2), "families": ("mlp",)})
    WidthScaling(more, tmp_path, progress=False).run()
    records = width_records(tmp_path)
    assert len(records) == 4 and [r for r in records if r["seed"] == 1] == first
    assert ResultsStore(tmp_path).config()["seeds"] == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cnn_steps": 1}, "cnn_steps must be >= 2"),
        ({"cnn_steps": 2.5}, "cnn_steps must be a positive integer"),
        ({"cnn_lr": 0.0}, "cnn_lr must be > 0"),
        ({"cnn_lr": True}, "cnn_lr must be > 0"),
    ],
)
def test_bad_cnn_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WidthScalingConfig(**kwargs).check()


@pytest.mark.parametrize(
    ("flag", "value", "match"),
    [("--cnn-steps", "1", "--cnn-steps"), ("--cnn-lr", "-1", "--cnn-lr")],
)
def test_the_cli_names_bad_cnn_options(flag, value, match, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "width-scaling", flag, value, "--out", str(tmp_path)])
    assert match in capsys.readouterr().err


def test_the_cnn_options_belong_to_width_scaling(tmp_path, capsys):
    assert main(["run", "fullbatch", "--cnn-steps", "10", "--out", str(tmp_path)]) == 2
    assert "--cnn-steps belong to width-scaling" in capsys.readouterr().err


def test_the_width_table_of_docs_ntk_equals_the_summary_of_its_committed_records():
    tables = sourced_tables(ROOT / "docs" / "ntk.md", SOURCE)
    assert tables, "docs/ntk.md has no width table sourced from docs/records"
    for path, table in tables:
        records = ROOT / path
        assert records.is_file(), f"{path} is not committed"
        assert records.stat().st_size < 300_000
        assert table == width_summary_table(records)
