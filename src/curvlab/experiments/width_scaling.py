r"""The width study: how far do networks of practical width train from the kernel regime?

Seed 002, abstract 5 (Wenger et al., "On the disconnect between theory and practice of neural
networks: limits of the NTK perspective") asks whether the infinite-width (NTK) limit describes
networks of the widths people train. This experiment measures it on real images for an MLP and a
CNN of growing width at fixed depth, each trained next to its linearization
:math:`f_{\text{lin}}(x;\theta) = f(x;\theta_0) + J(x;\theta_0)(\theta-\theta_0)`
(:func:`~curvlab.diagnostics.linearize`) by the same optimizer on the same data, from the same
:math:`\theta_0`. Three questions, one figure each:

1. **Kernel regime** (``width_kernel.png``): the NTK's relative change on a probe,
   :math:`\lVert\Theta_T-\Theta_0\rVert_F/\lVert\Theta_0\rVert_F` (trace kernel ``[N, N]``), one
   minus the linear CKA of the first, middle and last layers' outputs to their initial values, and
   the linearization error, the trained network's distance from its trained linearization on the
   test images relative to how far it moved, :math:`\lVert f_T - f_{\text{lin},T}\rVert_F /
   \lVert f_T - f_0\rVert_F`. All three tend to 0 in the kernel regime.
2. **Predictive uncertainty** (``width_uncertainty.png``): on the test images, the mean predictive
   entropy and the expected calibration error (15 equal-width confidence bins) of the network and
   of its linearization, and their mean :math:`\mathrm{KL}(p_{\text{net}}\,\Vert\,p_{\text{lin}})`.
   In the kernel regime the two models' predictions, and so their uncertainties, agree.
3. **Forgetting** (``width_forgetting.png``): a two-task split of the classes (task A: 0-4, task B:
   5-9), trained on A for half the steps and then on B, for the network and for its
   linearization (which theory predicts forgets less, and the wide network as little). With one
   shared 10-way head, training on B alone drives A's test accuracy to about 0 at every width
   (``*_acc_a_after_b``, ``*_forgetting``), so forgetting is also measured within A's classes
   (the argmax over the logits of 0-4, as a task-aware head would read them):
   ``*_task_forgetting`` is that accuracy after A minus after B.

Parametrization and rates: PyTorch's default (standard) initialization, full-batch gradient
descent on a class-balanced training subset with cross-entropy. In the standard parametrization
the NTK grows with the width (the last layer alone contributes :math:`\lVert h\rVert^2`), and a
CNN's differs from an MLP's by orders of magnitude, so one fixed rate would diverge at one end
and not train at the other. Every network therefore gets the rate
:math:`\eta = c\, N_p / \lambda_{\max}(\Theta_0)`, with :math:`\Theta_0` the full initial NTK
``[N_p C, N_p C]`` of the probe and :math:`c` = ``lr`` (default 2): the same step relative to
the curvature of the mean loss (whose GGN is :math:`J^\top H J / N`, with :math:`\lambda_{\max}
(H) \le 1/2` for cross-entropy), so every width trains equally far from the edge of stability.

Every (question, family, width, seed) is one unit: it is written as one ``width`` record when it
finishes, so a killed run resumes at the first unit without a record (a unit takes seconds to a
few minutes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from curvlab.data import load_dataset, to_float  # noqa: E402
from curvlab.data.splits import balanced_indices  # noqa: E402
from curvlab.diagnostics import (  # noqa: E402
    empirical_ntk,
    first_middle_last,
    linear_cka,
    linearize,
    ntk_change,
)
from curvlab.diagnostics.cka import record_representations  # noqa: E402
from curvlab.experiments.runner import resolve_device  # noqa: E402
from curvlab.experiments.store import (  # noqa: E402
    ConfigMismatchError,
    ResultsStore,
    versions,
)

NAME = "width-scaling"
FAMILIES = ("mlp", "cnn")
QUESTIONS = ("kernel", "forgetting")  # "kernel" also measures the uncertainty (same training)
FIGURES = {
    "kernel": "width_kernel.png",
    "uncertainty": "width_uncertainty.png",
    "forgetting": "width_forgetting.png",
}
#: Settings a run that recorded units may be resumed with other values of: they add units.
UNIT_SETTINGS = ("seeds", "families", "mlp_widths", "cnn_widths")
#: The two tasks of the forgetting question: classes 0-4, then 5-9.
TASK_A, TASK_B = tuple(range(5)), tuple(range(5, 10))
#: Confidence bins of the expected calibration error.
ECE_BINS = 15


@dataclass
class WidthScalingConfig:
    r"""Settings of ``curvlab run width-scaling``; stored in the results header.

    Attributes:
        dataset: ``bundled``, ``fashion-mnist`` or ``mnist`` (28x28 grey images).
        data_path: Directory of the dataset files (``None``: the loader's search order).
        seeds: One unit per seed (initialization and training subset).
        families: Subset of :data:`FAMILIES`.
        mlp_widths: Hidden widths of the MLP (``depth`` hidden layers).
        cnn_widths: Channels of the CNN (``depth`` convolutions, 3x3, stride 2).
        depth: Hidden layers (MLP) or convolutions (CNN).
        train_size: Class-balanced training images (full-batch gradient descent).
        steps: Gradient-descent steps (the forgetting question: half on each task).
        lr: Rate factor :math:`c` of :math:`\eta = c\, N_p / \lambda_{\max}(\Theta_0)`.
        cnn_steps: The CNNs' steps (``None``: ``steps``); CNNs need more than MLPs.
        cnn_lr: The CNNs' rate factor :math:`c` (``None``: ``lr``).
        probe: Training images of the NTK and CKA probe.
        test_size: Test images of the accuracy, uncertainty and linearization error.
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    dataset: str = "bundled"
    data_path: str | None = None
    seeds: tuple[int, ...] = (42,)
    families: tuple[str, ...] = FAMILIES
    mlp_widths: tuple[int, ...] = (32, 128, 512, 1024)
    cnn_widths: tuple[int, ...] = (4, 8, 16, 32)
    depth: int = 3
    train_size: int = 512
    steps: int = 200
    lr: float = 2.0
    cnn_steps: int | None = None
    cnn_lr: float | None = None
    probe: int = 32
    test_size: int = 1024
    device: str = "auto"

    def check(self) -> None:
        """Raises ``ValueError`` naming the first setting out of range."""
        if self.dataset not in ("bundled", "fashion-mnist", "mnist"):
            raise ValueError(
                f"width-scaling takes 28x28 images: dataset must be bundled, fashion-mnist or "
                f"mnist, got {self.dataset!r}"
            )
        bad = sorted(set(self.families) - set(FAMILIES))
        if not self.families or bad:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {bad}")
        for name in ("mlp_widths", "cnn_widths", "seeds"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ValueError(f"{name} must be a non-empty tuple of integers, got {values!r}")
        if min(self.mlp_widths) <= 0 or min(self.cnn_widths) <= 0 or min(self.seeds) < 0:
            raise ValueError("widths must be positive and seeds non-negative")
        for name in ("depth", "train_size", "steps", "probe", "test_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cnn_steps is not None and (
            isinstance(self.cnn_steps, bool) or not isinstance(self.cnn_steps, int)
        ):
            raise ValueError(f"cnn_steps must be a positive integer, got {self.cnn_steps!r}")
        for name in ("steps", "cnn_steps"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2 (half per task for forgetting), got {value}")
        if self.probe > self.train_size:
            raise ValueError(f"probe={self.probe} exceeds train_size={self.train_size}")
        for name in ("lr", "cnn_lr"):
            value = getattr(self, name)
            if name == "cnn_lr" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")

    def widths(self, family: str) -> tuple[int, ...]:
        """The widths of ``family``, sorted."""
        return tuple(sorted(self.mlp_widths if family == "mlp" else self.cnn_widths))

    def steps_of(self, family: str) -> int:
        """The gradient-descent steps of ``family`` (``cnn_steps`` for CNNs where set)."""
        return self.cnn_steps if family == "cnn" and self.cnn_steps is not None else self.steps

    def lr_of(self, family: str) -> float:
        """The rate factor :math:`c` of ``family`` (``cnn_lr`` for CNNs where set)."""
        return self.cnn_lr if family == "cnn" and self.cnn_lr is not None else self.lr

    def to_dict(self) -> dict:
        """JSON-ready dict of the config (tuples become lists)."""
        return {"experiment": NAME, **asdict(self)}


def build_model(family: str, width: int, depth: int, num_classes: int = 10) -> nn.Sequential:
    """The MLP or CNN of the study, in PyTorch's default (standard) parametrization.

    MLP: ``Flatten``, then ``depth`` times ``Linear(., width), ReLU``, then ``Linear(width, C)``.
    CNN: ``depth`` times ``Conv2d(., width, 3, padding=1, stride=2), ReLU`` (28, 14, 7, 4
    pixels: at depth 3 the last maps are 4x4), a global average pool, then ``Linear(width, C)``.
    Inputs ``[N, 1, 28, 28]``.
    """
    layers: list[nn.Module] = []
    if family == "mlp":
        layers.append(nn.Flatten())
        features = 28 * 28
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
    elif family == "cnn":
        channels = 1
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, stride=2),
                nn.ReLU(),
            ]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    r"""ECE: :math:`\sum_b \frac{|B_b|}{N} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`.

    Args:
        probs: ``[N, C]`` predicted class probabilities.
        labels: ``[N]`` true classes.
        bins: Equal-width bins of the confidence :math:`\max_c p_c` over :math:`[0, 1]`.
    """
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap = correct[members].mean() - confidence[members].double().mean()
            total += float(members.double().mean() * gap.abs())
    return total


def _entropy(probs: Tensor) -> float:
    return float(-(probs * probs.clamp_min(1e-30).log()).sum(1).mean())


def _train(model: nn.Module, x: Tensor, y: Tensor, lr: float, steps: int) -> None:
    """Full-batch gradient descent on the cross-entropy."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@torch.no_grad()
def _loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float(F.cross_entropy(model(x), y))


@torch.no_grad()
def _accuracy(
    model: nn.Module, x: Tensor, y: Tensor, classes: Sequence[int] | None = None
) -> float:
    """Accuracy of the argmax over all classes, or over ``classes`` only (a task's head)."""
    logits = model(x)
    if classes is None:
        return float((logits.argmax(1) == y).double().mean())
    classes = torch.as_tensor(classes, device=logits.device)
    return float((classes[logits[:, classes].argmax(1)] == y).double().mean())


class WidthScaling:
    """Runs (or resumes) every unit of a :class:`WidthScalingConfig` into one results folder.

    Args:
        config: The settings.
        out: Results folder.
        progress: Show a progress bar over the units.
    """

    def __init__(self, config: WidthScalingConfig, out: str | Path, progress: bool = True):
        config.check()
        self.config = config
        self.store = ResultsStore(out)
        self.progress = progress
        self.device = resolve_device(config.device)

    def units(self) -> list[tuple[str, str, int, int]]:
        """Every ``(question, family, width, seed)``, in run order."""
        c = self.config
        return [
            (question, family, width, seed)
            for seed in c.seeds
            for family in c.families
            for width in c.widths(family)
            for question in QUESTIONS
        ]

    def run(self) -> ResultsStore:
        """Run every unit without a record; returns the store.

        Raises:
            ConfigMismatchError: the folder holds units of a run whose settings differ in
                more than :data:`UNIT_SETTINGS`.
        """
        data = self._data()
        self._open()
        done = {
            (r["question"], r["family"], r["width"], r["seed"])
            for r in self.store.records()
            if r.get("type") == "width"
        }
        todo = [u for u in self.units() if u not in done]
        for question, family, width, seed in tqdm(
            todo, desc=NAME, disable=not self.progress, leave=False
        ):
            measure = self._kernel if question == "kernel" else self._forgetting
            record = measure(family, width, seed, data)
            self.store.append(
                {
                    "type": "width",
                    "question": question,
                    "family": family,
                    "width": width,
                    "seed": seed,
                    **record,
                }
            )
        return self.store

    def _open(self) -> None:
        """Start the store, or go on with a run that already recorded units.

        Units are independent, so a run may be resumed with other :data:`UNIT_SETTINGS` (more
        seeds, widths or families; a ``config`` record notes the change). Any other change
        would mix units measured under different settings and is refused: the store's own
        :meth:`~ResultsStore.open` would start afresh (it resumes from checkpoints, and a unit
        leaves none) and drop the recorded units.
        """
        config = json.loads(json.dumps(self.config.to_dict()))
        if self.store.path.is_file():
            self.store.repair()
        if not any(r.get("type") == "width" for r in self.store.records()):
            self.store.open(config)
            return
        current = self.store.config()
        changed = sorted(k for k in set(config) | set(current) if current.get(k) != config.get(k))
        fixed = [k for k in changed if k not in UNIT_SETTINGS]
        if fixed:
            raise ConfigMismatchError(
                f"{self.store.path} holds width units of a run with other settings (differs in "
                f"{fixed}); resume with the same settings (only {list(UNIT_SETTINGS)} may "
                "change) or choose another --out"
            )
        if changed:
            self.store.append({"type": "config", "config": config, "versions": versions()})

    # ------------------------------------------------------------------ data and models
    def _data(self) -> dict[str, Tensor]:
        c = self.config
        train_images, train_y = load_dataset(c.dataset, "train", c.data_path)
        test_images, test_y = load_dataset(c.dataset, "test", c.data_path)
        train_x, test_x = to_float(train_images), to_float(test_images)
        mean, std = train_x.mean(), train_x.std()
        if c.train_size > len(train_x) or c.test_size > len(test_x):
            raise ValueError(
                f"train_size={c.train_size} / test_size={c.test_size} exceed the "
                f"{len(train_x)} / {len(test_x)} images of {c.dataset}"
            )
        return {
            "train_x": ((train_x - mean) / std).to(self.device),
            "train_y": train_y.to(self.device),
            "test_x": ((test_x[: c.test_size] - mean) / std).to(self.device),
            "test_y": test_y[: c.test_size].to(self.device),
        }

    def _subset(self, data: dict, seed: int, classes: Sequence[int] | None = None):
        labels = data["train_y"].cpu().numpy()
        pool = np.arange(len(labels))
        if classes is not None:
            pool = pool[np.isin(labels, classes)]
        index = pool[balanced_indices(labels[pool], self.config.train_size, seed)]
        index = torch.as_tensor(index, device=self.device)
        return data["train_x"][index], data["train_y"][index]

    def _model(self, family: str, width: int, seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return build_model(family, width, self.config.depth).to(self.device)

    def _lr(self, model: nn.Module, probe: Tensor, family: str) -> tuple[float, float]:
        r"""The rate :math:`c N_p / \lambda_{\max}(\Theta_0)` and :math:`\lambda_{\max}`."""
        ntk = empirical_ntk(model, probe, mode="full")
        n, c = ntk.shape[0], ntk.shape[2]
        top = float(
            torch.linalg.eigvalsh(ntk.permute(0, 2, 1, 3).reshape(n * c, n * c).double())[-1]
        )
        return self.config.lr_of(family) * n / top, top

    # ------------------------------------------------------------------ the questions
    def _kernel(self, family: str, width: int, seed: int, data: dict) -> dict:
        """Questions 1 and 2: kernel-regime distances and predictive uncertainty."""
        c = self.config
        x, y = self._subset(data, seed)
        probe = x[: c.probe]
        model = self._model(family, width, seed)
        lin = linearize(model)
        layers = first_middle_last(model)
        ntk0 = empirical_ntk(model, probe, mode="trace")
        reps0 = record_representations(model, probe, layers)
        with torch.no_grad():
            f0 = model(data["test_x"])
        lr, top = self._lr(model, probe, family)
        steps = c.steps_of(family)
        _train(model, x, y, lr, steps)
        _train(lin, x, y, lr, steps)
        reps = record_representations(model, probe, layers)
        roles = dict(zip(("first", "middle", "last"), layers, strict=False))
        with torch.no_grad():
            f_net, f_lin = model(data["test_x"]), lin(data["test_x"])
        p_net, p_lin = f_net.softmax(1), f_lin.softmax(1)
        kl = (p_net * (p_net.clamp_min(1e-30).log() - p_lin.clamp_min(1e-30).log())).sum(1)
        moved = float((f_net - f0).norm())
        record = {
            "steps": steps,
            "lr": lr,
            "ntk_max_eig": top,
            "ntk_change": float(ntk_change(ntk0, empirical_ntk(model, probe, mode="trace"))),
            "linearization_error": float((f_net - f_lin).norm()) / moved if moved else math.nan,
            "net_test_acc": float((f_net.argmax(1) == data["test_y"]).double().mean()),
            "lin_test_acc": float((f_lin.argmax(1) == data["test_y"]).double().mean()),
            "net_train_loss": _loss(model, x, y),
            "lin_train_loss": _loss(lin, x, y),
            "net_entropy": _entropy(p_net),
            "lin_entropy": _entropy(p_lin),
            "net_ece": expected_calibration_error(p_net, data["test_y"]),
            "lin_ece": expected_calibration_error(p_lin, data["test_y"]),
            "kl_net_lin": float(kl.mean()),
        }
        for role, name in roles.items():
            record[f"cka_change_{role}"] = 1.0 - float(linear_cka(reps0[name], reps[name]))
        return record

    def _forgetting(self, family: str, width: int, seed: int, data: dict) -> dict:
        """Question 3: forgetting of task A (classes 0-4) after training on task B (5-9)."""
        c = self.config
        task_a, task_b = self._subset(data, seed, TASK_A), self._subset(data, seed, TASK_B)
        test_a = data["test_y"] < len(TASK_A)
        xa_test, ya_test = data["test_x"][test_a], data["test_y"][test_a]
        model = self._model(family, width, seed)
        lin = linearize(model)
        steps = c.steps_of(family)
        (lr, top), half = self._lr(model, task_a[0][: c.probe], family), steps // 2
        record: dict[str, float] = {"steps": steps, "lr": lr, "ntk_max_eig": top}
        for name, net in (("net", model), ("lin", lin)):
            _train(net, *task_a, lr, half)
            after_a = _accuracy(net, xa_test, ya_test)
            task_after_a = _accuracy(net, xa_test, ya_test, TASK_A)
            _train(net, *task_b, lr, steps - half)
            after_b = _accuracy(net, xa_test, ya_test)
            task_after_b = _accuracy(net, xa_test, ya_test, TASK_A)
            record[f"{name}_acc_a_after_a"] = after_a
            record[f"{name}_acc_a_after_b"] = after_b
            record[f"{name}_forgetting"] = after_a - after_b
            record[f"{name}_task_acc_a_after_a"] = task_after_a
            record[f"{name}_task_acc_a_after_b"] = task_after_b
            record[f"{name}_task_forgetting"] = task_after_a - task_after_b
        return record


# ---------------------------------------------------------------------------------- figures
def is_width_study(folder: str | Path) -> bool:
    """Whether a results folder (or archive) holds a width study (by its header)."""
    try:
        header = ResultsStore(folder).header()
    except (OSError, ValueError):
        return False
    return bool(header) and header.get("config", {}).get("experiment") == NAME


def width_records(folder: str | Path) -> list[dict]:
    """The ``width`` records of a results folder (or archive), one per unit (the last)."""
    keyed = {}
    for r in ResultsStore(folder).records():
        if r.get("type") == "width":
            keyed[(r["question"], r["family"], r["width"], r["seed"])] = r
    return [keyed[k] for k in sorted(keyed)]


def _series(records: list[dict], question: str, family: str, key: str):
    """Widths, means and sample standard deviations over seeds of one field."""
    by_width: dict[int, list[float]] = {}
    for r in records:
        if r["question"] == question and r["family"] == family and r.get(key) is not None:
            by_width.setdefault(r["width"], []).append(r[key])
    widths = sorted(by_width)
    means = np.array([np.mean(by_width[w]) for w in widths])
    stds = np.array([np.std(by_width[w], ddof=1) if len(by_width[w]) > 1 else 0 for w in widths])
    return widths, means, stds


#: Panels drawn on a log scale (the NTK grows by orders of magnitude in training).
LOG_PANELS = ("NTK change",)
#: (question, title, [(field, label), ...]) of every panel row.
PANELS = {
    "kernel": [
        ("NTK change", [("ntk_change", r"$\|\Theta_T-\Theta_0\|_F/\|\Theta_0\|_F$")]),
        (
            "1 - CKA to init",
            [(f"cka_change_{r}", f"{r} layer") for r in ("first", "middle", "last")],
        ),
        ("linearization error", [("linearization_error", r"$\|f-f_{lin}\|/\|f-f_0\|$")]),
    ],
    "uncertainty": [
        ("test ECE", [("net_ece", "network"), ("lin_ece", "linearized")]),
        ("predictive entropy", [("net_entropy", "network"), ("lin_entropy", "linearized")]),
        ("KL(net || lin)", [("kl_net_lin", "mean KL")]),
    ],
    "forgetting": [
        (
            "task-A acc. after A",
            [("net_task_acc_a_after_a", "network"), ("lin_task_acc_a_after_a", "linearized")],
        ),
        (
            "forgetting within A's classes",
            [("net_task_forgetting", "network"), ("lin_task_forgetting", "linearized")],
        ),
        (
            "task-A acc. after B, 10-way",
            [("net_acc_a_after_b", "network"), ("lin_acc_a_after_b", "linearized")],
        ),
    ],
}


def width_figures(folder: str | Path) -> dict[str, plt.Figure]:
    """One figure per question, panels by family (rows) and metric (columns).

    Every curve is the mean over seeds, in a band of plus and minus one sample standard
    deviation.
    """
    records = width_records(folder)
    families = sorted({r["family"] for r in records}, key=FAMILIES.index)
    out = {}
    for figure_name, panels in PANELS.items():
        question = "forgetting" if figure_name == "forgetting" else "kernel"
        fig, axes = plt.subplots(
            len(families),
            len(panels),
            figsize=(4.2 * len(panels), 3.2 * len(families)),
            squeeze=False,
        )
        seeds = sorted({r["seed"] for r in records})
        for row, family in enumerate(families):
            for col, (title, fields) in enumerate(panels):
                ax = axes[row][col]
                for key, label in fields:
                    widths, means, stds = _series(records, question, family, key)
                    if widths:
                        (line,) = ax.plot(widths, means, marker="o", label=label)
                        ax.fill_between(
                            widths, means - stds, means + stds, color=line.get_color(), alpha=0.2
                        )
                ax.set_xscale("log", base=2)
                if title in LOG_PANELS:
                    ax.set_yscale("log")
                ax.set_title(f"{family.upper()}: {title}", fontsize=10)
                ax.set_xlabel("width (channels)" if family == "cnn" else "width")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(
            f"width study, {figure_name} ({len(seeds)} seed{'s' * (len(seeds) > 1)}; "
            "mean, band: ± std over seeds)",
            fontsize=11,
        )
        fig.tight_layout()
        out[FIGURES[figure_name]] = fig
    return out


def plot_width_scaling(folder: str | Path) -> list[Path]:
    """Write the three PNGs into ``folder``; returns their paths."""
    paths = []
    for name, fig in width_figures(folder).items():
        path = Path(folder) / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


#: Columns of :func:`width_summary_table`: (question, heading, fields shown as ``a / b``).
TABLE_COLUMNS = (
    ("kernel", "test acc net / lin", ("net_test_acc", "lin_test_acc")),
    ("kernel", "train loss net / lin", ("net_train_loss", "lin_train_loss")),
    ("kernel", "NTK change", ("ntk_change",)),
    (
        "kernel",
        "1 − CKA first / middle / last",
        tuple(f"cka_change_{r}" for r in ("first", "middle", "last")),
    ),
    ("kernel", "linearization error", ("linearization_error",)),
    ("kernel", "KL(net ‖ lin)", ("kl_net_lin",)),
    ("kernel", "ECE net / lin", ("net_ece", "lin_ece")),
    ("forgetting", "A acc after A net / lin", ("net_task_acc_a_after_a", "lin_task_acc_a_after_a")),
    ("forgetting", "forgetting within A net / lin", ("net_task_forgetting", "lin_task_forgetting")),
    ("forgetting", "A acc after B, 10-way net / lin", ("net_acc_a_after_b", "lin_acc_a_after_b")),
)


def _mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample standard deviation) of several values, ``mean`` of one."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} ± {np.std(values, ddof=1):.2g}"


def width_summary_table(folder: str | Path) -> str:
    """The Markdown table ``curvlab summary`` prints for a width study (docs/ntk.md quotes it).

    One row per family and width: the seeds recorded, then every metric of
    :data:`TABLE_COLUMNS` as the mean over seeds ``±`` the sample standard deviation.

    Raises:
        NoResultsError: the folder holds no ``width`` record.
    """
    from curvlab.experiments.plots import NoResultsError, markdown_table

    records = width_records(folder)
    if not records:
        raise NoResultsError(f"{folder} holds no width-scaling unit")
    head = ["family", "width", "seeds"] + [heading for _, heading, _ in TABLE_COLUMNS]
    rows = []
    for family in sorted({r["family"] for r in records}, key=FAMILIES.index):
        for width in sorted({r["width"] for r in records if r["family"] == family}):
            of = [r for r in records if r["family"] == family and r["width"] == width]
            cells = [family.upper(), str(width), str(len({r["seed"] for r in of}))]
            for question, _, fields in TABLE_COLUMNS:
                unit = [r for r in of if r["question"] == question]
                cells.append(
                    " / ".join(
                        _mean_std([r[f] for r in unit if r.get(f) is not None]) for f in fields
                    )
                )
            rows.append(cells)
    return markdown_table(head, rows)
