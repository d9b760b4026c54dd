r"""Time to accuracy: the first- and second-order optimizers of C7 on real images.

``curvlab run optim-race`` trains two small networks on 28x28 grey images (Fashion-MNIST) with
mini-batches, once per (model, optimizer, seed), and records every evaluation like the paper's
experiments (:mod:`curvlab.experiments.store`): step, training wall time, train loss, validation
and test loss and accuracy. The race's question is how many updates, and how many seconds, each
optimizer needs to reach a fixed test accuracy (:func:`time_to_accuracy`,
``curvlab summary FOLDER --at-test-acc X``).

The models (:func:`build_model`; inputs ``[N, 1, 28, 28]``, outputs ``[N, 10]``):

* ``cnn``: ``Conv2d(1, c1, 3, stride 2, padding 1)``, ReLU, ``Conv2d(c1, c2, 3, stride 2,
  padding 1)``, ReLU, ``Flatten``, ``Linear(7 * 7 * c2, 10)``, with ``(c1, c2)`` =
  ``cnn_channels`` (default ``(8, 16)``);
* ``revmlp``: :class:`curvlab.nn.RevMLP` with ``hidden`` and ``depth`` (default 128 and 2).

The optimizers (:func:`build_optimizer`; every one through its public constructor, stepped from
the standard closure): ``sgd`` (``torch.optim.SGD``, momentum 0.9), ``adam``
(``torch.optim.Adam``), ``kfac`` (:class:`~curvlab.optim.KFAC`, seeded MC Fisher),
``singd-dense`` and ``singd-diagonal`` (:class:`~curvlab.optim.SINGD` with that structure),
``rootfree-adam`` (:class:`~curvlab.optim.RootFreeAdam`), ``ifshampoo``
(:class:`~curvlab.optim.IFShampoo`) and ``adahesscale`` (:class:`~curvlab.optim.AdaHesScale`);
everything but the learning rate at its defaults. A pair in :data:`UNSUPPORTED` (none now: the
RevMLP's AdaHesScale, skipped by the earlier study, runs since the engine's HesScale covers it) is
skipped and the run says why. The rate of every (model, optimizer) is
``lr[model][optimizer]``; ``curvlab sweep optim-race --models M --optimizer O --lrs ...`` picks
it on the validation split.

In the records, ``phase`` is the model's name, so that the store's keys and ``curvlab summary``
work unchanged; every ``eval`` record also carries its ``lr``. Resuming follows the paper's
runner: the records of an evaluation reach the disk before the checkpoint (model, optimizer,
step, training time) that follows it, and a killed run continues from its last checkpoint with
the same batches (the order of epoch :math:`e` is drawn from seed ``seed * 100003 + e``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn
from tqdm import tqdm

from curvlab.backprop.errors import NonFiniteError
from curvlab.data import load_dataset, to_float
from curvlab.experiments.config import RACE_MODELS, RACE_OPTIMIZERS
from curvlab.experiments.plots import markdown_table
from curvlab.experiments.runner import (
    divergence,
    evaluation_record,
    resolve_device,
    validation_split,
)
from curvlab.experiments.store import ResultsStore
from curvlab.nn import RevMLP
from curvlab.optim import KFAC, SINGD, AdaHesScale, IFShampoo, RootFreeAdam

NAME = "optim-race"
MODELS = RACE_MODELS
OPTIMIZERS = RACE_OPTIMIZERS
#: (model, optimizer) pairs the race skips, and why.
UNSUPPORTED: dict[tuple[str, str], str] = {}
#: SGD's heavy-ball momentum in the race.
SGD_MOMENTUM = 0.9
#: An evaluation whose train loss exceeds this many times the run's lowest earlier one marks a
#: blow-up (:func:`blow_up`): the run goes on (it is not diverged) but its records say so.
BLOWUP_FACTOR = 10.0


def default_lr() -> dict[str, dict[str, float]]:
    """Rates of every (model, optimizer): the sweep's choice on full Fashion-MNIST.

    ``curvlab sweep optim-race`` on seed 42, one epoch per rate, by the final loss on a
    validation split of 5,000 images; docs/optim_race.md gives every point.
    """
    return {
        "cnn": {
            "sgd": 0.03,
            "adam": 0.01,
            "kfac": 0.03,
            "singd-dense": 0.03,
            "singd-diagonal": 0.01,
            "rootfree-adam": 3e-3,
            "ifshampoo": 1e-3,
            "adahesscale": 1e-3,
        },
        "revmlp": {
            "sgd": 0.01,
            "adam": 1e-3,
            "kfac": 3e-3,
            "singd-dense": 3e-3,
            "singd-diagonal": 1e-3,
            "rootfree-adam": 9e-5,
            "ifshampoo": 3e-4,
            # not swept (the study ran without it, docs/optim_race.md); 1e-3 diverges on the
            # bundled data, 3e-4 trains there
            "adahesscale": 3e-4,
        },
    }


@dataclass
class OptimRaceConfig:
    """Settings of ``curvlab run optim-race``; stored in the results header.

    Attributes:
        dataset: ``bundled``, ``fashion-mnist`` or ``mnist`` (28x28 grey images).
        data_path: Directory of the dataset files (``None``: the loader's search order).
        models: Subset of :data:`MODELS`.
        optimizers: Subset of :data:`OPTIMIZERS`, run one after the other.
        seeds: One run per seed, model and optimizer (the same initialization for every
            optimizer of a model).
        epochs: Passes over the training images.
        steps: At most this many updates (``None``: ``epochs`` full passes).
        batch_size: Mini-batch size.
        evals_per_epoch: Evaluations (and checkpoints) per epoch.
        eval_train_size: Training images of the reported train loss and accuracy.
        validation: Class-balanced validation images held out of the training set
            (:func:`~curvlab.experiments.runner.validation_split`); ``0``: none.
        hidden: The RevMLP's expansion width.
        depth: The RevMLP's reversible blocks.
        cnn_channels: The CNN's two convolutions' output channels.
        lr: Rate per model and optimizer, ``{model: {optimizer: rate}}``.
        diverge_factor: A run whose loss exceeds this many times its first batch loss is
            recorded as diverged and stopped.
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    dataset: str = "fashion-mnist"
    data_path: str | None = None
    models: tuple[str, ...] = MODELS
    optimizers: tuple[str, ...] = OPTIMIZERS
    seeds: tuple[int, ...] = (42,)
    epochs: int = 2
    steps: int | None = None
    batch_size: int = 128
    evals_per_epoch: int = 4
    eval_train_size: int = 5000
    validation: int = 5000
    hidden: int = 128
    depth: int = 2
    cnn_channels: tuple[int, int] = (8, 16)
    lr: dict[str, dict[str, float]] = field(default_factory=default_lr)
    diverge_factor: float = 1e3
    device: str = "auto"

    def check(self) -> None:
        """Raises ``ValueError`` naming the first setting out of range."""
        if self.dataset not in ("bundled", "fashion-mnist", "mnist"):
            raise ValueError(
                f"optim-race takes 28x28 images: dataset must be bundled, fashion-mnist or "
                f"mnist, got {self.dataset!r}"
            )
        for name, choices in (("models", MODELS), ("optimizers", OPTIMIZERS)):
            values = getattr(self, name)
            bad = sorted(set(values) - set(choices))
            if not values or bad:
                raise ValueError(
                    f"optim-race: unknown {name} {bad or 'none given'}; choose from {choices}"
                )
        if not self.seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds
        ):
            raise ValueError(f"seeds must be non-negative integers, got {self.seeds!r}")
        for name in (
            "epochs",
            "batch_size",
            "evals_per_epoch",
            "eval_train_size",
            "hidden",
            "depth",
        ):
            _positive(name, getattr(self, name))
        if self.steps is not None:
            _positive("steps", self.steps)
        if (
            isinstance(self.validation, bool)
            or not isinstance(self.validation, int)
            or (self.validation < 0)
        ):
            raise ValueError(f"validation must be an integer >= 0, got {self.validation!r}")
        if len(self.cnn_channels) != 2:
            raise ValueError(f"cnn_channels must be two integers, got {self.cnn_channels!r}")
        for value in self.cnn_channels:
            _positive("cnn_channels", value)
        if not self.diverge_factor > 1:
            raise ValueError(f"diverge_factor must be > 1, got {self.diverge_factor!r}")
        for model in self.models:
            for name in self.optimizers:
                rate = self.lr.get(model, {}).get(name)
                if rate is None or not rate > 0:
                    raise ValueError(f"lr[{model!r}][{name!r}] must be > 0, got {rate!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict of the config, with the experiment's name."""
        return {"experiment": NAME, **dataclasses.asdict(self)}


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


#: Scaled-down settings for the bundled subset (2,048 train / 1,024 test images).
BUNDLED_DEFAULTS = {"validation": 256, "eval_train_size": 1024, "evals_per_epoch": 2}


def make_race_config(lr: dict[str, float] | None = None, **overrides) -> OptimRaceConfig:
    """The default config with ``overrides`` (``None`` values ignored) and checked.

    With ``dataset="bundled"`` the defaults are :data:`BUNDLED_DEFAULTS`'s.

    Args:
        lr: Rates by optimizer name, applied to every model of the config.
        **overrides: Fields of :class:`OptimRaceConfig`.

    Raises:
        ValueError: an unknown field or optimizer name, or a setting out of range.
    """
    names = {f.name for f in dataclasses.fields(OptimRaceConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"optim-race: unknown settings {unknown}; valid: {sorted(names)}")
    values = dict(BUNDLED_DEFAULTS) if overrides.get("dataset") == "bundled" else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = OptimRaceConfig(**values)
    bad = sorted(set(lr or {}) - set(OPTIMIZERS))
    if bad:
        raise ValueError(f"optim-race: unknown optimizers {bad} in lr; choose from {OPTIMIZERS}")
    for rates in config.lr.values():
        rates.update(lr or {})
    config.check()
    return config


# ---------------------------------------------------------------------- models and optimizers
def build_model(name: str, config: OptimRaceConfig, num_classes: int = 10) -> nn.Module:
    """The race's ``cnn`` or ``revmlp`` (see the module doc); inputs ``[N, 1, 28, 28]``."""
    if name == "cnn":
        c1, c2 = config.cnn_channels
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(7 * 7 * c2, num_classes),
        )
    if name == "revmlp":
        return RevMLP(28 * 28, num_classes, config.hidden, config.depth)
    raise ValueError(f"optim-race: unknown model {name!r}; choose from {MODELS}")


def build_optimizer(
    name: str, model: nn.Module, lr: float, loss_func: nn.Module, batch_size: int, seed: int
) -> torch.optim.Optimizer:
    """One of :data:`OPTIMIZERS` over ``model``'s trainable parameters, at its defaults but ``lr``.

    Args:
        name: The optimizer's name in the race.
        model: The network (KFAC, SINGD and AdaHesScale take it first).
        lr: The learning rate.
        loss_func: The closure's loss module.
        batch_size: The mini-batch size (the root-free methods scale their statistic by it).
        seed: Seed of KFAC's MC labels (saved in its ``state_dict``).

    Raises:
        ValueError: an unknown ``name``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "kfac":
        return KFAC(model, lr=lr, loss_func=loss_func, seed=seed)
    if name.startswith("singd-") and name in OPTIMIZERS:
        structure = name.removeprefix("singd-")
        return SINGD(model, lr=lr, loss_func=loss_func, structure=structure)
    if name == "rootfree-adam":
        return RootFreeAdam(params, lr=lr, batch_size=batch_size)
    if name == "ifshampoo":
        return IFShampoo(params, lr=lr, batch_size=batch_size)
    if name == "adahesscale":
        return AdaHesScale(model, lr=lr, loss_func=loss_func)
    raise ValueError(f"optim-race: unknown optimizer {name!r}; choose from {OPTIMIZERS}")


# ---------------------------------------------------------------------- data and evaluation
@dataclass
class RaceData:
    """Standardized images ``[N, 1, 28, 28]`` and labels ``[N]`` of every split."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    val_x: Tensor | None = None
    val_y: Tensor | None = None


def load_race_data(config: OptimRaceConfig, device: torch.device) -> RaceData:
    """Load the images, hold out the validation split, standardize by the trained-on images."""
    train_images, train_y = load_dataset(config.dataset, "train", config.data_path)
    test_images, test_y = load_dataset(config.dataset, "test", config.data_path)
    train_x, test_x = to_float(train_images), to_float(test_images)
    val_x = val_y = None
    if config.validation:
        held, rest = validation_split(train_y, config.validation)
        val_x, val_y = train_x[held], train_y[held]
        train_x, train_y = train_x[rest], train_y[rest]
    if config.batch_size > len(train_x):
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(train_x)} images")
    mean, std = train_x.mean(), train_x.std()

    def prepare(x: Tensor | None) -> Tensor | None:
        return None if x is None else ((x - mean) / std).to(device)

    return RaceData(
        prepare(train_x),
        train_y.to(device),
        prepare(test_x),
        test_y.to(device),
        prepare(val_x),
        None if val_y is None else val_y.to(device),
    )


