"""The width study's per-family settings, resume with changed settings, archive and summary."""

from __future__ import annotations

import numpy as np
import pytest

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
