r"""The training monitor: Cockpit's instruments around the user's own backward, and their log.

.. code-block:: python

    monitor = Monitor(model, loss_func, preset="business", log_dir="run")
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        loss = loss_func(model(x), y)
        with monitor(step, loss=loss, optimizer=optimizer):
            loss.backward()
        optimizer.step()
        monitor.latest()        # {"step": ..., "loss": ..., "grad_norm": ..., ...}
    monitor.close()

How the instruments share one backward. The engine's :func:`curvlab.backprop.capture` must see
the forward pass, which the loop runs *before* ``with monitor(step, ...)``. So the monitor opens
the capture for the next step ahead: at construction (for step ``start_step``) and at the end of
every monitored step (for ``step + 1``), with the engine quantities of every instrument due
then. The user's next forward and ``loss.backward()`` then compute them in one extended
backward, and ``param.grad`` is exactly what a plain backward leaves. When the step numbers do
not follow one another, or the loss function was called more than once since, the prepared
capture is dropped and the quantities come from one extra :func:`curvlab.backprop.compute` pass
on the recorded batch (same numbers, more cost). While a capture is prepared, run evaluation
forwards under ``torch.no_grad()`` (they are ignored) and call ``loss_func`` once per step.

Curvature instruments (Hessian eigenvalue and trace) run their own Hessian-vector products on the
recorded batch at the end of the block, before the optimizer step.

The log. With ``log_dir``, every monitored step appends one JSON line to
``log_dir/monitor.jsonl`` as it ends (flushed). A run that was killed resumes its log: on open, a
torn last line is cut, the complete records are kept, and the first record written after that
drops the records of the steps it repeats (a restart from an earlier checkpoint). The initial
parameters are saved once to ``log_dir/initial_parameters.pt`` so that ``distance`` keeps
measuring from the first run's start. ``dashboard_every=k`` redraws ``log_dir/dashboard.png``
(:mod:`curvlab.diagnostics.dashboard`) every ``k`` steps; ``tensorboard=True`` also writes the
scalars as TensorBoard events into ``log_dir``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop import CaptureError, Quantity, capture, compute
from curvlab.diagnostics.dashboard import DASHBOARD_NAME, write_dashboard
from curvlab.diagnostics.instruments import (
    Instrument,
    Schedule,
    StepData,
    copy_into,
    linear_schedule,
    resolve_instruments,
)
from curvlab.diagnostics.per_sample import PerSampleStatistics, sample_index

LOG_NAME = "monitor.jsonl"
"""The log's file name in ``log_dir``."""
INITIAL_NAME = "initial_parameters.pt"
"""The initial parameters' file name in ``log_dir``."""
SAMPLES = 16
"""The default size of the subsample that the per-sample statistics use (``Monitor(samples=)``)."""

ScheduleSpec = int | Callable[[int], bool] | Mapping[str, int | Callable[[int], bool]] | None


