"""One runner for the paper's experiments.

Full-batch and mini-batch training of a RevMLP with exact Gauss-Newton, Adam and SGD on the same
data, initialization and evaluation.

Results go to :class:`~curvlab.experiments.store.ResultsStore` as they are produced; after every
evaluation the model, optimizer and position are checkpointed (after the records, which are on
disk first), so a killed run started again with the same command resumes where it stopped.

A run diverges when its loss or parameters become non-finite, when its loss exceeds
``diverge_factor`` (default 1e3) times its initial value, or when the optimizer refuses a step
with a :class:`FloatingPointError` (ExactGN's ``DivergedStepError``); a ``"diverged"`` record says
when and why, and that (phase, optimizer, seed) stops there.

With ``monitor=PRESET`` (``curvlab run ... --monitor economy|business|full``) a
:class:`~curvlab.diagnostics.Monitor` wraps the backward of every update; its JSONL log and
dashboard PNG go to ``RUN_DIR/monitor/PHASE-OPTIMIZER-seedS/``, and a resumed run continues them
(the monitor's log drops the steps it repeats). ExactGN, which needs no gradient, gets one extra
forward and backward per update for the monitor (see :func:`update`); its own passes run outside
the monitor. The monitor needs ``loss="ce"``.

The ``ntk-cka`` experiment (Figure 4) adds its kernel and CKA measurements
(:class:`~curvlab.experiments.ntk_cka.KernelTracker`) to every evaluation; their references at
initialization travel in the checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from curvlab.backprop.loss import LossSpec
from curvlab.data import load_dataset, to_float
from curvlab.data.splits import balanced_indices
from curvlab.diagnostics.instruments import PRESETS
from curvlab.diagnostics.monitor import Monitor
from curvlab.experiments.config import GN_VARIANTS, VALIDATION_SEED, ExperimentConfig
from curvlab.experiments.ntk_cka import KernelTracker
from curvlab.experiments.store import ResultsStore
from curvlab.nn import RevMLP
from curvlab.optim import ExactGN


@dataclass
class Data:
    """Standardized, flattened tensors of one experiment."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    val_x: Tensor | None = None
    val_y: Tensor | None = None


def validation_split(labels: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Indices of the validation split and of the training images that remain.

    The split is class-balanced (:func:`~curvlab.data.splits.balanced_indices` with
    :data:`~curvlab.experiments.config.VALIDATION_SEED`), so it is the same for every run seed
    and every optimizer; the rest keeps the original order.

    Args:
        labels: Training labels ``[N]``.
        size: Validation images, ``0 < size < N``.

    Returns:
        ``(validation, rest)``: int64 indices ``[size]`` and ``[N - size]``.

    Raises:
        ValueError: ``size`` leaves no training image or exceeds a balanced draw.
    """
    if not 0 < size < len(labels):
        raise ValueError(
            f"validation={size} must be between 1 and the {len(labels)} training images minus one"
        )
    held = torch.as_tensor(balanced_indices(labels.cpu().numpy(), size, VALIDATION_SEED))
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return held, keep.nonzero().squeeze(1)


def load_data(config: ExperimentConfig, device: torch.device) -> Data:
    """Load, flatten and standardize the dataset; hold out the validation split if asked.

    The mean and standard deviation come from the training images that are trained on (the
    validation split excluded), and standardize every split.
    """
    train_images, train_y = load_dataset(config.dataset, "train", config.data_path)
    test_images, test_y = load_dataset(config.dataset, "test", config.data_path)
    train_x = to_float(train_images).flatten(1)
    test_x = to_float(test_images).flatten(1)
    val_x = val_y = None
    if config.validation:
        held, rest = validation_split(train_y, config.validation)
        val_x, val_y = train_x[held], train_y[held]
        train_x, train_y = train_x[rest], train_y[rest]
    mean, std = train_x.mean(), train_x.std()
    num_classes = int(train_y.max()) + 1

    def prepare(x: Tensor | None) -> Tensor | None:
        return None if x is None else ((x - mean) / std).to(device)

    return Data(
        prepare(train_x),
        train_y.to(device),
        prepare(test_x),
        test_y.to(device),
        num_classes,
        prepare(val_x),
        None if val_y is None else val_y.to(device),
    )


def batch_loss(outputs: Tensor, labels: Tensor, loss: str) -> Tensor:
    """The training loss of the run (``mean`` reduction), from :mod:`curvlab.backprop.loss`.

    Cross-entropy of the class labels, or MSE to their one-hot rows.
    """
    targets = labels if loss == "ce" else F.one_hot(labels, outputs.shape[1]).to(outputs)
    return LossSpec.from_name(loss).value(outputs, targets)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce", chunk: int = 4096
) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on ``(x, y)``, in chunks."""
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        out = model(x[start : start + chunk])
        labels = y[start : start + chunk]
        total_loss += float(batch_loss(out, labels, loss)) * len(labels)
        correct += int((out.argmax(1) == labels).sum())
    return total_loss / len(x), correct / len(x)


def evaluation_record(
    model: nn.Module,
    base: dict,
    step: int,
    steps_per_epoch: float,
    train_time: float,
    train: tuple[Tensor, Tensor],
    data: object,
    loss: str = "ce",
) -> dict:
    """An ``eval`` record: loss and accuracy on ``train``, the test set and the validation split.

    Args:
        model: The model evaluated (in its current mode).
        base: The run's identifying fields (phase, optimizer, seed), copied in first.
        step: Updates so far; ``epoch`` is ``step / steps_per_epoch``.
        steps_per_epoch: Updates per pass over the training data.
        train_time: Training seconds so far (evaluations excluded), as ``time_s``.
        train: The training images and labels the train metrics are taken on.
        data: The run's data, with ``test_x``/``test_y`` and ``val_x``/``val_y`` (``val_x``
            ``None`` without a validation split, which then has no fields).
        loss: The run's loss name (:func:`batch_loss`).
    """
    train_loss, train_acc = evaluate(model, *train, loss)
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y, loss)
    record = {
        "type": "eval",
        **base,
        "step": step,
        "epoch": step / steps_per_epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "time_s": train_time,
    }
    if data.val_x is not None:
        record["val_loss"], record["val_acc"] = evaluate(model, data.val_x, data.val_y, loss)
    return record


