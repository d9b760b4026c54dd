"""``curvlab summary --per-source``: a sweep's points side by side, each with its setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from curvlab.cli import main, per_source_table
from curvlab.experiments.plots import summary, summary_at_train_loss

TINY = [
    "--subset",
    "32",
    "--steps",
    "3",
    "--hidden",
    "64",
    "--depth",
    "2",
    "--no-progress",
    "--validation",
    "50",
]


def _sweep(out: Path, seeds: str) -> Path:
    """GN's sweep over two rates and two dampings, for ``seeds``, into ``out``."""
    args = ["sweep", "fullbatch", *TINY, "--seeds", seeds, "--optimizer", "gn-right-inverse"]
    assert main([*args, "--lrs", "0.5,1", "--dampings", "0,10", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory.mktemp("sweep"), "1,2")


def _rows(table: str) -> list[dict[str, str]]:
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_every_point_is_a_row_with_its_rate_damping_and_own_means(sweep):
    points = sorted(sweep.glob("lr=*"))
    assert len(points) == 4
    rows = _rows(per_source_table(points))
    assert [(r["lr"], r["damping"]) for r in rows] == [
        (p.name.split(",")[0][3:], p.name.split("=")[-1]) for p in points
    ]
    for row, point in zip(rows, points):
        (expected,) = summary(point)
        assert row["seeds"] == "2"
        mean, std = (float(x) for x in row["val loss"].split(" ± "))
        assert mean == pytest.approx(expected["val_loss"], abs=5e-5)
        assert std == pytest.approx(expected["val_loss_std"], abs=5e-5)
    assert len({r["val loss"] for r in rows}) == 4  # the points differ


def test_at_equal_training_loss_every_point_is_its_own_crossing(sweep):
    points = sorted(sweep.glob("lr=*"))
    target = 1.0
    rows = _rows(per_source_table(points, target))
    assert len(rows) == 4 and all(r["train loss"] == "1" for r in rows)
    for row, point in zip(rows, points):
        (expected,) = summary_at_train_loss(point, target)
        if expected["seeds"] == 0:
            assert row["test loss"] == "-"
            continue
        assert float(row["test loss"].split(" ± ")[0]) == pytest.approx(
            expected["test_loss"], abs=5e-5
        )
        assert row["not reached"] == (", ".join(f"seed {s}" for s in expected["missed"]) or "-")


def test_the_command_prints_it(sweep, capsys):
    points = [str(p) for p in sorted(sweep.glob("lr=*"))]
    assert main(["summary", "--per-source", *points]) == 0
    assert capsys.readouterr().out.strip() == per_source_table([Path(p) for p in points])
    assert main(["summary", "--per-source", "--at-train-loss", "1", *points]) == 0
    assert capsys.readouterr().out.strip() == per_source_table([Path(p) for p in points], 1.0)


@pytest.fixture(scope="module")
def later_seed(tmp_path_factory) -> Path:
    """Seed 3 of the same sweep, run later into a folder of its own."""
    return _sweep(tmp_path_factory.mktemp("seed3"), "3")


def test_a_point_whose_seeds_lie_in_two_sources_is_one_row(sweep, later_seed):
    names = sorted(p.name for p in sweep.glob("lr=*"))
    joined = [f"{sweep / name}+{later_seed / name}" for name in names]
    rows = _rows(per_source_table(joined))
    assert [(r["lr"], r["damping"], r["seeds"]) for r in rows] == [
        (n.split(",")[0][3:], n.split("=")[-1], "3") for n in names
    ]
    for row, name in zip(rows, names):
        (expected,) = summary([sweep / name, later_seed / name])
        mean, std = (float(x) for x in row["val loss"].split(" ± "))
        assert mean == pytest.approx(expected["val_loss"], abs=5e-5)
        assert std == pytest.approx(expected["val_loss_std"], abs=5e-5)


def test_parts_at_different_settings_are_refused(sweep, later_seed, capsys):
    a, b = sorted(sweep.glob("lr=*"))[:2]
    other = later_seed / b.name
    with pytest.raises(ValueError, match="different settings"):
        per_source_table([f"{a}+{other}"])
    assert main(["summary", "--per-source", f"{a}+{other}"]) == 2
    assert "different settings" in capsys.readouterr().err
