r"""What the engine back-propagates to the module outputs: the *sources* of the factors.

Every quantity lists the sources it reads (:meth:`~curvlab.backprop.quantities.Quantity.
sources`). One source gives, per call of a module, a factor ``F`` ``[M, N, *out]`` at the
call's output:

* :data:`GRAD` (:class:`PerSampleGradient`): the per-sample loss gradient
  :math:`\partial \ell_n / \partial z_n`, ``M = 1``;
* :data:`EXACT` (:class:`ExactSqrt`): the exact loss Hessian's symmetric square root
  :math:`S_n` with :math:`\sum_m S_{mn} S_{mn}^\top = \nabla_f^2 \ell_n`, back-propagated;
* :class:`MonteCarloSqrt` ``(k)``: ``k`` sampled columns with
  :math:`\mathbb{E}[\sum_i S_{in} S_{in}^\top] = \nabla_f^2 \ell_n`;
* :data:`HESSIAN_POS` / :data:`HESSIAN_NEG` (:class:`SignedHessian`): the positive and
  negative columns of a signed factorization of the Hessian w.r.t. the module output (the
  exact square root plus the residual terms of every nonlinearity; see
  :mod:`~curvlab.backprop.hessian`).

Sources are small frozen objects (hashable, compared by value), so they key dictionaries and
two quantities that read the same source share one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.backprop.loss import LossSpec


@dataclass(frozen=True)
class Source:
    """Base class of the back-propagated factors (see the module docstring)."""

    @property
    def streamable(self) -> bool:
        """Whether the streamed path (factors reduced inside the backward) can deliver it."""
        return False


@dataclass(frozen=True)
class PerSampleGradient(Source):
    """The per-sample gradient w.r.t. each module output (one column)."""

    @property
    def streamable(self) -> bool:  # noqa: D102
        return True

    def __str__(self) -> str:
        return "grad"


@dataclass(frozen=True)
class SqrtSource(Source):
    """A square root of the loss Hessian w.r.t. the model output (exact or sampled)."""

    @property
    def streamable(self) -> bool:  # noqa: D102
        return True

    def columns(
        self, spec: LossSpec, output: Tensor, targets: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """The square root ``[M, N, *out]`` at the model output."""
        raise NotImplementedError


@dataclass(frozen=True)
class ExactSqrt(SqrtSource):
    """The exact loss Hessian's symmetric square root (``M`` = output size or classes)."""

    def columns(self, spec, output, targets, generator):  # noqa: D102
        return spec.sqrt_hessian(output, targets)

    def __str__(self) -> str:
        return "exact"


@dataclass(frozen=True)
class MonteCarloSqrt(SqrtSource):
    """``samples`` columns from labels sampled from the model's predictive distribution.

    Attributes:
        samples: The number ``k`` of sampled labels per input (``M = k``).
    """

    samples: int

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {self.samples!r}")

    def columns(self, spec, output, targets, generator):  # noqa: D102
        return spec.sampled_sqrt_hessian(output, self.samples, generator)

    def __str__(self) -> str:
        return f"mc{self.samples}"


@dataclass(frozen=True)
class SignedHessian(Source):
    """Positive (``sign=1``) or negative (``sign=-1``) columns of the Hessian's factorization.

    Attributes:
        sign: ``1`` or ``-1``.
    """

    sign: int

    def __str__(self) -> str:
        return "hessian+" if self.sign > 0 else "hessian-"


GRAD = PerSampleGradient()
"""The per-sample gradient."""

EXACT = ExactSqrt()
"""The exact loss-Hessian square root."""

HESSIAN_POS = SignedHessian(1)
"""Positive columns of the Hessian factorization."""

HESSIAN_NEG = SignedHessian(-1)
"""Negative columns of the Hessian factorization."""


def as_source(source: Source | str | int) -> Source:
    """A :class:`Source` from itself or from its short name (``"grad"``, ``"exact"``, ``k``).

    Raises:
        TypeError: For anything else, naming the valid forms.
    """
    if isinstance(source, Source):
        return source
    names = {"grad": GRAD, "exact": EXACT, "hessian+": HESSIAN_POS, "hessian-": HESSIAN_NEG}
    if isinstance(source, str) and source in names:
        return names[source]
    if isinstance(source, int) and not isinstance(source, bool) and source >= 1:
        return MonteCarloSqrt(source)
    raise TypeError(
        f"a quantity's source must be a curvlab.backprop.sources.Source, one of {sorted(names)} "
        f"or a positive int (MC samples); got {source!r}"
    )
