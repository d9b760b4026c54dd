"""The exact Gauss-Newton paper's experiments (C12): configs, runner, results store and plots."""

from curvlab.experiments.config import EXPERIMENTS, ExperimentConfig, make_config
from curvlab.experiments.plots import plot_run, summary
from curvlab.experiments.runner import Runner
from curvlab.experiments.store import ConfigMismatchError, ResultsStore

__all__ = [
    "EXPERIMENTS",
    "ConfigMismatchError",
    "ExperimentConfig",
    "ResultsStore",
    "Runner",
    "make_config",
    "plot_run",
    "summary",
]
