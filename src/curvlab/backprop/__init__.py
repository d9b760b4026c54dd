"""One-pass extended backpropagation (MISSION.md, C2 and C3).

``compute(model, loss_func, inputs, targets, quantities) -> Results``: the loss, the gradient
and every requested quantity, keyed by ``named_parameters()`` names; ``with capture(model,
loss_func, quantities) as captured:`` the same inside the user's own training loop. Kronecker
quantities return :class:`KronFactors` / :class:`DenseBlock`. See ``docs/backprop.md``.
"""

from curvlab.backprop.capturing import Capture, CaptureError, capture
from curvlab.backprop.derivatives import Context, ParamDerivatives
from curvlab.backprop.engine import compute
from curvlab.backprop.errors import (
    GenericPathWarning,
    NonFiniteError,
    UnsupportedLossError,
    UnsupportedModuleError,
)
from curvlab.backprop.kron import DenseBlock, KronEigen, KronFactors, Layout, pool
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
    KFACEmpirical,
    Quantity,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from curvlab.backprop.results import Results
from curvlab.backprop.rules import RULES, SAME_FORWARD, KronSums, Rule
from curvlab.backprop.sources import (
    EXACT,
    GRAD,
    ExactSqrt,
    MonteCarloSqrt,
    PerSampleGradient,
    SignedHessian,
    Source,
)

__all__ = [
    "BL89",
    "EXACT",
    "GRAD",
    "Capture",
    "CaptureError",
    "DenseBlock",
    "ExactSqrt",
    "KronEigen",
    "KronFactors",
    "KronSums",
    "Layout",
    "MonteCarloSqrt",
    "NonFiniteError",
    "PerSampleGradient",
    "SignedHessian",
    "Source",
    "capture",
    "pool",
    "GGNMP",
    "HMP",
    "KFAC",
    "KFLR",
    "KFRA",
    "KFACEmpirical",
    "RULES",
    "SAME_FORWARD",
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
