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


class ResultsStore:
    """Results of one run folder.

    Args:
        folder: Run folder (created by :meth:`open` if missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / RESULTS_FILE

    # ------------------------------------------------------------------ writing
    def open(self, config: dict, defaults: dict | None = None) -> None:
        """Create the store with a header, or check an existing run can go on with ``config``.

        A run may be resumed with other values of :data:`EXTENDABLE` (more steps or epochs, more
        optimizers or seeds): every (phase, optimizer, seed) is trained independently, so what
        is already recorded stays valid. The new config is appended as a ``"config"`` record.
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
        if fixed:
            raise ConfigMismatchError(
                f"{self.path} holds a run with another config (differs in {fixed}); resume with "
                f"the same settings (only {sorted(EXTENDABLE)} may change) or choose another --out"
            )
        if changed:
            self.append({"type": "config", "config": config, "versions": versions()})

    def append(self, record: dict) -> None:
        """Append one record as one line, flushed and fsync'ed before returning.

        A torn last line left by a killed writer is cut off first (see :meth:`repair`).
        """
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
        if not self.path.exists():
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
        with self.path.open("rb") as stream:
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
        return _last_per_key(self._typed("eval"), ("phase", "optimizer", "seed", "step"))

    def updates(self) -> list[dict]:
        """``update`` records (Figure 3), one per key like :meth:`evaluations`."""
        return _last_per_key(self._typed("update"), ("phase", "optimizer", "seed", "step"))

    def diverged(self) -> list[dict]:
        """``diverged`` records, one per (phase, optimizer, seed): the last one in the file."""
        return _last_per_key(self._typed("diverged"), ("phase", "optimizer", "seed"))

    # ------------------------------------------------------------------ helpers
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
