"""Append-only JSONL results store with a header record, written as results are produced.

``runs/NAME/results.jsonl`` holds one JSON object per line: first a ``{"type": "header"}`` record
with the config and versions, then ``"eval"`` records (one per evaluation) and, for Figure 3,
``"update"`` records (one per update). Each line is flushed and fsync'ed, so a killed run loses at
most the line being written; a torn last line is ignored on reading. Checkpoints for resuming live
beside it in ``checkpoints/``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS_FILE = "results.jsonl"
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
        folder: Run folder (created if missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / RESULTS_FILE

    def open(self, config: dict, defaults: dict | None = None) -> None:
        """Create the store with a header, or check an existing run can go on with ``config``.

        A run may be resumed with other values of :data:`EXTENDABLE` (more steps or epochs, more
        optimizers or seeds): every (phase, optimizer, seed) is trained independently, so what
        is already recorded stays valid. The new config is appended as a ``"config"`` record.

        Args:
            config: The run's settings.
            defaults: Values of settings that a run recorded by an older version lacks.

        Raises:
            ConfigMismatchError: the folder holds a run that differs in any other setting.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(config))
        header = self.header()
        if header is None:
            self.append({"type": "header", "config": config, "versions": versions()})
            return
        current = {**json.loads(json.dumps(defaults or {})), **self.config()}
        changed = sorted(k for k in set(config) | set(current) if current.get(k) != config.get(k))
        fixed = [k for k in changed if k not in EXTENDABLE]
        if fixed:
            raise ConfigMismatchError(
                f"{self.path} holds a run with another config (differs in {fixed}); resume with "
                f"the same settings (only {sorted(EXTENDABLE)} may change) or choose another --out"
            )
        if changed:
            self.append({"type": "config", "config": config, "versions": versions()})

    def config(self) -> dict:
        """The run's current config: the header's, or the last ``"config"`` record's."""
        latest = None
        for record in self.records():
            if record.get("type") in ("header", "config"):
                latest = record["config"]
        if latest is None:
            raise ConfigMismatchError(f"{self.path} has no header record")
        return latest

    def append(self, record: dict) -> None:
        """Append one record and flush it to disk."""
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def records(self) -> list[dict]:
        """All complete records in file order (a torn last line is skipped)."""
        if not self.path.exists():
            return []
        out = []
        with self.path.open() as stream:
            for line in stream:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def header(self) -> dict | None:
        """The header record, or ``None`` for a new store."""
        for record in self.records():
            if record.get("type") == "header":
                return record
        return None

    def evaluations(self) -> list[dict]:
        """``eval`` records, de-duplicated by (phase, optimizer, seed, step), last one wins."""
        return _dedupe(r for r in self.records() if r.get("type") == "eval")

    def updates(self) -> list[dict]:
        """``update`` records (Figure 3), de-duplicated like :meth:`evaluations`."""
        return _dedupe(r for r in self.records() if r.get("type") == "update")

    def checkpoint_path(self, phase: str, optimizer: str, seed: int) -> Path:
        """Where the resumable state of one (phase, optimizer, seed) run is kept."""
        return self.folder / "checkpoints" / f"{phase}-{optimizer}-seed{seed}.pt"

    def save_checkpoint(self, path: Path, state: dict) -> None:
        """Write ``state`` atomically (temporary file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)


def _dedupe(records) -> list[dict]:
    keyed: dict[tuple, dict] = {}
    for record in records:
        key = (record.get("phase"), record["optimizer"], record["seed"], record["step"])
        keyed[key] = record
    return sorted(
        keyed.values(), key=lambda r: (r.get("phase", ""), r["optimizer"], r["seed"], r["step"])
    )
