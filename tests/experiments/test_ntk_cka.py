"""The ``ntk-cka`` experiment (Figure 4): its records, their checkpointed references, its figure.

One run of the bundled defaults (every GN scheme, Adam, SGD) through the command line is shared
by the tests that read it; the kill-and-resume test uses a tinier config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from curvlab.cli import main, summary_table
from curvlab.diagnostics import empirical_ntk, linear_cka, ntk_change, ntk_similarity
from curvlab.diagnostics.cka import record_representations
from curvlab.experiments import ResultsStore, Runner, make_config
from curvlab.experiments import runner as runner_module
from curvlab.experiments.config import GN_VARIANTS
from curvlab.experiments.ntk_cka import FIELDS, KernelTracker, block_roles
from curvlab.experiments.plots import LABELS, run_figures
from curvlab.experiments.store import RESULTS_FILE
from curvlab.nn import RevMLP

OPTIMIZERS = (*GN_VARIANTS, "adam", "sgd")
TINY = dict(
    subset=32,
    steps=4,
    hidden=64,
    depth=3,
    eval_every=1,
    eval_train_size=32,
    ntk_probe=16,
    optimizers=("gn-pinv", "adam"),
)


class Killed(BaseException):
    """The process dies here (nothing may catch it)."""


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory) -> Path:
    """``curvlab run ntk-cka`` with the bundled defaults, figure included."""
    folder = tmp_path_factory.mktemp("ntk-cka")
    assert main(["run", "ntk-cka", "--out", str(folder), "--no-progress"]) == 0
    return folder


def test_every_gn_scheme_adam_and_sgd_are_recorded(bundled_run):
    evals = ResultsStore(bundled_run).evaluations()
    assert {r["optimizer"] for r in evals} == set(OPTIMIZERS)


def test_step_zero_has_similarity_one_change_zero_and_cka_one(bundled_run):
    first = [r for r in ResultsStore(bundled_run).evaluations() if r["step"] == 0]
    assert len(first) == len(OPTIMIZERS)
    for r in first:
        assert r["ntk_similarity"] == pytest.approx(1.0, abs=1e-6)
        assert r["ntk_change"] == pytest.approx(0.0, abs=1e-6)
        assert r["ntk_rate"] is None
        assert [r[f"cka_{role}"] for role in ("first", "middle", "last")] == pytest.approx(
            [1.0] * 3, abs=1e-9
        )


@pytest.mark.parametrize("optimizer", ["gn-pinv", "adam"])
def test_records_match_a_direct_computation_on_the_checkpoint(bundled_run, optimizer):
    store = ResultsStore(bundled_run)
    config = make_config("ntk-cka", "bundled")
    assert store.config() == json.loads(json.dumps(config.to_dict()))
    runner = Runner(config, bundled_run, progress=False)
    data = runner_module.load_data(config, torch.device("cpu"))
    probe = runner._train_set("fullbatch", 42, data)[0][: config.ntk_probe]
    init = runner._model(42, data)
    state = torch.load(
        store.checkpoint_path("fullbatch", optimizer, 42), map_location="cpu", weights_only=True
    )
    model = runner._model(42, data)
    model.load_state_dict(state["model"])
    last = [r for r in store.evaluations() if r["optimizer"] == optimizer][-1]
    assert last["step"] == state["step"] == config.steps

    ntk0, ntk = empirical_ntk(init, probe), empirical_ntk(model, probe)
    torch.testing.assert_close(state["ntk"]["initial"], ntk0)
    roles = block_roles(model)
    before = record_representations(init, probe, list(roles.values()))
    after = record_representations(model, probe, list(roles.values()))
    direct = {
        "ntk_similarity": float(ntk_similarity(ntk0, ntk)),
        "ntk_change": float(ntk_change(ntk0, ntk)),
        **{f"cka_{r}": float(linear_cka(before[n], after[n])) for r, n in roles.items()},
    }
    assert {k: last[k] for k in direct} == pytest.approx(direct, rel=1e-5, abs=1e-7)


def test_figure_4_has_ntk_and_cka_panels_and_one_legend_of_every_optimizer(bundled_run):
    assert (bundled_run / "fig4_ntk_cka.png").stat().st_size > 0
    fig = run_figures(bundled_run)["fig4_ntk_cka.png"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "NTK similarity to init",
        "NTK rate of change",
        "CKA to init: first block",
        "CKA to init: middle block",
        "CKA to init: last block",
    ]
    assert all(ax.get_xlabel().startswith("update") and ax.get_ylabel() for ax in fig.axes)
    (legend,) = fig.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert [label.split(" (diverged")[0] for label in labels] == [LABELS[o] for o in OPTIMIZERS]
    assert "seed 42" in fig._suptitle.get_text()


# ---------------------------------------------------------------------------------- resuming
@pytest.fixture
def cached_data(monkeypatch):
    config = make_config("ntk-cka", "bundled", **TINY)
    full = runner_module.load_data(config, torch.device("cpu"))
    data = dataclasses.replace(full, test_x=full.test_x[:64], test_y=full.test_y[:64])
    monkeypatch.setattr(runner_module, "load_data", lambda config, device: data)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # a simulated kill keeps the page cache


def _run(folder: Path) -> None:
    Runner(make_config("ntk-cka", "bundled", **TINY), folder, progress=False).run()


def _results(folder: Path) -> list[tuple]:
    keys = ("optimizer", "step", "train_loss", "test_loss", *FIELDS)
    return [tuple(r[k] for k in keys) for r in ResultsStore(folder).evaluations()]


def test_killed_and_resumed_run_gives_the_uninterrupted_records(tmp_path, monkeypatch, cached_data):
    _run(tmp_path / "reference")
    reference = _results(tmp_path / "reference")
    assert len(reference) == 2 * (TINY["steps"] + 1)

    # appends: gn-pinv evals 0-4, adam evals 0, 1, 2 <- killed after writing it (checkpoint: 1)
    folder = tmp_path / "killed"
    original = runner_module.ResultsStore.append
    count = {"n": 0}

    def append(self, record):
        count["n"] += 1
        original(self, record)
        if count["n"] == 8:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(runner_module.ResultsStore, "append", append)
        with pytest.raises(Killed):
            _run(folder)
    results = folder / RESULTS_FILE
    checkpoint = ResultsStore(folder).checkpoint_path("fullbatch", "adam", 42)
    content, state = results.read_bytes(), checkpoint.read_bytes()
    assert torch.load(checkpoint, weights_only=True)["step"] == 1
    last = content[:-1].rfind(b"\n") + 1

    def no_start(self, model):
        raise AssertionError("a resumed run must reload the initial NTK, not recompute it")

    monkeypatch.setattr(KernelTracker, "start", no_start)
    record = len(content) - last
    for offset in sorted({0, 1, record // 2, record - 1, record}):
        results.write_bytes(content[: last + offset])
        checkpoint.write_bytes(state)
        _run(folder)
        assert _results(folder) == reference, f"killed at byte {offset} of the record"


def test_ntk_cka_trains_exactly_as_fullbatch(tmp_path, cached_data):
    """The kernel and CKA probes draw no random numbers and touch no parameter: the training
    curves of an ``ntk-cka`` run are the ``fullbatch`` run's of the same settings, bit for bit
    (docs/reproduction.md takes the schemes' side-by-side comparison from ``ntk-cka`` records)."""
    _run(tmp_path / "ntk")
    Runner(make_config("fullbatch", "bundled", **TINY), tmp_path / "fb", progress=False).run()
    keys = ("optimizer", "seed", "step", "train_loss", "test_loss", "test_acc")
    ntk, plain = (
        [tuple(r[k] for k in keys) for r in ResultsStore(tmp_path / name).evaluations()]
        for name in ("ntk", "fb")
    )
    assert len(ntk) == 2 * (TINY["steps"] + 1)
    assert ntk == plain


def test_summary_table_shows_the_last_kernel_and_cka_values(bundled_run):
    table = summary_table(bundled_run).splitlines()
    head = [cell.strip() for cell in table[0].strip("|").split("|")]
    for heading in ("NTK similarity", "NTK change", "CKA first", "CKA middle", "CKA last"):
        assert heading in head
    evals = ResultsStore(bundled_run).evaluations()
    for line in table[2:]:
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        last = max(
            (r for r in evals if r["optimizer"] == cells["optimizer"]), key=lambda r: r["step"]
        )
        assert float(cells["NTK similarity"]) == pytest.approx(last["ntk_similarity"], abs=5e-5)
        assert float(cells["CKA last"]) == pytest.approx(last["cka_last"], abs=5e-5)


# ---------------------------------------------------------------------------------- settings
def test_a_gn_variant_takes_gns_rate_unless_named_and_builds_its_scheme():
    config = make_config("ntk-cka", "bundled", lr={"fullbatch": {"gn-pinv": 1.5}})
    assert config.optimizers == OPTIMIZERS
    assert config.learning_rate("fullbatch", "gn-pinv") == 1.5
    assert config.learning_rate("fullbatch", "gn-paper") == config.lr["fullbatch"]["gn"]
    model = RevMLP(784, 10, 32, 2)
    schemes = [
        runner_module.build_optimizer(name, model, 1.0, config).scheme for name in GN_VARIANTS
    ]
    assert schemes == ["right-inverse", "pinv", "paper"]


def test_a_probe_larger_than_the_training_subset_is_refused(tmp_path, capsys):
    code = main(["run", "ntk-cka", "--subset", "32", "--ntk-probe", "64", "--out", str(tmp_path)])
    assert code == 2 and "ntk_probe=64 exceeds the 32 training images" in capsys.readouterr().err
    assert not (tmp_path / RESULTS_FILE).exists()
