"""Append-only JSONL results store of one run folder, written as results are produced.

``runs/NAME/results.jsonl`` holds one JSON object per line: first a ``{"type": "header"}`` record
with the config and versions, then ``"eval"`` records (one per evaluation), ``"update"`` records
(Figure 3, one per update), ``"diverged"`` records and, when a run is extended, ``"config"``
records. docs/experiments.md documents every key.

A kill at any byte loses nothing:

- every record is one ``write`` of a line ending in a newline, flushed and fsync'ed before the
  caller goes on, so the runner's records reach the disk before the checkpoint that follows them;
- a checkpoint is written to a temporary file, fsync'ed, then renamed over the old one
  (``os.replace``), so ``checkpoints/`` always holds a complete state;
- on :meth:`ResultsStore.open` (and before every append) a torn last line, one without its
  newline, is cut off, so the next record starts on a line of its own.

A resumed run starts from its checkpoint and writes again the records produced after it. Records
with the same key therefore repeat, and the **last one in the file wins**: it was produced by the
run that the checkpoint and every later record continue.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

RESULTS_FILE = "results.jsonl"
CHECKPOINT_DIR = "checkpoints"
#: Keys of one run, and of one evaluation or update of it.
_RUN = ("phase", "optimizer", "seed")
_RUN_STEP = (*_RUN, "step")
#: The key of a width-study unit (:mod:`curvlab.experiments.width_scaling`).
_WIDTH_UNIT = ("question", "family", "width", "seed")
#: Settings a run may be resumed with at other values.
EXTENDABLE = frozenset({"steps", "epochs", "optimizers", "seeds"})


def versions() -> dict[str, str]:
    """Versions of Python, torch, curvlab and the machine, for the header."""
    from curvlab import __version__

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "curvlab": __version__,
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


class ConfigMismatchError(ValueError):
    """The output folder holds a run with another configuration."""


class ReadOnlyStoreError(RuntimeError):
    """A write to a store opened from an archived records file."""


def is_records_file(path: str | Path) -> bool:
    """Whether ``path`` names a records file (``.jsonl`` or ``.jsonl.gz``) rather than a folder."""
    name = Path(path).name
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


class ResultsStore:
    """Results of one run folder, or of one archived records file (read only).

    Args:
        folder: Run folder (created by :meth:`open` if missing), or a records file:
            ``results.jsonl`` itself or a gzip-compressed copy written by :func:`export_records`
            (``NAME.jsonl.gz``), which can be read (summaries, figures) but not written.
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.read_only = is_records_file(folder) and folder.name != RESULTS_FILE
        if is_records_file(folder):
            self.folder, self.path = folder.parent, folder
        else:
            self.folder, self.path = folder, folder / RESULTS_FILE

    # ------------------------------------------------------------------ writing
    def open(self, config: dict, defaults: dict | None = None) -> None:
        """Create the store with a header, or check an existing run can go on with ``config``.

        A run may be resumed with other values of :data:`EXTENDABLE` (more steps or epochs, more
        optimizers or seeds), and with learning rates that differ only for optimizers it has not
        recorded yet (an optimizer added later, with its own rate): every (phase, optimizer, seed)
        is trained independently, so what is already recorded stays valid. The new config is
        appended as a ``"config"`` record.
        A folder that holds nothing to resume from (no checkpoint yet: only a header and the
        first evaluations, say after a config error at the first update) is started afresh with
        ``config``, so a corrected command can reuse it.

        Args:
            config: The run's settings.
            defaults: Values of settings that a run recorded by an older version lacks.

        Raises:
            ConfigMismatchError: the folder holds results of a run that differs in any other
                setting.
        """
        self._check_writable()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.repair()
        config = json.loads(json.dumps(config))
        records = self.records()
        header = next((r for r in records if r.get("type") == "header"), None)
        if header is None or not self._resumable():
            if header is None or self._latest_config(records) != config:
                self._start(config)
            return
        current = {**json.loads(json.dumps(defaults or {})), **self._latest_config(records)}
        changed = sorted(k for k in set(config) | set(current) if current.get(k) != config.get(k))
        fixed = [k for k in changed if k not in EXTENDABLE]
        if "lr" in fixed and self._rates_of_new_optimizers_only(current, config, records):
            fixed.remove("lr")
        if fixed:
            raise ConfigMismatchError(
                f"{self.path} holds a run with another config (differs in {fixed}); resume with "
                f"the same settings (only {sorted(EXTENDABLE)} may change) or choose another --out"
            )
        if changed:
            self.append({"type": "config", "config": config, "versions": versions()})

    @staticmethod
    def _rates_of_new_optimizers_only(current: dict, config: dict, records: list[dict]) -> bool:
        """Whether the learning rates differ only for (phase, optimizer) with no record yet.

        A GN variant without a rate of its own takes ``gn``'s, so a change of ``gn``'s rate
        counts for every GN variant recorded without its own rate.
        """
        old, new = current.get("lr") or {}, config.get("lr") or {}
        recorded = {(r["phase"], r["optimizer"]) for r in records if "optimizer" in r}
        for phase in set(old) | set(new):
            before, after = old.get(phase, {}), new.get(phase, {})
            for name in set(before) | set(after):
                if before.get(name) == after.get(name):
                    continue
                users = {name} | (
                    {
                        o
                        for p, o in recorded
                        if p == phase and o.startswith("gn-") and o not in after
                    }
                    if name == "gn"
                    else set()
                )
                if any((phase, user) in recorded for user in users):
                    return False
        return True

    def append(self, record: dict) -> None:
        """Append one record as one line, flushed and fsync'ed before returning.

        A torn last line left by a killed writer is cut off first (see :meth:`repair`).
        """
        self._check_writable()
        self.repair()
        line = (json.dumps(record) + "\n").encode()
        created = not self.path.exists()
        with self.path.open("ab") as stream:
            stream.write(line)
            stream.flush()
            os.fsync(stream.fileno())
        if created:
            _fsync_dir(self.folder)

    def repair(self) -> int:
        """Cut off a torn last line (one without its newline); returns the bytes removed."""
        if self.read_only or not self.path.exists():
            return 0
        with self.path.open("rb+") as stream:
            size = stream.seek(0, io.SEEK_END)
            end = size
            while end > 0:
                start = max(0, end - 65536)
                stream.seek(start)
                block = stream.read(end - start)
                newline = block.rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end == size:
                return 0
            stream.truncate(end)
            stream.flush()
            os.fsync(stream.fileno())
        return size - end

    def checkpoint_path(self, phase: str, optimizer: str, seed: int) -> Path:
        """Where the resumable state of one (phase, optimizer, seed) run is kept."""
        return self.folder / CHECKPOINT_DIR / f"{phase}-{optimizer}-seed{seed}.pt"

    def save_checkpoint(self, path: Path, state: dict) -> None:
        """Write ``state`` atomically: a temporary file, fsync'ed, then renamed over ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    # ------------------------------------------------------------------ reading
    def records(self) -> list[dict]:
        """All complete records in file order.

        A torn last line is skipped. A complete line that is not JSON (written by a version
        before the torn-tail repair) is skipped with a warning naming its line number.
        """
        if not self.path.exists():
            return []
        out = []
        opener = gzip.open if self.path.name.endswith(".gz") else open
        with opener(self.path, "rb") as stream:
            for number, line in enumerate(stream, 1):
                try:
                    out.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    if line.endswith(b"\n"):
                        warnings.warn(
                            f"{self.path}: line {number} is not a JSON record; skipped",
                            stacklevel=2,
                        )
        return out

    def header(self) -> dict | None:
        """The header record, or ``None`` for a new store."""
        for record in self.records():
            if record.get("type") == "header":
                return record
        return None

    def config(self) -> dict:
        """The run's current config: the header's, or the last ``"config"`` record's."""
        latest = self._latest_config(self.records())
        if latest is None:
            raise ConfigMismatchError(f"{self.path} has no header record")
        return latest

    def evaluations(self) -> list[dict]:
        """``eval`` records, one per (phase, optimizer, seed, step): the last one in the file."""
        return _last_per_key(self._typed("eval"), _RUN_STEP)

    def updates(self) -> list[dict]:
        """``update`` records (Figure 3), one per key like :meth:`evaluations`."""
        return _last_per_key(self._typed("update"), _RUN_STEP)

    def diverged(self) -> list[dict]:
        """``diverged`` records, one per (phase, optimizer, seed): the last one in the file."""
        return _last_per_key(self._typed("diverged"), _RUN)

    # ------------------------------------------------------------------ helpers
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(
                f"{self.path} is an archived records file: it can be read (curvlab summary, "
                "curvlab plot) but not run into; run into a folder instead"
            )

    def _typed(self, kind: str) -> list[dict]:
        return [r for r in self.records() if r.get("type") == kind]

    @staticmethod
    def _latest_config(records: list[dict]) -> dict | None:
        latest = None
        for record in records:
            if record.get("type") in ("header", "config"):
                latest = record["config"]
        return latest

    def _resumable(self) -> bool:
        """Whether any (phase, optimizer, seed) has a checkpoint to resume from."""
        checkpoints = self.folder / CHECKPOINT_DIR
        return checkpoints.is_dir() and any(checkpoints.glob("*.pt"))

    def _start(self, config: dict) -> None:
        """Replace the file by one holding only a new header (atomically); drop stale temps."""
        for stale in (self.folder / CHECKPOINT_DIR).glob("*.tmp"):
            stale.unlink()
        header = {"type": "header", "config": config, "versions": versions()}
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as stream:
            stream.write((json.dumps(header) + "\n").encode())
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.folder)


