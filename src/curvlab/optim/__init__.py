"""Optimizers: exact Gauss-Newton for reversible networks (more second-order methods to come)."""

from curvlab.optim.exact_gn import ExactGN, NoExactRightInverseError, StepInfo

__all__ = ["ExactGN", "NoExactRightInverseError", "StepInfo"]