# ---------------------------------------------------------------------- the runner
def _update(optimizer: torch.optim.Optimizer, closure, step: int) -> tuple[float, str | None]:
    """One step from the closure: the batch loss before it, and why it was refused (or ``None``).

    The engine refuses non-finite outputs (``NonFiniteError``) and ExactGN-like optimizers
    refuse a step with a ``FloatingPointError``; both end the run as diverged.
    """
    try:
        return float(optimizer.step(closure).detach()), None
    except (FloatingPointError, NonFiniteError) as error:
        return math.nan, f"update {step + 1} refused: {error}"


class OptimRace:
    """Runs (or resumes) every (model, seed, optimizer) of a config into one results folder.

    Args:
        config: The settings.
        out: Results folder.
        progress: Show tqdm progress bars.
    """

    def __init__(self, config: OptimRaceConfig, out: str | Path, progress: bool = True) -> None:
        config.check()
        self.config = config
        self.store = ResultsStore(out)
        self.progress = progress
        self.device = resolve_device(config.device)

    def run(self) -> ResultsStore:
        """Run everything not yet finished; returns the store."""
        data = load_race_data(self.config, self.device)
        self.store.open(self.config.to_dict())
        for model in self.config.models:
            for seed in self.config.seeds:
                for name in self.config.optimizers:
                    if (model, name) in UNSUPPORTED:
                        if seed == self.config.seeds[0]:
                            why = UNSUPPORTED[(model, name)]
                            tqdm.write(f"optim-race: skipping {model} {name}: {why}")
                        continue
                    self._run_one(model, name, seed, data)
        return self.store

    def _run_one(self, model_name: str, name: str, seed: int, data: RaceData) -> None:
        c = self.config
        steps_per_epoch = len(data.train_x) // c.batch_size
        total = c.epochs * steps_per_epoch if c.steps is None else c.steps
        eval_every = max(1, steps_per_epoch // c.evals_per_epoch)
        torch.manual_seed(seed)
        model = build_model(model_name, c).to(self.device)
        loss_func = nn.CrossEntropyLoss()
        lr = c.lr[model_name][name]
        optimizer = build_optimizer(name, model, lr, loss_func, c.batch_size, seed)
        checkpoint = self.store.checkpoint_path(model_name, name, seed)
        step, train_time, initial, finished = self._restore(checkpoint, model, optimizer)
        if finished or step >= total:
            return
        base = {"experiment": NAME, "phase": model_name, "optimizer": name, "seed": seed, "lr": lr}
        run = (model_name, name, seed)
        self._history = [
            r for r in self.store.evaluations() if (r["phase"], r["optimizer"], r["seed"]) == run
        ]
        if step == 0:
            self._evaluate(model, base, 0, steps_per_epoch, 0.0, data)
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"{model_name} {name} seed {seed}",
            disable=not self.progress,
            leave=False,
        )
        order = None
        while step < total:
            epoch, position = divmod(step, steps_per_epoch)
            if position == 0 or order is None:
                generator = torch.Generator().manual_seed(seed * 100003 + epoch)
                order = torch.randperm(len(data.train_x), generator=generator).to(self.device)
            index = order[position * c.batch_size : (position + 1) * c.batch_size]
            x, y = data.train_x[index], data.train_y[index]

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                value = loss_func(model(x), y)
                value.backward()
                return value

            started = time.perf_counter()
            before, refused = _update(optimizer, closure, step)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            train_time += time.perf_counter() - started
            initial = before if initial is None else initial
            reason = refused or divergence(before, initial, c.diverge_factor)
            if reason is None and not all(bool(p.isfinite().all()) for p in model.parameters()):
                reason = "non-finite parameters"
            step += 1
            bar.update(1)
            if reason is None and (step % eval_every == 0 or step == total):
                loss = self._evaluate(model, base, step, steps_per_epoch, train_time, data)
                reason = divergence(loss, initial, c.diverge_factor)
            if reason is not None:
                self.store.append(
                    {
                        "type": "diverged",
                        **base,
                        "step": step,
                        "loss": before if math.isfinite(before) else None,
                        "initial_loss": initial,
                        "message": reason,
                    }
                )
                tqdm.write(f"{model_name} {name} seed {seed} diverged after {step}: {reason}")
            if reason is not None or step % eval_every == 0 or step == total:
                state = {"step": step, "train_time": train_time, "initial_loss": initial}
                self._save(checkpoint, model, optimizer, state, diverged=reason is not None)
            if reason is not None:
                break
        bar.close()

    def _restore(
        self, checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[int, float, float | None, bool]:
        """Load a run's checkpoint into ``model`` and ``optimizer``, if there is one.

        Returns:
            ``(step, train_time, initial_loss, diverged)``; ``(0, 0.0, None, False)`` for a new
            run, and a diverged run's is not loaded.
        """
        if not checkpoint.exists():
            return 0, 0.0, None, False
        state = torch.load(checkpoint, map_location=self.device, weights_only=True)
        if state["diverged"]:
            return state["step"], state["train_time"], state["initial_loss"], True
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return state["step"], state["train_time"], state["initial_loss"], False

    def _save(
        self,
        checkpoint: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict,
        diverged: bool,
    ) -> None:
        """Checkpoint the model, the optimizer and ``state`` (after the records it follows)."""
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            **state,
            "diverged": diverged,
        }
        self.store.save_checkpoint(checkpoint, state)

    def _evaluate(self, model, base, step, steps_per_epoch, train_time, data) -> float:
        """Append an ``eval`` record; returns its train loss.

        The record's ``blew_up`` is true from the run's first :func:`blow_up` on (records from
        before this field have none; :func:`time_to_accuracy` finds their blow-ups the same way).
        """
        n = self.config.eval_train_size
        train = (data.train_x[:n], data.train_y[:n])
        record = evaluation_record(model, base, step, steps_per_epoch, train_time, train, data)
        self._history.append(record)
        record["blew_up"] = blow_up(self._history) is not None
        self.store.append(record)
        return record["train_loss"]