# ------------------------------------------------------------------------------------- log
class JSONLLog:
    """An append-only JSON-lines log of one record (a dict with ``"step"``) per line.

    Opening an existing file resumes it: a last line without its newline (a write cut by a
    kill) is kept if it parses as a JSON object and cut otherwise; complete lines are kept.

    Args:
        path: The file (created with its folder if missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records = self._resume()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def _resume(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes up to the last complete line
        records = [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line]
        tail = data[end:]
        if tail:
            try:
                record = json.loads(tail.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            with open(self.path, "r+b") as file:
                if isinstance(record, dict):
                    file.seek(len(data))
                    file.write(b"\n")
                    records.append(record)
                else:
                    file.truncate(end)
        return records

    @property
    def records(self) -> list[dict]:
        """Every record in the log, in order (a copy)."""
        return list(self._records)

    @property
    def last_step(self) -> int | None:
        """The step of the last record, or ``None`` for an empty log."""
        return self._records[-1]["step"] if self._records else None

    def write(self, record: dict) -> None:
        """Append ``record`` (flushed); first drop the records of the steps it repeats."""
        if self._records and self._records[-1]["step"] >= record["step"]:
            self._records = [r for r in self._records if r["step"] < record["step"]]
            self._rewrite()
        self._records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _rewrite(self) -> None:
        self._file.close()
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in self._records), "utf-8")
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The complete records of a monitor log (a ``log_dir`` or the ``.jsonl`` file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line]


# ----------------------------------------------------------------------------- tensorboard
def _tensorboard_writer(log_dir: str | os.PathLike) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, or a clear error."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ModuleNotFoundError(
            "Monitor(tensorboard=True) writes through torch.utils.tensorboard, which needs the "
            "'tensorboard' package: pip install tensorboard"
        )
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def _write_scalars(writer: Any, record: dict) -> None:
    """Every number of ``record`` as a scalar (dicts of numbers as ``name/key``), flushed."""
    step = record["step"]
    for name, value in record.items():
        if name == "step":
            continue
        if isinstance(value, int | float):
            writer.add_scalar(name, value, step)
        elif isinstance(value, dict):
            for key, entry in value.items():
                if isinstance(entry, int | float):
                    writer.add_scalar(f"{name}/{key}", entry, step)
    writer.flush()


# ---------------------------------------------------------------------------- batch recorder
class _BatchRecorder:
    """Keeps the last grad-enabled model inputs and loss targets (references, no copies)."""

    def __init__(self, model: nn.Module, loss_func: nn.Module) -> None:
        self.inputs: Any = None
        self.targets: Tensor | None = None
        self.loss_calls = 0
        self._handles = [
            model.register_forward_pre_hook(self._on_model),
            loss_func.register_forward_pre_hook(self._on_loss, with_kwargs=True),
        ]

    def _on_model(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and args:
            self.inputs = args[0]

    def _on_loss(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self.loss_calls += 1
            self.targets = args[1] if len(args) > 1 else kwargs.get("target")

    def clear(self) -> None:
        self.inputs = self.targets = None
        self.loss_calls = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _needs_batch(instrument: Instrument) -> bool:
    """Whether ``instrument`` reads the recorded batch (an engine quantity, per-sample data)."""
    return bool(
        "batch" in instrument.needs
        or instrument.engine_quantities(True, True)
        or instrument.per_sample_requests(True, True)
    )


def _cancel(prepared: Any) -> None:
    """Leave a capture block without finishing it (its hooks are removed)."""
    prepared.__exit__(CaptureError, CaptureError("cancelled by the monitor"), None)


# -------------------------------------------------------------------------------- monitor
class Monitor:
    r"""Cockpit-style instruments computed during training, on schedules (see the module doc).

    Args:
        model: The model (samples processed independently: BatchNorm in eval mode).
        loss_func: The loss function the loop calls as ``loss_func(model(x), y)``
            (``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``).
        preset: ``"economy"``, ``"business"``, ``"full"``
            (:data:`~curvlab.diagnostics.instruments.PRESETS`), or a list of instrument names
            and :class:`~curvlab.diagnostics.instruments.Instrument` objects.
        log_dir: Where the JSONL log goes (``None``: no log).
        schedule: ``None``: each instrument's default (``every`` steps: 1, and 10 for the
            Hessian instruments, TIC and the 2d histogram); an ``int`` ``k``: every instrument every ``k`` steps; a
            callable ``step -> bool`` for all; or a dict from instrument names to either (the
            others keep their default).
        start_step: The first step the loop will pass (the first capture is prepared for it).
        seed: Seed of the stochastic estimators (the generator is reseeded with
            ``seed + step`` at every step).
        dashboard_every: Redraw ``log_dir/dashboard.png``
            (:func:`~curvlab.diagnostics.dashboard.write_dashboard`) at the monitored steps
            divisible by it, and once more at :meth:`close` (``None``: never).
        tensorboard: Also write every scalar instrument (and each entry of a dict of scalars,
            as ``name/key``) to TensorBoard event files in ``log_dir``, through
            ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
        samples: The per-sample statistics (the norm, inner-product and orthogonality tests,
            ``batch_grad_norms``, alpha's slope variances, TIC, GSNR, CABS, early stopping) are
            computed on a subsample of this many of the batch's samples, drawn uniformly
            without replacement with the seed ``seed + step``, and estimate the batch's values
            (see each instrument for which estimates are unbiased); ``None`` uses every sample
            (exact). A batch no larger is used whole. Each record says which:
            ``"per_sample": {"estimated": bool, "samples": S, "batch": N}``. The gradient
            histograms keep their own ``budget``.

    Raises:
        ValueError: For an unknown preset, instrument or schedule name, or a dashboard or
            TensorBoard without ``log_dir``.
        ModuleNotFoundError: For ``tensorboard=True`` without the ``tensorboard`` package.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        preset: str | Sequence[str | Instrument] = "economy",
        log_dir: str | os.PathLike | None = None,
        schedule: ScheduleSpec = None,
        *,
        start_step: int = 0,
        seed: int = 0,
        dashboard_every: int | None = None,
        tensorboard: bool = False,
        samples: int | None = SAMPLES,
    ) -> None:
        if log_dir is None and (dashboard_every is not None or tensorboard):
            raise ValueError("dashboard_every= and tensorboard=True write into log_dir: pass one")
        if dashboard_every is not None and (
            isinstance(dashboard_every, bool)
            or not isinstance(dashboard_every, int)
            or dashboard_every < 1
        ):
            raise ValueError(f"dashboard_every must be a positive int, got {dashboard_every!r}")
        self.dashboard_every = dashboard_every
        if samples is not None and (
            isinstance(samples, bool) or not isinstance(samples, int) or samples < 2
        ):
            raise ValueError(f"samples must be an int of at least 2 or None, got {samples!r}")
        self.samples = samples
        self._tensorboard = _tensorboard_writer(log_dir) if tensorboard else None
        self.model, self.loss_func, self.seed = model, loss_func, seed
        self._total_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.instruments = resolve_instruments(preset)
        self.schedules = self._schedules(schedule)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.initial = self._initial_parameters()
        self.log = None if self.log_dir is None else JSONLLog(self.log_dir / LOG_NAME)
        self._latest: dict[str, Any] = {}
        self._previous: tuple[int, dict[str, Tensor]] | None = None
        self._previous_buffers: dict[str, Tensor] = {}
        self._update_buffers: dict[str, Tensor] = {}
        self._prepared: tuple[int, frozenset[str], Any] | None = None
        self._planned: tuple[tuple, dict[str, Quantity]] | None = None
        self._recorder = _BatchRecorder(model, loss_func)
        self._closed = False
        self._prepare(start_step)

    # ------------------------------------------------------------------ set-up
    def _schedules(self, schedule: ScheduleSpec) -> dict[str, Schedule]:
        def as_schedule(value: int | Schedule) -> Schedule:
            return linear_schedule(value) if isinstance(value, int) else value

        names = [i.name for i in self.instruments]
        out = {i.name: linear_schedule(i.every) for i in self.instruments}
        if isinstance(schedule, Mapping):
            unknown = set(schedule) - set(names)
            if unknown:
                raise ValueError(
                    f"schedule names {sorted(unknown)} are not instruments of this monitor "
                    f"({', '.join(names)})"
                )
            out.update({k: as_schedule(v) for k, v in schedule.items()})
        elif schedule is not None:
            out = {name: as_schedule(schedule) for name in names}
        return out

    def _params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _initial_parameters(self) -> dict[str, Tensor]:
        if self.log_dir is not None and (self.log_dir / INITIAL_NAME).exists():
            return torch.load(self.log_dir / INITIAL_NAME, weights_only=True)
        initial = {n: p.clone() for n, p in self._params().items()}
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            torch.save(initial, self.log_dir / INITIAL_NAME)
        return initial

    # ------------------------------------------------------------------ schedules
    def due(self, step: int) -> list[Instrument]:
        """The instruments due at ``step``."""
        return [i for i in self.instruments if self.schedules[i.name](step)]

    def _quantities(self, step: int) -> dict[str, Quantity]:
        """The engine quantities by name that the instruments need at ``step``.

        Every per-sample statistic of the due instruments goes into one
        :class:`~curvlab.diagnostics.per_sample.PerSampleStatistics`, so that each is computed
        once per backward. The same objects serve the preparation, the block and its end
        (planned once per step and reference point).
        """
        reference = None
        if self._previous is not None and self._previous[0] == step - 1:
            reference = self._previous[1]
        key = (step, None if reference is None else id(reference))
        if self._planned is not None and self._planned[0] == key:
            return self._planned[1]
        out = self._plan(step, reference)
        self._planned = (key, out)
        return out

    def _plan(self, step: int, reference: dict[str, Tensor] | None) -> dict[str, Quantity]:
        out: dict[str, Quantity] = {}
        requests: list = []
        hints: dict[str, Any] = {}
        for instrument in self.instruments:
            schedule = self.schedules[instrument.name]
            due, due_next = schedule(step), instrument.remembers and schedule(step + 1)
            for name, quantity in instrument.engine_quantities(due, due_next).items():
                out.setdefault(name, quantity)
            requests += instrument.per_sample_requests(due, due_next)
            hints.update(instrument.per_sample_hints(due, due_next))
        # projections are onto the last update: from the parameters kept at the step before
        if reference is None:
            requests = [r for r in requests if r != "projections"]
        if requests:
            stats = PerSampleStatistics(
                requests,
                reference,
                self._total_params,
                seed=self.seed + step,
                update_start=hints.get("update_start"),
                samples=self.samples,
                update_buffers=self._update_buffers,
            )
            out[stats.name] = stats
        return out

    def _generator(self, step: int) -> torch.Generator:
        """The engine's MC samples of ``step``, seeded by ``seed + step``."""
        device = next(iter(self._params().values())).device
        return torch.Generator(device).manual_seed(self.seed + step)

    def _prepare(self, step: int) -> None:
        """Open the capture for ``step`` (before its forward), if its instruments need one."""
        quantities = self._quantities(step)
        self._recorder.clear()
        if quantities:
            prepared = capture(
                self.model,
                self.loss_func,
                list(quantities.values()),
                generator=self._generator(step),
            )
            prepared.__enter__()
            self._prepared = (step, frozenset(quantities), prepared)

    # ------------------------------------------------------------------ the block
    def __call__(self, step: int, loss: Tensor | None = None, optimizer: Any = None) -> _Step:
        """The context manager around the step's ``loss.backward()``.

        Args:
            step: The training step (the schedules' argument).
            loss: The batch loss (for the ``loss`` instrument).
            optimizer: The optimizer (for ``learning_rate``).

        Returns:
            A context manager; :meth:`latest` holds the step's instruments once it has ended.
        """
        if self._closed:
            raise RuntimeError("the monitor is closed")
        return _Step(self, step, loss, optimizer)

    @contextmanager
    def outside(self) -> Iterator[None]:
        """A block of forward and backward passes the monitor must not see.

        The capture of the next step is opened ahead of its forward (when its instruments need
        one), so passes between two monitored blocks would run through its hooks. An optimizer
        with passes of its own (ExactGN's ``step(x, y)``) runs them inside this block: the
        prepared capture is dropped on entry and opened again on exit, so the next monitored
        block sees only its own forward.

        Example:
            >>> with monitor(step, loss=loss, optimizer=gn):  # doctest: +SKIP
            ...     loss.backward()
            >>> with monitor.outside():  # doctest: +SKIP
            ...     gn.step(x, y)
        """
        if self._closed:
            raise RuntimeError("the monitor is closed")
        step = None
        if self._prepared is not None:
            step = self._prepared[0]
            _cancel(self._prepared[2])
            self._prepared = None
        try:
            yield
        finally:
            if step is not None and not self._closed:
                self._prepare(step)

    def latest(self) -> dict[str, Any]:
        """The record of the last monitored step: ``"step"`` and every instrument computed."""
        return dict(self._latest)

    def close(self) -> None:
        """Remove the hooks (a prepared capture is dropped) and close the log."""
        if self._closed:
            return
        if self._prepared is not None:
            _cancel(self._prepared[2])
            self._prepared = None
        self._recorder.remove()
        if self.log is not None:
            if self.dashboard_every is not None and self.log.records:
                write_dashboard(self.log.records, self.log_dir / DASHBOARD_NAME)
            self.log.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # ------------------------------------------------------------------ one step
    def _begin(self, step: int) -> Any:
        """The prepared capture if it covers ``step``; otherwise drop it (``None``)."""
        if self._prepared is None:
            return None
        prepared_step, needs, prepared = self._prepared
        self._prepared = None
        wanted = frozenset(self._quantities(step))
        if prepared_step == step and wanted <= needs and self._recorder.loss_calls == 1:
            return prepared
        _cancel(prepared)
        return None

    def _finish(self, step: int, loss: Tensor | None, optimizer: Any, results: Any) -> None:
        due = self.due(step)
        quantities = self._quantities(step)
        needs = frozenset(quantities)
        inputs, targets = self._recorder.inputs, self._recorder.targets
        if results is None and (inputs is None or targets is None):
            blind = [i.name for i in due if _needs_batch(i)]
            if blind:
                seen = "the model's forward" if targets is not None else "a call of loss_func"
                raise RuntimeError(
                    f"step {step}: the instruments {blind} need the batch, but the monitored "
                    f"block saw no {seen}: compute the loss inside the block as "
                    "loss_func(model(x), y) with the loss module given to the Monitor"
                )
        if needs and results is None and inputs is not None and targets is not None:
            results = compute(
                self.model,
                self.loss_func,
                inputs,
                targets,
                list(quantities.values()),
                generator=self._generator(step),
            )
        params = self._params()
        previous = None
        if self._previous is not None and self._previous[0] == step - 1:
            previous = self._previous[1]
        generator = torch.Generator(next(iter(params.values())).device)
        generator.manual_seed(self.seed + step)
        data = StepData(
            step=step,
            model=self.model,
            loss_func=self.loss_func,
            loss=None if loss is None else loss.detach(),
            optimizer=optimizer,
            params=params,
            initial=self.initial,
            previous=previous,
            inputs=inputs,
            targets=targets,
            generator=generator,
            update_buffers=self._update_buffers,
            seed_step=self.seed + step,
        )
        if isinstance(inputs, Tensor):
            data.num_samples = inputs.shape[0]
            data.sample_index = sample_index(
                data.num_samples, self.samples, self.seed + step, inputs.device
            )
        if results is not None:
            data.num_samples = results.output.shape[0]
            data.output = results.output
            data.grad = results.grad
            data.quantities = {q: results[q] for q in needs}
            for name, quantity in quantities.items():
                if isinstance(quantity, PerSampleStatistics):
                    data.per_sample = results[name]
                    data.sample_index = quantity.index(data.num_samples, data.output.device)
                    if previous is not None and set(quantity.directions) == set(params):
                        data._update = dict(quantity.directions)  # the pass formed the update
            if data.loss is None:
                data.loss = results.loss
        record: dict[str, Any] = {"step": step}
        if data.num_samples is not None and any(i.subsampled for i in due):
            count = data.sampled()
            record["per_sample"] = {
                "estimated": count is not None,
                "samples": data.num_samples if count is None else count,
                "batch": data.num_samples,
            }
        for instrument in due:
            engine_needs = instrument.engine_quantities(True, False)
            if results is None and (engine_needs or instrument.per_sample_requests(True, False)):
                continue  # no batch was recorded
            if "batch" in instrument.needs and (inputs is None or targets is None):
                continue
            value = instrument.compute(data)
            if value is not None:
                record[instrument.name] = value
        for instrument in self.instruments:
            if instrument.remembers and self.schedules[instrument.name](step + 1):
                instrument.remember(data)
        self._latest = record
        if self.log is not None:
            self.log.write(record)
            if self.dashboard_every is not None and step % self.dashboard_every == 0:
                write_dashboard(self.log.records, self.log_dir / DASHBOARD_NAME)
        if self._tensorboard is not None:
            _write_scalars(self._tensorboard, record)
        self._previous = None
        if any("previous" in i.needs for i in self.due(step + 1)):
            # into the same buffers every step (the last step's copy is no longer needed)
            self._previous = (step, copy_into(params, self._previous_buffers))
        self._prepare(step + 1)


class _Step:
    """``with monitor(step, loss=..., optimizer=...):`` (see :meth:`Monitor.__call__`)."""

    def __init__(self, monitor: Monitor, step: int, loss: Tensor | None, optimizer: Any) -> None:
        self.monitor, self.step, self.loss, self.optimizer = monitor, step, loss, optimizer
        self._capture = None

    def __enter__(self) -> _Step:
        self._capture = self.monitor._begin(self.step)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        results = None
        if self._capture is not None:
            self._capture.__exit__(exc_type, exc, tb)
            if exc_type is None:
                results = self._capture.results
        if exc_type is None:
            self.monitor._finish(self.step, self.loss, self.optimizer, results)
