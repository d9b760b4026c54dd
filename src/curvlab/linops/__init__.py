r"""Curvature linear operators over a batch or a data loader, and their inverses (C4).

Every operator implements one batched product and gets ``A @ v``, ``A @ M``, ``v @ A``,
``A + B``, ``s * A``, chaining, ``A.T``, :meth:`~CurvatureOperator.dense`,
:meth:`~CurvatureOperator.to_scipy` and :meth:`~CurvatureOperator.restrict` from
:class:`CurvatureOperator`. Operators of a model are built as ``GGN(model, loss_func, params,
data)`` with ``data`` a re-iterable collection of ``(inputs, targets)`` batches; they follow the
loss over the union of the batches (``docs/linops.md``).
"""

from curvlab.linops.base import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    ProductOperator,
    Restriction,
    ScaledOperator,
    SumOperator,
)
from curvlab.linops.ekfac import EigenCorrectedBlock, EKFACOperator
from curvlab.linops.empirical_risk import ModelOperator, NondeterminismError
from curvlab.linops.ggn import GGN, EmpiricalFisher, FisherMC
from curvlab.linops.hessian import Hessian
from curvlab.linops.inverse import CGInfo, CGInverse, NeumannInverse, power_iteration
from curvlab.linops.jacobian import Jacobian, JacobianT
from curvlab.linops.kfac import FISHER_TYPES, KFACInverse, KFACOperator

__all__ = [
    "FISHER_TYPES",
    "GGN",
    "CGInfo",
    "CGInverse",
    "CurvatureOperator",
    "DenseOperator",
    "EKFACOperator",
    "EigenCorrectedBlock",
    "EmpiricalFisher",
    "FisherMC",
    "Hessian",
    "IdentityOperator",
    "Jacobian",
    "JacobianT",
    "KFACInverse",
    "KFACOperator",
    "ModelOperator",
    "NeumannInverse",
    "NondeterminismError",
    "ProductOperator",
    "Restriction",
    "ScaledOperator",
    "SumOperator",
    "power_iteration",
]
