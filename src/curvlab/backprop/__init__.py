"""One-pass extended backpropagation (MISSION.md, C2 and C3).

``compute(model, loss_func, inputs, targets, quantities) -> Results``: the loss, the gradient
and every requested quantity, keyed by ``named_parameters()`` names. See ``docs/backprop.md``.
"""

from curvlab.backprop.derivatives import Context, ParamDerivatives
from curvlab.backprop.engine import compute
from curvlab.backprop.errors import GenericPathWarning, UnsupportedLossError, UnsupportedModuleError
from curvlab.backprop.quantities import (
    BL89,
    GGNMP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGN,
    BatchDiagHessian,
    BatchGrad,
    BatchL2,
    DiagGGN,
    DiagHessian,
    HesScale,
    Quantity,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from curvlab.backprop.results import Results
from curvlab.backprop.rules import RULES, Rule

__all__ = [
    "BL89",
    "GGNMP",
    "HMP",
    "KFAC",
    "KFLR",
    "KFRA",
    "RULES",
    "BatchDiagGGN",
    "BatchDiagHessian",
    "BatchGrad",
    "BatchL2",
    "Context",
    "DiagGGN",
    "DiagHessian",
    "GenericPathWarning",
    "HesScale",
    "ParamDerivatives",
    "Quantity",
    "Results",
    "Rule",
    "SqrtGGN",
    "SumGradSquared",
    "UnsupportedLossError",
    "UnsupportedModuleError",
    "Variance",
    "compute",
]