def _fsync_dir(folder: Path) -> None:
    """Make a file's creation or rename in ``folder`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _last_per_key(records: Iterable[dict], key: tuple[str, ...]) -> list[dict]:
    """The last record of every ``key`` value, sorted by it (``phase`` may be missing)."""
    keyed: dict[tuple, dict] = {}
    for record in records:
        keyed[tuple(record.get(k, "") for k in key)] = record
    return [keyed[k] for k in sorted(keyed)]


def export_records(
    folder: str | Path,
    out: str | Path,
    exclude: Iterable[str] = (),
    seeds: Iterable[int] | None = None,
) -> Path:
    """Write a run folder's records, compressed, to ``out`` (``NAME.jsonl.gz``).

    Only the records that a summary or a figure reads are kept, each once (the last of its key,
    as :meth:`ResultsStore.evaluations` reads them): the header and ``config`` records, then
    ``eval``, ``update``, ``diverged`` and the width study's ``width`` records. ``curvlab
    summary OUT`` and ``curvlab plot OUT`` rebuild the tables and figures from it. The gzip
    header carries no time stamp, so the same records give the same bytes.

    Args:
        folder: A run folder (or a records file).
        out: The compressed records file to write; its name must end in ``.jsonl.gz``.
        exclude: Optimizers whose ``eval``, ``update`` and ``diverged`` records are left out
            (runs superseded by others archived elsewhere, so that the archives stay disjoint);
            the header and ``config`` records are kept as they are.
        seeds: Keep only these seeds' runs (``None``: every seed), e.g. to archive the seeds
            that have finished while another is still training.

    Returns:
        ``out`` as a path.

    Raises:
        ValueError: ``out`` does not end in ``.jsonl.gz``, or ``exclude`` or ``seeds`` names
            an optimizer or seed that the folder does not record.
        FileNotFoundError: ``folder`` holds no records.
    """
    out, exclude = Path(out), set(exclude)
    if not out.name.endswith(".jsonl.gz"):
        raise ValueError(f"out must name a .jsonl.gz file, got {str(out)!r}")
    store = ResultsStore(folder)
    if not store.path.is_file():
        raise FileNotFoundError(f"no records to export: {store.path} does not exist")
    records = store.records()  # one read; the same last-per-key choice as the readers
    recorded = {r["optimizer"] for r in records if "optimizer" in r}
    if exclude - recorded:
        raise ValueError(
            f"exclude names optimizers {sorted(exclude - recorded)} that {store.path} does not "
            f"record; it records {sorted(recorded)}"
        )
    records = [r for r in records if r.get("optimizer") not in exclude]
    if seeds is not None:
        seeds, trained = set(seeds), {r["seed"] for r in records if "seed" in r}
        if seeds - trained:
            raise ValueError(
                f"seeds names {sorted(seeds - trained)} that {store.path} does not record; "
                f"it records seeds {sorted(trained)}"
            )
        records = [r for r in records if "seed" not in r or r["seed"] in seeds]
    kept = [r for r in records if r.get("type") in ("header", "config")]
    for kind, key in (
        ("eval", _RUN_STEP),
        ("update", _RUN_STEP),
        ("diverged", _RUN),
        ("width", _WIDTH_UNIT),
    ):
        kept += _last_per_key((r for r in records if r.get("type") == kind), key)
    payload = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with (
        tmp.open("wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as stream,
    ):
        stream.write(payload)
    os.replace(tmp, out)
    return out
