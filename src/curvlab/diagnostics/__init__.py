r"""Training diagnostics: the empirical NTK and its change, CKA of representations, linearization.

* :mod:`curvlab.diagnostics.ntk` -- :func:`empirical_ntk` (full, trace, diagonal; Jacobian
  contraction, NTK-vector products, or RevMLP's structured form), :func:`ntk_similarity`,
  :func:`ntk_change`, :func:`ntk_rate_of_change`.
* :mod:`curvlab.diagnostics.cka` -- :func:`linear_cka` and :class:`RepresentationCKA`, the CKA of
  named blocks to their initial representations.
* :mod:`curvlab.diagnostics.linearized` -- :func:`linearize`, the kernel-regime model.
* :mod:`curvlab.diagnostics.monitor` -- :class:`Monitor`, Cockpit's instruments around the
  user's own backward on schedules, and their JSONL log (:func:`read_log`).
* :mod:`curvlab.diagnostics.invariance` -- :func:`invariant_trace`, :func:`invariant_eigs`: the
  reparametrization-invariant spectrum of :math:`(G + \delta I)^{-1} H` (C11).
* :mod:`curvlab.diagnostics.instruments` -- the instruments' definitions (:data:`PRESETS`,
  :data:`INSTRUMENTS`), the gradient tests and the mean GSNR as functions, schedules.
* :mod:`curvlab.diagnostics.per_sample` -- every per-sample statistic of a monitored step from
  one read of each layer's factors, and the histogram estimates.

Guides: ``docs/ntk.md``, ``docs/diagnostics.md``.
"""

from curvlab.diagnostics.cka import (
    RepresentationCKA,
    first_middle_last,
    linear_cka,
    record_representations,
)
from curvlab.diagnostics.instruments import (
    CABS,
    INSTRUMENTS,
    PRESETS,
    Alpha,
    BatchGradDots,
    BatchGradProjections,
    EarlyStopping,
    GradHistogram1d,
    GradHistogram2d,
    GradientHistogram1d,
    GradientHistogram2d,
    HessianMaxEig,
    HessianTrace,
    Instrument,
    MeanGSNR,
    StepData,
    TICDiag,
    TICTrace,
    alpha_from_fit,
    cabs,
    early_stopping,
    fit_quadratic,
    inner_product_test,
    linear_schedule,
    logarithmic_schedule,
    mean_gsnr,
    norm_test,
    orthogonality_test,
    tic,
)
from curvlab.diagnostics.invariance import METRICS, invariant_eigs, invariant_trace, metric_operator
from curvlab.diagnostics.linearized import LinearizedModel, linearize
from curvlab.diagnostics.monitor import JSONLLog, Monitor, read_log
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
    "CABS",
    "Alpha",
    "BatchGradProjections",
    "EarlyStopping",
    "GradHistogram1d",
    "GradHistogram2d",
    "GradientHistogram1d",
    "GradientHistogram2d",
    "TICDiag",
    "TICTrace",
    "alpha_from_fit",
    "cabs",
    "early_stopping",
    "fit_quadratic",
    "tic",
    "DEFAULT_MAX_JACOBIAN_BYTES",
    "INSTRUMENTS",
    "METHODS",
    "MODES",
    "PRESETS",
    "BatchGradDots",
    "HessianMaxEig",
    "HessianTrace",
    "Instrument",
    "JSONLLog",
    "LinearizedModel",
    "MeanGSNR",
    "Monitor",
    "RepresentationCKA",
    "empirical_ntk",
    "first_middle_last",
    "inner_product_test",
    "linear_schedule",
    "linear_cka",
    "linearize",
    "logarithmic_schedule",
    "mean_gsnr",
    "norm_test",
    "ntk_change",
    "ntk_method",
    "ntk_rate_of_change",
    "ntk_similarity",
    "ntk_vector_product",
    "orthogonality_test",
    "read_log",
    "invariant_eigs",
    "invariant_trace",
    "metric_operator",
    "METRICS",
    "record_representations",
    "StepData",
]
