"""Optimizers: exact Gauss-Newton for reversible networks (more second-order methods to come)."""

from curvlab.optim.exact_gn import (
    DEFAULT_CE_OUTPUT_DAMPING,
    DivergedStepError,
    ExactGN,
    NoExactRightInverseError,
    StepInfo,
)

__all__ = [
    "DEFAULT_CE_OUTPUT_DAMPING",
    "DivergedStepError",
    "ExactGN",
    "NoExactRightInverseError",
    "StepInfo",
]