def build_optimizer(
    name: str, model: RevMLP, lr: float, config: ExperimentConfig
) -> torch.optim.Optimizer:
    """ExactGN, Adam or SGD over the model's trained parameters.

    ``gn`` is ExactGN with ``config.gn_scheme``; ``gn-pinv`` (any of
    :data:`~curvlab.experiments.config.GN_VARIANTS`) with the scheme it names.
    """
    if name == "gn" or name in GN_VARIANTS:
        return ExactGN(
            model,
            lr=lr,
            loss=config.loss,
            scheme=config.gn_scheme if name == "gn" else name.removeprefix("gn-"),
            solver=config.gn_solver,
            rtol=config.gn_rtol,
            atol=config.gn_atol,
            damping=config.gn_damping,
            identity_hessian=config.loss == "ce" and config.ce_hessian == "identity",
            output_damping=config.gn_output_damping if config.ce_hessian == "exact" else 0.0,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def update(
    optimizer: torch.optim.Optimizer,
    model: RevMLP,
    x: Tensor,
    y: Tensor,
    loss: str,
    monitor: Monitor | None = None,
    step: int = 0,
) -> float:
    """One update on the batch; returns the batch loss before it.

    ``monitor`` wraps the backward as update ``step``. ExactGN needs no gradient: with a monitor
    it gets one, a forward and backward of the batch loss inside the monitor at the parameters
    the step starts from, and then takes its step (its own passes outside the monitor). The
    gradient is dropped before the step, so the step is the unmonitored one.
    """
    exact_gn = isinstance(optimizer, ExactGN)
    if exact_gn and monitor is None:
        return optimizer.step(x, y)
    optimizer.zero_grad(set_to_none=True)
    # the monitor records the batch from its own loss module's call (the same mean CE)
    value = batch_loss(model(x), y, loss) if monitor is None else monitor.loss_func(model(x), y)
    if monitor is None:
        value.backward()
    else:
        with monitor(step, loss=value, optimizer=optimizer):
            value.backward()
    if exact_gn:
        optimizer.zero_grad(set_to_none=True)
        with monitor.outside():
            return optimizer.step(x, y)
    optimizer.step()
    return float(value.detach())


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def divergence(loss: float, initial: float, factor: float) -> str | None:
    r"""Why a run whose loss is ``loss`` (initially ``initial``) has diverged, or ``None``.

    A run diverges when its loss is not finite, or when it exceeds ``factor`` times the initial
    loss (losses are non-negative, so the bound is :math:`\ell > c\,\ell_0`).
    """
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if loss > factor * initial:
        return f"loss {loss:.4g} exceeds {factor:g} times the initial loss {initial:.4g}"
    return None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Runner:
    """Runs every (phase, optimizer, seed) of a config into one results folder.

    Args:
        config: The experiment's settings.
        out: Results folder (``runs/NAME``).
        progress: Show tqdm progress bars.
        monitor: A :data:`~curvlab.diagnostics.PRESETS` name: monitor every update
            (see the module doc); ``None``: no monitor.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        out: str | Path,
        progress: bool = True,
        monitor: str | None = None,
    ) -> None:
        if monitor is not None and monitor not in PRESETS:
            raise ValueError(f"monitor must be one of {sorted(PRESETS)} or None, got {monitor!r}")
        if monitor is not None and config.loss != "ce":
            raise ValueError(
                f"monitor needs loss='ce' (the MSE targets are one-hot), got {config.loss!r}"
            )
        self.monitor = monitor
        config.check()
        self.config = config
        self.store = ResultsStore(out)
        self.progress = progress
        self.device = resolve_device(config.device)

    def run(self) -> ResultsStore:
        """Run (or resume) everything; returns the store."""
        data = load_data(self.config, self.device)  # first: a missing file leaves no folder behind
        self.check(data)  # and a setting the data cannot satisfy leaves none either
        defaults = ExperimentConfig(self.config.experiment).to_dict()
        self.store.open(self.config.to_dict(), defaults)
        for phase in self.config.phases:
            for seed in self.config.seeds:
                for name in self.config.optimizers:
                    self._run_one(phase, name, seed, data)
        return self.store

    def check(self, data: Data) -> None:
        """Check the settings that depend on the data, before anything is written.

        Raises:
            ValueError: ``subset`` (full batch) or ``batch_size`` (mini-batch) exceeds the
                training images.
        """
        c, available = self.config, len(data.train_x)
        if "fullbatch" in c.phases and c.subset > available:
            raise ValueError(f"subset={c.subset} exceeds the {available} training images")
        if "minibatch" in c.phases and c.batch_size > available:
            raise ValueError(f"batch_size={c.batch_size} exceeds the {available} training images")
        if c.experiment == "ntk-cka":
            smallest = min(c.subset if p == "fullbatch" else available for p in c.phases)
            if c.ntk_probe > smallest:
                raise ValueError(f"ntk_probe={c.ntk_probe} exceeds the {smallest} training images")

    # ------------------------------------------------------------------ one training run
    def _model(self, seed: int, data: Data) -> RevMLP:
        torch.manual_seed(seed)
        c = self.config
        model = RevMLP(
            data.train_x.shape[1],
            data.num_classes,
            c.hidden,
            c.depth,
            bias=c.bias,
            norm=c.norm,
            inverted_bottleneck=c.inverted_bottleneck,
        )
        return model.to(self.device)

    def _train_set(self, phase: str, seed: int, data: Data) -> tuple[Tensor, Tensor]:
        if phase == "minibatch":
            return data.train_x, data.train_y
        index = balanced_indices(data.train_y.cpu().numpy(), self.config.subset, seed)
        index = torch.as_tensor(index, device=self.device)
        return data.train_x[index], data.train_y[index]

    def _run_one(self, phase: str, name: str, seed: int, data: Data) -> None:
        c = self.config
        train_x, train_y = self._train_set(phase, seed, data)
        if phase == "fullbatch":
            steps_per_epoch, total = 1, c.steps
            eval_every = c.eval_every
        else:
            steps_per_epoch = len(train_x) // c.batch_size
            total = c.epochs * steps_per_epoch
            eval_every = max(1, steps_per_epoch // max(1, c.evals_per_epoch))
        model = self._model(seed, data)
        optimizer = build_optimizer(name, model, c.learning_rate(phase, name), c)
        checkpoint = self.store.checkpoint_path(phase, name, seed)
        step, train_time, initial = 0, 0.0, None
        tracker = None
        if c.experiment == "ntk-cka":
            tracker = KernelTracker(train_x[: c.ntk_probe], c.ntk_mode)
        if checkpoint.exists():
            state = torch.load(checkpoint, map_location=self.device, weights_only=True)
            if state.get("diverged"):
                return  # recorded as diverged: more steps or epochs do not restart it
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, train_time = state["step"], state["train_time"]
            initial = state.get("initial_loss")
            if tracker is not None:
                tracker.load_state_dict(state["ntk"])
        elif tracker is not None:
            tracker.start(model)  # the initialization: the kernel's and the blocks' reference
        if step >= total:
            return
        eval_x, eval_y = train_x[: c.eval_train_size], train_y[: c.eval_train_size]
        base = {"experiment": c.experiment, "phase": phase, "optimizer": name, "seed": seed}
        if step == 0:
            self._evaluate(model, base, 0, steps_per_epoch, 0.0, eval_x, eval_y, data, tracker)
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"{phase} {name} seed {seed}",
            disable=not self.progress,
            leave=False,
        )
        order = None
        monitor = self._monitor(phase, name, seed, model, optimizer, step)
        while step < total:
            epoch, position = divmod(step, steps_per_epoch)
            if phase == "minibatch":
                if position == 0 or order is None:
                    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
                    order = torch.randperm(len(train_x), generator=generator).to(self.device)
                index = order[position * c.batch_size : (position + 1) * c.batch_size]
                x, y = train_x[index], train_y[index]
            else:
                x, y = train_x, train_y
            started = time.perf_counter()
            try:
                before = update(optimizer, model, x, y, c.loss, monitor, step)
            except FloatingPointError as error:  # e.g. ExactGN's DivergedStepError (undone)
                loss = getattr(error, "loss_after", math.nan)
                reason = f"update {step + 1} refused: {error}"
                self._record_divergence(base, step, reason, loss, initial)
                self._checkpoint(
                    checkpoint, model, optimizer, step, train_time, initial, True, tracker
                )
                break
            if initial is None:
                initial = before
            reason, at = divergence(before, initial, c.diverge_factor), step
            if reason is None and not _finite(model):
                reason, at = "non-finite parameters", step + 1
            if reason is not None:
                self._record_divergence(base, at, reason, before, initial)
                self._checkpoint(
                    checkpoint, model, optimizer, at, train_time, initial, True, tracker
                )
                break
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            train_time += time.perf_counter() - started
            step += 1
            bar.update(1)
            if c.record_updates:
                after, _ = evaluate(model, x, y, c.loss)
                change = 100.0 * (after - before) / before
                self.store.append(
                    {
                        "type": "update",
                        **base,
                        "step": step,
                        "batch_loss_before": before,
                        "batch_loss_after": after,
                        "loss_change_pct": change,
                    }
                )
            early = phase == "fullbatch" and step <= c.eval_first
            if step % eval_every == 0 or step == total or early:
                loss = self._evaluate(
                    model, base, step, steps_per_epoch, train_time, eval_x, eval_y, data, tracker
                )
                reason = divergence(loss, initial, c.diverge_factor)
                if reason is not None:
                    self._record_divergence(base, step, reason, loss, initial)
                diverged = reason is not None
                self._checkpoint(
                    checkpoint, model, optimizer, step, train_time, initial, diverged, tracker
                )
                if diverged:
                    break
        bar.close()
        if monitor is not None:
            monitor.close()

    def _monitor(self, phase, name, seed, model, optimizer, step) -> Monitor | None:
        """The run's monitor from ``step`` on (``None``: none asked for)."""
        if self.monitor is None:
            return None
        folder = self.store.folder / "monitor" / f"{phase}-{name}-seed{seed}"
        return Monitor(
            model,
            torch.nn.CrossEntropyLoss(),
            self.monitor,
            folder,
            start_step=step,
            seed=seed,
            dashboard_every=10,
        )

    def _record_divergence(
        self, base: dict, step: int, reason: str, loss: float, initial: float | None
    ) -> None:
        """Append a ``diverged`` record (the caller then checkpoints the run as finished)."""
        self.store.append(
            {
                "type": "diverged",
                **base,
                "step": step,
                "loss": loss if math.isfinite(loss) else None,
                "initial_loss": initial,
                "message": reason,
            }
        )
        label = f"{base['phase']} {base['optimizer']} seed {base['seed']}"
        tqdm.write(f"{label} diverged after {step} updates: {reason}")

    def _checkpoint(
        self,
        path: Path,
        model: RevMLP,
        optimizer: torch.optim.Optimizer,
        step: int,
        train_time: float,
        initial_loss: float | None,
        diverged: bool = False,
        tracker: KernelTracker | None = None,
    ) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "train_time": train_time,
            "initial_loss": initial_loss,
            "diverged": diverged,
        }
        if tracker is not None:
            state["ntk"] = tracker.state_dict()
        self.store.save_checkpoint(path, state)

    def _evaluate(
        self, model, base, step, steps_per_epoch, train_time, eval_x, eval_y, data, tracker=None
    ) -> float:
        """Append an ``eval`` record (with ``tracker``'s fields, if any); returns its train loss."""
        kernel = {} if tracker is None else tracker.measure(model, step)
        record = evaluation_record(
            model, base, step, steps_per_epoch, train_time, (eval_x, eval_y), data, self.config.loss
        )
        self.store.append({**record, **kernel})
        return record["train_loss"]
