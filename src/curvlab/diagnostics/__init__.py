"""Training diagnostics: the empirical NTK and its change, CKA of representations, linearization.

* :mod:`curvlab.diagnostics.ntk` -- :func:`empirical_ntk` (full, trace, diagonal; Jacobian
  contraction, NTK-vector products, or RevMLP's structured form), :func:`ntk_similarity`,
  :func:`ntk_change`, :func:`ntk_rate_of_change`.
* :mod:`curvlab.diagnostics.cka` -- :func:`linear_cka` and :class:`RepresentationCKA`, the CKA of
  named blocks to their initial representations.
* :mod:`curvlab.diagnostics.linearized` -- :func:`linearize`, the kernel-regime model.

Guide: ``docs/ntk.md``.
"""

from curvlab.diagnostics.cka import (
    RepresentationCKA,
    first_middle_last,
    linear_cka,
    record_representations,
)
from curvlab.diagnostics.linearized import LinearizedModel, linearize
from curvlab.diagnostics.ntk import (
    DEFAULT_MAX_JACOBIAN_BYTES,
    METHODS,
    MODES,
    empirical_ntk,
    ntk_change,
    ntk_method,
    ntk_rate_of_change,
    ntk_similarity,
    ntk_vector_product,
)

__all__ = [
    "DEFAULT_MAX_JACOBIAN_BYTES",
    "METHODS",
    "MODES",
    "LinearizedModel",
    "RepresentationCKA",
    "empirical_ntk",
    "first_middle_last",
    "linear_cka",
    "linearize",
    "ntk_change",
    "ntk_method",
    "ntk_rate_of_change",
    "ntk_similarity",
    "ntk_vector_product",
    "record_representations",
]