# ---------------------------------------------------------------------- time to accuracy
def blow_up(evaluations: list[dict], factor: float = BLOWUP_FACTOR) -> int | None:
    """The step where a run's loss blew up, or ``None``.

    That is its first evaluation whose train loss exceeds ``factor`` times the lowest before it.
    A loss that rises by that factor and stays under the divergence bound (the first batch loss
    times ``diverge_factor``) is a blow-up the bound misses: the CNN's RootFreeAdam seed 44 went
    from 0.38 to 327 at update 963 (docs/optim_race.md). Non-finite losses are left to the
    divergence check.

    Args:
        evaluations: One run's ``eval`` records (any order).
        factor: The rise that counts, ``> 1``.
    """
    lowest = math.inf
    for r in sorted(evaluations, key=lambda r: r["step"]):
        loss = r.get("train_loss")
        if loss is None or not math.isfinite(loss):
            continue
        if loss > factor * lowest:
            return int(r["step"])
        lowest = min(lowest, loss)
    return None


def _reach(evaluations: list[dict], threshold: float) -> tuple[float, float] | None:
    r"""``(step, time_s)`` where the test accuracy first reaches ``threshold``, or ``None``.

    Linear interpolation between the last evaluation below the threshold (accuracy
    :math:`a_0`) and the first at or above it (:math:`a_1`), with weight
    :math:`w = (t - a_0) / (a_1 - a_0)`; a run that starts at or above it reports step 0.
    """
    previous = None
    for r in sorted(evaluations, key=lambda r: r["step"]):
        if r["test_acc"] >= threshold:
            if previous is None:
                return float(r["step"]), float(r["time_s"])
            w = (threshold - previous["test_acc"]) / (r["test_acc"] - previous["test_acc"])
            return tuple(float((1 - w) * previous[k] + w * r[k]) for k in ("step", "time_s"))  # type: ignore[return-value]
        previous = r
    return None


