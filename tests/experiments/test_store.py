"""The results store survives a kill at every byte, and the last record of a key wins.

A kill is simulated where it can happen: during the ``write`` of a record (the file then ends in
any prefix of that record's line), and during the write of a checkpoint (a partial temporary
file). Every resumed run must equal the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from curvlab.experiments import ResultsStore, Runner, make_config
from curvlab.experiments import runner as runner_module
from curvlab.experiments.store import RESULTS_FILE

# adam keeps optimizer state, so a resumed run must restore it from the checkpoint
TINY = dict(
    subset=32, steps=2, hidden=16, depth=1, eval_every=1, eval_train_size=32, optimizers=("adam",)
)
CONFIG = {"experiment": "fullbatch", "hidden": 16, "steps": 2}
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


class Killed(BaseException):
    """The process dies here (nothing may catch it)."""


@pytest.fixture(scope="module")
def data():
    config = make_config("fullbatch", "bundled", **TINY)
    full = runner_module.load_data(config, torch.device("cpu"))
    return dataclasses.replace(full, test_x=full.test_x[:64], test_y=full.test_y[:64])


@pytest.fixture
def cached_data(monkeypatch, data):
    """Load the bundled data once for the hundreds of resumes below."""
    monkeypatch.setattr(runner_module, "load_data", lambda config, device: data)


@pytest.fixture
def no_fsync(monkeypatch):
    """A simulated kill leaves the page cache intact: fsync plays no part (and is slow)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _run(folder: Path) -> None:
    Runner(make_config("fullbatch", "bundled", **TINY), folder, progress=False).run()


def _results(folder: Path) -> list[tuple]:
    """Every evaluation's key and metrics (not its wall time); every line must be a record."""
    lines = (folder / RESULTS_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"", "the file must end with a complete line"
    for line in lines[:-1]:
        json.loads(line)
    return [
        (r["optimizer"], r["seed"], r["step"], *(r[k] for k in METRICS))
        for r in ResultsStore(folder).evaluations()
    ]


@pytest.fixture
def reference(tmp_path, cached_data) -> list[tuple]:
    _run(tmp_path / "reference")
    return _results(tmp_path / "reference")


def _kill_during_append(monkeypatch, number: int) -> None:
    """The ``number``-th append writes its whole line, then the process dies (no checkpoint)."""
    original = ResultsStore.append
    count = {"n": 0}

    def append(self, record):
        count["n"] += 1
        original(self, record)
        if count["n"] == number:
            raise Killed

    monkeypatch.setattr(ResultsStore, "append", append)


def test_kill_at_every_byte_of_the_last_record_resumes_to_the_uninterrupted_run(
    tmp_path, monkeypatch, cached_data, reference, no_fsync
):
    # appends: eval 0, eval 1 (then checkpoint 1), eval 2 <- killed while writing it
    folder = tmp_path / "killed"
    with monkeypatch.context() as patch:
        _kill_during_append(patch, 3)
        with pytest.raises(Killed):
            _run(folder)
    results = folder / RESULTS_FILE
    checkpoint = ResultsStore(folder).checkpoint_path("fullbatch", "adam", 42)
    content, state = results.read_bytes(), checkpoint.read_bytes()
    last = content[:-1].rfind(b"\n") + 1
    assert json.loads(content[last:])["step"] == 2
    assert torch.load(checkpoint)["step"] == 1
    for offset in range(last, len(content) + 1):
        results.write_bytes(content[:offset])
        checkpoint.write_bytes(state)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*is not a JSON record")
            _run(folder)
        assert _results(folder) == reference, f"killed at byte {offset - last} of the record"


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.999])
def test_kill_during_a_checkpoint_write_resumes_to_the_uninterrupted_run(
    tmp_path, monkeypatch, cached_data, reference, fraction
):
    original = ResultsStore.save_checkpoint
    count = {"n": 0}

    def save_checkpoint(self, path, state):
        count["n"] += 1
        if count["n"] < 2:
            return original(self, path, state)
        full = path.with_name("full.pt")
        torch.save(state, full)
        blob = full.read_bytes()
        full.unlink()
        path.with_suffix(".tmp").write_bytes(blob[: int(fraction * len(blob))])
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(ResultsStore, "save_checkpoint", save_checkpoint)
        with pytest.raises(Killed):
            _run(tmp_path / "killed")
    _run(tmp_path / "killed")
    assert _results(tmp_path / "killed") == reference


