"""Linear algebra kernels, randomized estimators and eigensolvers (C4).

The estimators take any square ``A`` ``[P, P]`` with ``A @ V`` for ``V`` ``[P, K]`` and
``A.shape`` (a dense tensor, a curvature operator, or a function in :class:`MatmatOperator`):

* traces: :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`xtrace`;
* the diagonal: :func:`hutchinson_diag`; the squared Frobenius norm:
  :func:`hutchinson_squared_fro`;
* extreme eigenpairs: :func:`lanczos_eigs`;
* the spectral density: :func:`slq_quadrature`, :func:`slq_density`,
  :func:`plot_spectral_density`.
"""

from curvlab.linalg.density import plot_spectral_density, slq_density, slq_quadrature
from curvlab.linalg.diagonal import hutchinson_diag
from curvlab.linalg.gram import gram
from curvlab.linalg.lanczos import lanczos_eigs
from curvlab.linalg.norm import hutchinson_squared_fro
from curvlab.linalg.operator import MatmatOperator
from curvlab.linalg.trace import hutchinson_trace, hutchpp_trace, xtrace

__all__ = [
    "gram",
    "MatmatOperator",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "hutchinson_diag",
    "hutchinson_squared_fro",
    "lanczos_eigs",
    "slq_quadrature",
    "slq_density",
    "plot_spectral_density",
]