def time_to_accuracy(folder: str | Path | Sequence[str | Path], threshold: float) -> list[dict]:
    """Steps and training seconds to a test accuracy, and the final one, per (model, optimizer).

    Args:
        folder: Run folders or records files (``NAME.jsonl.gz``) of the race, whose runs are
            disjoint.
        threshold: The test accuracy to reach, in ``[0, 1]``.

    Returns:
        One row per (model, optimizer), in :data:`MODELS` and :data:`OPTIMIZERS` order:
        ``model``, ``optimizer``, ``lr`` (of the runs; ``None`` if they differ), ``seeds``,
        ``reached`` (the seeds that reach the threshold), ``steps`` and ``time_s`` (mean and
        ``*_std``, sample standard deviation, over ``reached``; ``None`` if none), ``final_acc``
        and ``final_acc_std`` (the last evaluation, over every seed), ``diverged`` (seeds) and
        ``blew_up`` (``{seed: step}`` of the seeds not diverged whose loss blew up:
        :func:`blow_up`, from the evaluations, so older records are flagged too).

    Raises:
        ValueError: ``threshold`` outside ``[0, 1]``.
        NoResultsError: a source holds no evaluation.
    """
    from curvlab.experiments.plots import _Union

    if isinstance(threshold, bool) or not (0 <= threshold <= 1):
        raise ValueError(f"threshold must be a test accuracy in [0, 1], got {threshold!r}")
    store = _Union(folder)
    runs: dict[tuple, list[dict]] = {}
    for r in store.evaluations():
        runs.setdefault((r["phase"], r["optimizer"], r["seed"]), []).append(r)
    diverged = {(r["phase"], r["optimizer"], r["seed"]) for r in store.diverged()}
    groups: dict[tuple, list[int]] = {}
    for model, name, seed in runs:
        groups.setdefault((model, name), []).append(seed)

    def order(key: tuple) -> tuple:
        model, name = key
        return (
            MODELS.index(model) if model in MODELS else len(MODELS),
            model,
            OPTIMIZERS.index(name) if name in OPTIMIZERS else len(OPTIMIZERS),
            name,
        )

    rows = []
    for model, name in sorted(groups, key=order):
        seeds = sorted(groups[(model, name)])
        reach = {s: _reach(runs[(model, name, s)], threshold) for s in seeds}
        reached = [s for s in seeds if reach[s] is not None]
        finals = [max(runs[(model, name, s)], key=lambda r: r["step"]) for s in seeds]
        rates = {f.get("lr") for f in finals}
        row = {
            "model": model,
            "optimizer": name,
            "lr": rates.pop() if len(rates) == 1 else None,
            "seeds": len(seeds),
            "reached": reached,
            "diverged": [s for s in seeds if (model, name, s) in diverged],
        }
        blown = {s: blow_up(runs[(model, name, s)]) for s in seeds if s not in row["diverged"]}
        row["blew_up"] = {s: step for s, step in blown.items() if step is not None}
        for key, values in (
            ("steps", [reach[s][0] for s in reached]),
            ("time_s", [reach[s][1] for s in reached]),
            ("final_acc", [f["test_acc"] for f in finals]),
        ):
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _mean_std(row: dict, key: str, digits: int) -> str:
    """``mean`` of one seed, ``mean ± std`` of several, ``-`` for none."""
    count = row["seeds"] if key == "final_acc" else len(row["reached"])
    if row[key] is None:
        return "-"
    if count > 1:
        return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"
    return f"{row[key]:.{digits}f}"


