"""Named configurations of the exact Gauss-Newton paper's experiments (Buffelli et al., 2024).

Each experiment is named after the paper's figure it reproduces. Defaults follow the authors'
configs (``research/RevMLP/config``) on the full datasets: hidden 8000, 4 blocks, bias, ReLU, no
LayerNorm, cross-entropy with the identity-Hessian GN variant (``use_identity``), n = 1024 for full
batch, seed 42 (the authors also ran 43 and 44). Learning rates: see :func:`default_lr`. On the
bundled subset the width, subset size and step counts are scaled down; every run records its
settings in the results header.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

EXPERIMENTS = ("fullbatch", "minibatch", "loss-change", "ntk-cka", "no-bottleneck")
OPTIMIZERS = ("gn", "adam", "sgd")
#: ExactGN with a fixed scheme, as optimizers of their own (``gn`` uses ``gn_scheme``); their
#: learning rate is ``gn``'s unless ``lr`` names them.
GN_VARIANTS = ("gn-right-inverse", "gn-pinv", "gn-paper")
ALL_OPTIMIZERS = OPTIMIZERS + GN_VARIANTS
NTK_MODES = ("full", "trace", "diagonal")
#: ``curvlab run optim-race`` (:mod:`curvlab.experiments.optim_race`): its models and optimizers.
RACE_MODELS = ("cnn", "revmlp")
RACE_OPTIMIZERS = (
    "sgd",
    "adam",
    "kfac",
    "singd-dense",
    "singd-diagonal",
    "rootfree-adam",
    "ifshampoo",
    "adahesscale",
)
#: Seed of the validation split (:attr:`ExperimentConfig.validation`): one split for every run.
VALIDATION_SEED = 20240


@dataclass
class ExperimentConfig:
    """Everything a run needs; stored verbatim in the results header.

    Attributes:
        experiment: One of :data:`EXPERIMENTS`.
        dataset: ``bundled``, ``fashion-mnist``, ``mnist`` or ``cifar10``.
        data_path: Directory of the dataset files (``None``: the loader's search order).
        optimizers: Subset of :data:`ALL_OPTIMIZERS`, run one after the other.
        seeds: One run per seed and optimizer (same initialization across optimizers).
        subset: Training-set size of the full-batch phase (the paper: 1024).
        steps: Number of full-batch updates (one per epoch).
        epochs: Mini-batch epochs.
        batch_size: Mini-batch size.
        hidden: Expansion width of every branch.
        depth: Number of reversible blocks.
        bias: Trained projections have biases.
        norm: LayerNorm in every branch after the first block.
        inverted_bottleneck: ``False`` for the paper's Figure 5 model.
        loss: ``ce`` or ``mse``.
        ce_hessian: ``identity`` (authors) or ``exact`` (true Newton step in function space).
        gn_scheme: ExactGN scheme; ``gn_solver``, ``gn_rtol``, ``gn_atol``, ``gn_damping`` its
            solver.
        gn_output_damping: Levenberg-Marquardt damping of the exact CE function-space step.
        lr: Learning rate per optimizer, for the full-batch and mini-batch phases.
        eval_every: Evaluate every this many full-batch updates.
        eval_first: Full batch: also evaluate after each of the first this many updates (a fast
            optimizer passes a training loss between two periodic evaluations, and comparisons
            at equal training loss interpolate between them).
        evals_per_epoch: Evaluations per mini-batch epoch.
        eval_train_size: Training samples used to report the mini-batch train loss.
        record_updates: Record the per-update % change of the mini-batch loss (Figure 3).
        phases: ``fullbatch`` and/or ``minibatch``.
        device: ``cpu``, ``cuda`` or ``auto``.
        diverge_factor: A run whose loss exceeds this many times its initial loss (the first
            batch's, before the first update) is recorded as diverged and stopped.
        ntk_probe: ``ntk-cka``: the first this many training images of the phase are the fixed
            probe of the NTK and the CKA.
        ntk_mode: ``ntk-cka``: the kernel compared, ``full`` ``[N, N, C, C]``, ``trace``
            ``[N, N]`` or ``diagonal`` ``[N, C, C]``.
        validation: Size of a class-balanced validation split held out of the training set
            (drawn with :data:`VALIDATION_SEED`, the same for every run seed); ``0``: none.
            With it every evaluation also reports ``val_loss`` and ``val_acc``, training (and the
            standardization statistics) use only the rest, and ``curvlab sweep`` ranks by
            ``val_loss``.
    """

    experiment: str
    dataset: str = "bundled"
    data_path: str | None = None
    optimizers: tuple[str, ...] = OPTIMIZERS
    seeds: tuple[int, ...] = (42,)
    subset: int = 1024
    steps: int = 100
    epochs: int = 100
    batch_size: int = 1024
    hidden: int = 8000
    depth: int = 4
    bias: bool = True
    norm: bool = False
    inverted_bottleneck: bool = True
    loss: str = "ce"
    ce_hessian: str = "identity"
    gn_scheme: str = "right-inverse"
    gn_solver: str = "cholesky"
    gn_rtol: float | None = None
    gn_atol: float = 0.0
    gn_damping: float = 0.0
    gn_output_damping: float = 0.0
    lr: dict[str, dict[str, float]] = field(default_factory=lambda: default_lr(4))
    eval_every: int = 5
    eval_first: int = 0
    evals_per_epoch: int = 1
    eval_train_size: int = 10000
    record_updates: bool = False
    phases: tuple[str, ...] = ("fullbatch",)
    device: str = "auto"
    diverge_factor: float = 1e3
    ntk_probe: int = 64
    ntk_mode: str = "full"
    validation: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict of the config."""
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Check every setting that does not depend on the data.

        Raises:
            ValueError: names the first setting out of range and what it expects.
        """
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, choices in (
            ("optimizers", ALL_OPTIMIZERS),
            ("phases", ("fullbatch", "minibatch")),
        ):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} is empty; choose from {choices}")
            bad = sorted(set(values) - set(choices))
            if bad:
                raise ValueError(f"unknown {name} {bad}; choose from {choices}")
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed, e.g. (42,)")
        bad_seeds = [
            s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0
        ]
        if bad_seeds:
            raise ValueError(f"seeds must be non-negative integers, got {bad_seeds}")
        if self.loss not in ("ce", "mse"):
            raise ValueError(f"loss must be 'ce' or 'mse', got {self.loss!r}")
        if self.ce_hessian not in ("identity", "exact"):
            raise ValueError(f"ce_hessian must be 'identity' or 'exact', got {self.ce_hessian!r}")
        for name in ("gn_damping", "gn_output_damping", "gn_atol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("eval_first", "validation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.ntk_mode not in NTK_MODES:
            raise ValueError(f"ntk_mode must be one of {NTK_MODES}, got {self.ntk_mode!r}")
        if not self.diverge_factor > 1:
            raise ValueError(f"diverge_factor must be > 1, got {self.diverge_factor!r}")
        for phase, rates in self.lr.items():
            for name, rate in rates.items():
                if not rate > 0:
                    raise ValueError(f"lr[{phase!r}][{name!r}] must be > 0, got {rate!r}")

    def learning_rate(self, phase: str, optimizer: str) -> float:
        """The optimizer's rate in the phase; a GN variant without its own takes ``gn``'s."""
        return rate_of(self.lr[phase], optimizer)

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        """Inverse of :meth:`to_dict` (tuples restored)."""
        values = dict(values)
        for key in ("optimizers", "seeds", "phases"):
            values[key] = tuple(values[key])
        return cls(**values)


def default_lr(depth: int) -> dict[str, dict[str, float]]:
    r"""Default learning rates per phase and optimizer.

    GN: the authors' (0.5 full batch, 0.1 mini-batch, CE with identity Hessian) in curvlab's
    normalized convention. Their block scheme gives every block the full tangent, so where every
    block is exact the outputs move by :math:`L` times the function-space step (:math:`L` = depth);
    :class:`~curvlab.optim.ExactGN` normalizes every scheme to one step, so their rates become
    :math:`0.5 L` and :math:`0.1 L` here: the same first-order change of the outputs.

    Adam and SGD: chosen by ``curvlab sweep`` on the bundled data (full batch, hidden 1024, 30
    updates; Adam over 1e-4..3e-3, SGD over 3e-3..0.1; docs/reproduction.md). The authors' values
    (Adam 1e-4, SGD 0.1, tuned for hidden 8000) were too small and divergent there.
    """
    return {
        "fullbatch": {"gn": 0.5 * depth, "adam": 1e-3, "sgd": 0.03},
        "minibatch": {"gn": 0.1 * depth, "adam": 1e-3, "sgd": 0.03},
    }


#: Settings that must be positive integers.
_POSITIVE = (
    "subset",
    "steps",
    "epochs",
    "batch_size",
    "hidden",
    "depth",
    "eval_every",
    "evals_per_epoch",
    "eval_train_size",
    "ntk_probe",
)

#: Scaled-down settings for the bundled subset: `make demo` finishes in a minute on 2 cores.
BUNDLED_DEFAULTS = {
    "subset": 512,
    "steps": 30,
    "epochs": 6,
    "batch_size": 256,
    "hidden": 1024,
    "eval_every": 1,
    "evals_per_epoch": 2,
}


#: ``ntk-cka`` on the bundled subset: a small width and few updates (a test runs it end to end).
NTK_CKA_BUNDLED_DEFAULTS = {
    "subset": 128,
    "steps": 10,
    "hidden": 256,
    "eval_every": 2,
    "ntk_probe": 64,
}
#: At that width SGD diverges at the default 0.03 (loss 4e9 after 4 updates); 0.01 trains.
NTK_CKA_BUNDLED_LR = {"sgd": 0.01}


def rate_of(rates: dict[str, float], optimizer: str) -> float:
    """``optimizer``'s rate in one phase's ``rates``; a GN variant without its own takes ``gn``'s.

    Raises:
        KeyError: neither the optimizer nor (for a GN variant) ``gn`` has a rate.
    """
    if optimizer not in rates and optimizer in GN_VARIANTS:
        return rates["gn"]
    return rates[optimizer]


def make_config(experiment: str, dataset: str = "bundled", **overrides) -> ExperimentConfig:
    """Build the named experiment's config for a dataset, then apply ``overrides``.

    Raises:
        ValueError: unknown experiment, an override that is not a field, or a setting out of
            range (see :meth:`ExperimentConfig.check`).
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; choose one of {EXPERIMENTS}")
    values: dict = {"experiment": experiment, "dataset": dataset}
    if dataset == "bundled":
        values.update(BUNDLED_DEFAULTS)
    if dataset == "cifar10":
        values["depth"] = 12  # the authors' CIFAR-10 configs
    if experiment in ("minibatch", "loss-change"):
        values["phases"] = ("minibatch",)
        values["record_updates"] = experiment == "loss-change"
    if experiment == "ntk-cka":
        values["optimizers"] = GN_VARIANTS + ("adam", "sgd")
        if dataset == "bundled":
            values.update(NTK_CKA_BUNDLED_DEFAULTS)
    if experiment == "no-bottleneck":
        values.update(
            inverted_bottleneck=False, phases=("fullbatch", "minibatch"), gn_scheme="paper"
        )
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; valid: {sorted(names)}")
    lr_override = overrides.pop("lr", None) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    lr = default_lr(values.get("depth", 4))
    if experiment == "ntk-cka" and dataset == "bundled":
        lr["fullbatch"].update(NTK_CKA_BUNDLED_LR)
    for phase, rates in lr_override.items():
        if phase not in lr:
            raise ValueError(f"lr override for unknown phase {phase!r}; phases: {sorted(lr)}")
        lr[phase].update(rates)
    values["lr"] = lr
    config = ExperimentConfig(**values)
    config.check()
    return config