def test_records_are_fsynced_before_their_checkpoint_replaces_the_old_one(
    tmp_path, monkeypatch, cached_data
):
    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(RESULTS_FILE):
            on_disk = ResultsStore(tmp_path).evaluations()
            events.append(("record", on_disk[-1]["step"]))
        fsync(fd)

    def spy_replace(src, dst):
        replace(src, dst)
        if str(dst).endswith(".pt"):
            events.append(("checkpoint", torch.load(dst)["step"]))

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    _run(tmp_path)
    assert events == [("record", 0), ("record", 1), ("checkpoint", 1)] + [
        ("record", 2),
        ("checkpoint", 2),
    ]


def test_the_last_of_two_records_with_the_same_key_wins(tmp_path, cached_data, reference):
    """A record re-produced after a resume replaces the one written before the kill."""
    folder = tmp_path / "resumed"
    with pytest.MonkeyPatch.context() as patch:
        _kill_during_append(patch, 2)  # eval 1 written, killed before its checkpoint
        with pytest.raises(Killed):
            _run(folder)
    store = ResultsStore(folder)
    lines = store.path.read_bytes().splitlines(keepends=True)
    first = json.loads(lines[-1])
    assert (first["type"], first["step"]) == ("eval", 1)
    # the record written before the kill holds values the resumed run will not reproduce
    stale = {**first, "train_loss": 123.0, "test_acc": 0.5}
    store.path.write_bytes(b"".join(lines[:-1]) + json.dumps(stale).encode() + b"\n")
    _run(folder)
    records = [r for r in store.records() if r.get("type") == "eval" and r["step"] == 1]
    assert 123.0 in [r["train_loss"] for r in records], "the stale record stays in the file"
    assert _results(folder) == reference


@pytest.mark.parametrize("kind", ["eval", "update"])
def test_last_record_of_a_key_wins_in_the_store(tmp_path, kind):
    store = ResultsStore(tmp_path)
    store.open(CONFIG)
    key = {"type": kind, "phase": "fullbatch", "optimizer": "gn", "seed": 42, "step": 1}
    store.append({**key, "train_loss": 1.0})
    store.append({**key, "step": 2, "train_loss": 5.0})
    store.append({**key, "train_loss": 2.0})
    read = store.evaluations() if kind == "eval" else store.updates()
    assert [(r["step"], r["train_loss"]) for r in read] == [(1, 2.0), (2, 5.0)]


def test_last_diverged_record_of_a_run_wins(tmp_path):
    store = ResultsStore(tmp_path)
    store.open(CONFIG)
    key = {"type": "diverged", "phase": "fullbatch", "optimizer": "sgd", "seed": 42}
    store.append({**key, "step": 3})
    store.append({**key, "step": 2})
    assert [r["step"] for r in store.diverged()] == [2]


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def test_torn_header_at_every_byte_is_rewritten(tmp_path, no_fsync):
    store = ResultsStore(tmp_path)
    store.open(CONFIG)
    header = store.path.read_bytes()
    for offset in range(len(header)):
        store.path.write_bytes(header[:offset])
        store.open(CONFIG)
        records = _lines(store.path)
        assert [r["type"] for r in records] == ["header"] and records[0]["config"] == CONFIG


def test_append_after_a_torn_line_at_every_byte_starts_a_line_of_its_own(tmp_path, no_fsync):
    store = ResultsStore(tmp_path)
    store.open(CONFIG)
    store.append({"type": "eval", "step": 0})
    intact = store.path.read_bytes()
    torn = json.dumps({"type": "eval", "step": 1, "train_loss": 0.5}).encode() + b"\n"
    for offset in range(len(torn)):
        store.path.write_bytes(intact + torn[:offset])
        store.append({"type": "eval", "step": 2})
        assert [r.get("step") for r in _lines(store.path)] == [None, 0, 2]


def test_a_corrupt_complete_line_is_skipped_with_a_warning_naming_it(tmp_path):
    store = ResultsStore(tmp_path)
    store.open(CONFIG)
    with store.path.open("a") as stream:
        stream.write('{"type": "eval", "st{"type": "eval"}\n')
    store.append({"type": "eval", "step": 3})
    with pytest.warns(UserWarning, match="line 2"):
        records = store.records()
    assert [r.get("step") for r in records] == [None, 3]


def test_a_folder_with_nothing_to_resume_takes_a_new_config(tmp_path):
    store = ResultsStore(tmp_path)
    store.open(CONFIG)
    store.append({"type": "eval", "phase": "fullbatch", "optimizer": "gn", "seed": 42, "step": 0})
    store.open({**CONFIG, "hidden": 32})
    assert store.config()["hidden"] == 32 and store.evaluations() == []