def _flags(row: dict) -> str:
    """The ``diverged`` cell: diverged seeds, then those whose loss blew up, or ``-``."""
    flags = [f"seed {s}" for s in row["diverged"]]
    flags += [f"seed {s} blew up at {step}" for s, step in row.get("blew_up", {}).items()]
    return ", ".join(flags) or "-"


def time_to_accuracy_table(folder: str | Path | Sequence[str | Path], threshold: float) -> str:
    """:func:`time_to_accuracy` as the Markdown table ``curvlab summary --at-test-acc`` prints."""
    head = [
        "model",
        "optimizer",
        "lr",
        f"reached {threshold:g}",
        "steps",
        "time s",
        "final test acc",
        "diverged",
    ]
    rows = []
    for r in time_to_accuracy(folder, threshold):
        cells = [
            r["model"],
            r["optimizer"],
            "-" if r["lr"] is None else f"{r['lr']:g}",
            f"{len(r['reached'])}/{r['seeds']}",
            _mean_std(r, "steps", 0),
            _mean_std(r, "time_s", 1),
            _mean_std(r, "final_acc", 4),
            _flags(r),
        ]
        rows.append(cells)
    return markdown_table(head, rows)


# ---------------------------------------------------------------------- figures
#: Panels of every model's figure: (record key, x key, axis labels).
PANELS = (
    ("train_loss", "step", "updates", "train loss"),
    ("train_loss", "time_s", "training wall time (s)", "train loss"),
    ("test_acc", "step", "updates", "test accuracy"),
    ("test_acc", "time_s", "training wall time (s)", "test accuracy"),
)


