"""Optimizers: exact Gauss-Newton, KFAC, SINGD, the root-free methods, AdaHesScale, and their parts.

``curvlab.optim.parts`` holds the small composable parts (curvature statistic, running average,
inverse and damping, update rule) that the optimizers are assembled from.
"""

from curvlab.optim.exact_gn import (
    DEFAULT_CE_OUTPUT_DAMPING,
    DivergedStepError,
    ExactGN,
    NoExactRightInverseError,
    StepInfo,
)
from curvlab.optim.hesscale import AdaHesScale
from curvlab.optim.kfac import FALLBACKS, KFAC, KRONECKER_MODULES
from curvlab.optim.rootfree import IFShampoo, RootFreeAdam
from curvlab.optim.singd import SINGD, STRUCTURES

__all__ = [
    "AdaHesScale",
    "DEFAULT_CE_OUTPUT_DAMPING",
    "DivergedStepError",
    "ExactGN",
    "FALLBACKS",
    "IFShampoo",
    "KFAC",
    "KRONECKER_MODULES",
    "NoExactRightInverseError",
    "RootFreeAdam",
    "SINGD",
    "STRUCTURES",
    "StepInfo",
]