def _mean_curve(runs: list[list[dict]], key: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Means over seeds of ``x_key`` and ``key`` at every recorded step (finite values).

    A seed that stopped (diverged) drops out of the mean after its last evaluation.
    """
    by_step: dict[int, list[dict]] = {}
    for evaluations in runs:
        for r in evaluations:
            if r.get(key) is not None and math.isfinite(r[key]):
                by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)
    x = np.array([np.mean([r[x_key] for r in by_step[s]]) for s in steps])
    y = np.array([np.mean([r[key] for r in by_step[s]]) for s in steps])
    return x, y


def race_figures(folder: str | Path | Sequence[str | Path]) -> dict[str, plt.Figure]:
    """One figure per model, ``optim_race_MODEL.png``, the mean over seeds of every optimizer.

    Panels: train loss and test accuracy against updates and against training wall time.
    """
    from curvlab.experiments.plots import _Union

    runs: dict[tuple, list[dict]] = {}
    for r in _Union(folder).evaluations():
        runs.setdefault((r["phase"], r["optimizer"], r["seed"]), []).append(r)
    colors = dict(zip(OPTIMIZERS, plt.get_cmap("tab10").colors, strict=False))
    out = {}
    for model in [m for m in MODELS if any(k[0] == m for k in runs)]:
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
        seeds = sorted({k[2] for k in runs if k[0] == model})
        initial = max(
            r["train_loss"] for k, rs in runs.items() if k[0] == model for r in rs if r["step"] == 0
        )
        for ax, (key, x_key, xlabel, ylabel) in zip(axes.flat, PANELS, strict=True):
            for name in OPTIMIZERS:
                mine = [v for k, v in runs.items() if k[:2] == (model, name)]
                if mine:
                    x, y = _mean_curve(mine, key, x_key)
                    ax.plot(x, y, label=name, color=colors[name], lw=1.4)
            if key == "train_loss":  # from the lowest to the initial loss; blow-ups leave the axis
                ax.set_yscale("log")
                ax.set_ylim(top=2.0 * initial)
            else:  # the race is decided above 60 %
                ax.set_ylim(0.6, 0.95)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8, ncol=2)
        fig.suptitle(
            f"optim-race, {model}: mean over seeds {', '.join(map(str, seeds))} (a diverged"
            " seed drops out after its last evaluation)\ntraining wall time on the machine of the run",
            fontsize=11,
        )
        fig.tight_layout()
        out[f"optim_race_{model}.png"] = fig
    return out


def plot_race(
    folder: str | Path | Sequence[str | Path], out: str | Path | None = None
) -> list[Path]:
    """Write :func:`race_figures` into ``out`` (default: the first folder); returns the paths."""
    first = Path(folder if isinstance(folder, (str, Path)) else folder[0])
    target = Path(out) if out is not None else (first if first.is_dir() else first.parent)
    paths = []
    for name, fig in race_figures(folder).items():
        path = target / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
