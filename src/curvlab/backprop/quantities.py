r"""The quantities that :func:`curvlab.backprop.compute` can deliver beside the gradient.

Every quantity is a small object whose :attr:`~Quantity.name` (the class name plus its variant
settings) keys :class:`~curvlab.backprop.results.Results`. Conventions (MISSION.md, "Conventions"):

* The batch loss is :math:`L = r \sum_n \ell_n` with :math:`r = 1/N` for ``reduction="mean"``
  and :math:`r = 1` for ``"sum"``; :math:`\ell_n` is the per-sample loss (it carries torch's
  per-element mean, e.g. :math:`\ell_n = \frac{1}{C}\lVert f_n - y_n\rVert^2` for ``MSELoss``
  over ``[N, C]``). With ``subsampling``, :math:`n` runs over the chosen samples only and
  :math:`r` keeps the value of the full batch.
* Per-sample gradients :math:`g_n = \nabla_\theta \ell_n` carry no :math:`1/N`.
* The GGN of the batch is :math:`G = r \sum_n J_n^\top H_n J_n`, with :math:`J_n` the Jacobian
  of the network output for sample :math:`n` w.r.t. the parameter and :math:`H_n = \nabla_f^2
  \ell_n`. Monte-Carlo (MC) variants replace :math:`H_n` by :math:`\frac{1}{k}\sum_{i=1}^k
  s_{ni} s_{ni}^\top` with :math:`s_{ni}` the gradient of the loss at a label sampled from the
  model's predictive distribution (unbiased: :math:`\mathbb{E}[s s^\top] = H_n`).
* Kronecker quantities return a typed block per parameter (:mod:`~curvlab.backprop.kron`):
  for ``y = W x + b`` with ``W`` of shape ``[out, in]`` (a convolution's weight viewed as
  ``[out, in * prod(kernel)]``), :class:`~curvlab.backprop.kron.KronFactors` with input factor
  ``A`` and output factor ``B`` approximates the weight block by :math:`A \otimes B` in the
  column-major :math:`\mathrm{vec}(W)`; in PyTorch's row-major flattening ``W.flatten()`` that
  is ``torch.kron(B, A)`` (``block.dense()`` gives it for every layout). A bias gets its exact
  output-side block (``A = [[1]]``).

Writing a new quantity: subclass :class:`Quantity`, list the back-propagated factors it needs
in :meth:`Quantity.sources` and implement :meth:`Quantity.evaluate`, which receives a
:class:`~curvlab.backprop.derivatives.ParamDerivatives` (per-sample Jacobian-transpose products
of the parameter and their factored reductions). Quantities defined by a recursion over the
whole network (:class:`KFRA`, :class:`BL89`, :class:`HesScale`) implement
:meth:`Quantity.evaluate_model` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from curvlab.backprop.blocks import block_residual
from curvlab.backprop.kron import DenseBlock, Layout, kron_block
from curvlab.backprop.rules.base import KRON_APPROXIMATIONS
from curvlab.backprop.sources import (
    EXACT,
    GRAD,
    HESSIAN_NEG,
    HESSIAN_POS,
    MonteCarloSqrt,
    Source,
)

if TYPE_CHECKING:
    from curvlab.backprop.derivatives import Context, ParamDerivatives


class Quantity:
    """Base class: a quantity computed per parameter during :func:`compute`.

    Attributes:
        layerwise: ``True`` for approximations defined layer by layer (Kronecker factors,
            recursions); they need a per-layer rule and are not available on the generic path.
        per_parameter: ``False`` for quantities computed by a whole-network recursion
            (:meth:`evaluate_model`).
        per_sample_values: ``True`` if the value holds a parameter-shaped tensor per sample
            (``[N, *p]``): the streamed path then rescales each module's output gradient, which
            is smaller, instead of the value.
    """

    layerwise: ClassVar[bool] = False
    per_parameter: ClassVar[bool] = True
    per_sample_values: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """Key of this quantity in :class:`~curvlab.backprop.results.Results`."""
        return type(self).__name__

    def sources(self) -> tuple[Source, ...]:
        """The back-propagated factors :meth:`evaluate` reads (:mod:`~curvlab.backprop.sources`).

        Custom quantities may also name them ``"grad"``, ``"exact"`` or ``k`` (MC samples).
        """
        return ()

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Any:
        """Value of the quantity for the parameter that ``view`` describes."""
        raise NotImplementedError

    def evaluate_streamed(self, view: ParamDerivatives, ctx: Context) -> Any:
        """Value computed *inside* the backward pass, when the module's factor arrives.

        ``ctx.grad`` is not filled yet then; a quantity that needs it returns a partial value
        here and completes it in :meth:`finish_streamed`. The default is :meth:`evaluate`.
        """
        return self.evaluate(view, ctx)

    def finish_streamed(self, partial: Any, name: str, ctx: Context) -> Any:
        """Complete :meth:`evaluate_streamed`'s value after the backward pass (default: as is).

        ``partial`` belongs to this quantity alone (the engine copies a tensor that two
        quantities returned), so it may be overwritten.
        """
        return partial

    def evaluate_model(self, ctx: Context) -> dict[str, Any]:
        """Values for every parameter at once (whole-network recursions only)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _MCQuantity(Quantity):
    """A GGN-type quantity with an exact (``mc_samples=None``) and an MC variant."""

    default_mc_samples: ClassVar[int | None] = None

    def __init__(self, mc_samples: int | None = None) -> None:
        if mc_samples is not None and (
            isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1
        ):
            raise ValueError(f"mc_samples must be None or a positive int, got {mc_samples!r}")
        self.mc_samples = mc_samples

    @property
    def name(self) -> str:
        """Class name; ``MC`` is appended for one MC sample, ``MC{k}`` for ``k`` samples."""
        base = type(self).__name__
        if self.mc_samples == self.default_mc_samples:
            return base
        if self.mc_samples is None:
            return base + "Exact"
        return base + ("MC" if self.mc_samples == 1 else f"MC{self.mc_samples}")

    def sources(self) -> tuple[Source, ...]:
        """``(EXACT,)`` or ``(MonteCarloSqrt(k),)``."""
        return (EXACT,) if self.mc_samples is None else (MonteCarloSqrt(self.mc_samples),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mc_samples={self.mc_samples!r})"


# ------------------------------------------------------------------------------ first order
class BatchGrad(Quantity):
    r"""Per-sample gradients :math:`g_n = \nabla_\theta \ell_n`, shape ``[N, *p]``.

    Scaling: none (``grad == r * BatchGrad.sum(0)`` without subsampling).
    """

    per_sample_values: ClassVar[bool] = True

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        return view.jac_t(GRAD)[0]


class BatchL2(Quantity):
    r"""Per-sample squared gradient norms :math:`\lVert g_n \rVert^2`, shape ``[N]``.

    Per parameter; the norm of the whole per-sample gradient is the sum over parameters.
    """

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        return view.sq_norm(GRAD)[0]


class SumGradSquared(Quantity):
    r"""Second moment :math:`\sum_n g_n^{\odot 2}`, shape ``[*p]`` (grows with ``N``)."""

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        return view.sum_sq(GRAD, per_sample=False)


class Variance(Quantity):
    r"""Gradient variance :math:`\frac{1}{N}\sum_n (g_n - \bar g)^{\odot 2}`, shape ``[*p]``.

    :math:`\bar g = \frac{1}{N}\sum_n g_n`; independent of the reduction and of the scale of
    ``N``. Computed as :math:`\frac{1}{N}\sum_n g_n^{\odot 2} - \bar g^{\odot 2}`.
    """

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        sum_sq = view.sum_sq(GRAD, per_sample=False)  # may be another quantity's value
        if ctx.index is None:  # the gradient is r * sum_n g_n: no second contraction
            return _variance(sum_sq, ctx.grad[view.name], ctx.r, ctx.num_samples)
        return _variance(sum_sq, view.sum_jac_t(GRAD)[0], 1.0, ctx.num_samples)

    def evaluate_streamed(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        return view.sum_sq(GRAD, per_sample=False)  # the mean needs ctx.grad: finished later

    def finish_streamed(self, partial: Tensor, name: str, ctx: Context) -> Tensor:  # noqa: D102
        return _variance(partial, ctx.grad[name], ctx.r, ctx.num_samples, in_place=True)


def _variance(sum_sq: Tensor, total: Tensor, r: float, n: int, in_place: bool = False) -> Tensor:
    r""":math:`\frac{1}{N}\bigl(S - \frac{1}{N} (T / r)^{\odot 2}\bigr)`, clamped at zero.

    ``S`` is :math:`\sum_n g_n^{\odot 2}` and ``T / r`` is :math:`\sum_n g_n`. ``in_place``
    overwrites ``S`` (no new parameter-sized tensor: allocating one is a visible share of the
    cost on the CPU); otherwise one new tensor.
    """
    scale = -1.0 / (n * r * r)
    out = (
        sum_sq.addcmul_(total, total, value=scale)
        if in_place
        else torch.addcmul(sum_sq, total, total, value=scale)
    )
    return out.div_(n).clamp_min_(0.0)


# ------------------------------------------------------------------------- GGN and Hessian
class DiagGGN(_MCQuantity):
    r"""Diagonal of the GGN :math:`r \sum_n J_n^\top H_n J_n`, shape ``[*p]``.

    Args:
        mc_samples: ``None`` for the exact loss Hessian, ``k`` for ``k`` MC samples per input.
    """

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        return ctx.r * view.sum_sq(self.sources()[0], per_sample=False)


class BatchDiagGGN(_MCQuantity):
    r"""Per-sample GGN diagonals :math:`\mathrm{diag}(J_n^\top H_n J_n)`, shape ``[N, *p]``.

    Scaling: none (``DiagGGN == r * BatchDiagGGN.sum(0)`` for the same samples).

    Args:
        mc_samples: ``None`` for the exact loss Hessian, ``k`` for ``k`` MC samples per input.
    """

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        return view.sum_sq(self.sources()[0], per_sample=True)


class SqrtGGN(_MCQuantity):
    r"""Symmetric factor :math:`V` of the GGN, shape ``[M, N, *p]``.

    :math:`G_{\theta\theta} = \sum_{m, n} \mathrm{vec}(V_{mn}) \mathrm{vec}(V_{mn})^\top` (it
    includes :math:`\sqrt{r}`); ``M`` is the number of columns of the loss Hessian's square root
    (``C`` for classification, ``C * T`` for sequence outputs ``[N, C, T]``, the output size for
    MSE / BCE) or the number of MC samples. Blocks of different parameters give the off-diagonal
    GGN blocks, so concatenating all parameters gives the full GGN (ViViT, MISSION.md C5).

    Args:
        mc_samples: ``None`` for the exact loss Hessian, ``k`` for ``k`` MC samples per input.
    """

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        return view.jac_t(self.sources()[0]).mul_(ctx.r**0.5)


class DiagHessian(Quantity):
    r"""Diagonal of the Hessian :math:`\nabla_\theta^2 L`, shape ``[*p]``.

    Exact: the GGN plus the residual terms of every nonlinearity between the parameter and the
    loss. Fast path: the loss Hessian's square root and, for each elementwise activation module
    :math:`a = \phi(h)`, the signed columns of :math:`\mathrm{diag}(\phi''(h) \odot \partial
    \ell_n / \partial a)` are back-propagated to the parameters; used when every other operation
    on the way is linear in the activations (checked on the autograd graph). A post-norm
    ``nn.TransformerEncoderLayer`` on the model input, followed by linear operations, adds its
    layer norms' and softmax's residuals in closed form (:mod:`curvlab.backprop.blocks`).
    Otherwise (e.g. LayerNorm or attention elsewhere, functional nonlinearities in ``forward``)
    the generic torch.func path computes :math:`P` Hessian-vector products (slow; exact).
    """

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (HESSIAN_POS, HESSIAN_NEG)

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        if ctx.hessian_fallback is not None:
            return ctx.hessian_fallback.diag_hessian()[view.name]
        value = view.sum_sq(HESSIAN_POS, per_sample=False)
        if HESSIAN_NEG in view.factors:  # some activation has negative curvature residuals
            value = value - view.sum_sq(HESSIAN_NEG, per_sample=False)
        residual = block_residual(ctx.hessian_residuals, view.name, per_sample=False)
        if residual is not None:  # a whole block's second derivatives (blocks.py)
            value = value + residual
        return value.mul_(ctx.r)


class BatchDiagHessian(DiagHessian):
    r"""Per-sample Hessian diagonals :math:`\mathrm{diag}(\nabla_\theta^2 \ell_n)`, ``[N, *p]``.

    Scaling: none (``DiagHessian == r * BatchDiagHessian.sum(0)``). Same paths as
    :class:`DiagHessian`.
    """

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        if ctx.hessian_fallback is not None:
            return ctx.hessian_fallback.batch_diag_hessian()[view.name]
        value = view.sum_sq(HESSIAN_POS, per_sample=True)
        if HESSIAN_NEG in view.factors:
            value = value - view.sum_sq(HESSIAN_NEG, per_sample=True)
        residual = block_residual(ctx.hessian_residuals, view.name, per_sample=True)
        return value if residual is None else value + residual


# ---------------------------------------------------------------- block matrix products
class GGNMP(_MCQuantity):
    r"""Block-diagonal GGN products: ``v -> G_{\theta\theta} v`` per parameter.

    ``results["GGNMP"][name]`` is a function of a tensor ``[*p]`` or ``[K, *p]`` (``K``
    vectors) returning the same shape. Uses the back-propagated factors (no further forward
    pass): :math:`G v = r \sum_{m,n} J_n^\top F_{mn} \langle F_{mn}, J_n v \rangle`.

    Args:
        mc_samples: ``None`` for the exact loss Hessian, ``k`` for ``k`` MC samples per input.
    """

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Callable[[Tensor], Tensor]:  # noqa: D102
        source, r = self.sources()[0], ctx.r
        return lambda v: r * view.matmul(source, v)


class HMP(Quantity):
    r"""Block-diagonal Hessian products: ``v -> H_{\theta\theta} v`` per parameter.

    Same form as :class:`GGNMP`, with the signed Hessian factors of :class:`DiagHessian`
    (or, on the generic path, a torch.func Hessian-vector product restricted to the block).
    """

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (HESSIAN_POS, HESSIAN_NEG)

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Callable[[Tensor], Tensor]:  # noqa: D102
        if ctx.hessian_fallback is not None:
            return ctx.hessian_fallback.block_hvp(view.name)
        r, signed = ctx.r, HESSIAN_NEG in view.factors

        def product(v: Tensor) -> Tensor:
            out = view.matmul(HESSIAN_POS, v)
            return r * (out - view.matmul(HESSIAN_NEG, v) if signed else out)

        return product


# ------------------------------------------------------------------------------ Kronecker
def _joint_partner(view: ParamDerivatives) -> tuple[str, str] | None:
    """``(weight, bias)`` local names if ``view``'s parameter can share a joint block."""
    if len(view.uses) != 1 or len(view.uses[0][0].calls) != 1:
        return None
    owner, local = view.uses[0]
    prefix, _, leaf = local.rpartition(".")
    if leaf not in ("weight", "bias") or prefix:
        return None
    if "weight" not in owner.local_names or "bias" not in owner.local_names:
        return None
    return "weight", "bias"


class _KroneckerQuantity(Quantity):
    """Kronecker factors of every parameter (KFAC, KFLR): options and the typed blocks."""

    layerwise = True
    base_name: ClassVar[str] = ""

    def __init__(self, kfac_approx: str = "expand", separate_weight_and_bias: bool = True) -> None:
        if kfac_approx not in KRON_APPROXIMATIONS:
            raise ValueError(
                f"kfac_approx must be one of {KRON_APPROXIMATIONS}, got {kfac_approx!r}"
            )
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError(
                f"separate_weight_and_bias must be a bool, got {separate_weight_and_bias!r}"
            )
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = separate_weight_and_bias

    def _variant(self) -> str:
        reduce = "Reduce" if self.kfac_approx == "reduce" else ""
        return reduce + ("" if self.separate_weight_and_bias else "Joint")

    def _block(self, view: ParamDerivatives, ctx: Context, source: Source):
        n, r = ctx.num_samples, ctx.r
        kind = view.kron_kind()
        if kind == "whole":
            sums = view.kron(source, self.kfac_approx)
            return DenseBlock(r * sums.output_sum, (tuple(view.shape),), (view.name,), n, r)
        partner = None if self.separate_weight_and_bias else _joint_partner(view)
        if partner is None or kind == "columns":
            sums = view.kron(source, self.kfac_approx)
            layout_kind = "bias" if sums.input_sum is None else kind
            layout = Layout(layout_kind, (tuple(view.shape),), view.groups())
            return kron_block(sums, layout, (view.name,), n, r)
        owner = view.uses[0][0]
        key = ("joint-block", owner, source, self.kfac_approx)
        if key not in view.cache:
            params = dict(owner.module.named_parameters(remove_duplicate=False))
            prefix = view.name[: -len(view.uses[0][1])]
            names = tuple(prefix + local for local in partner)
            shapes = tuple(tuple(params[local].shape) for local in partner)
            sums = view.kron(source, self.kfac_approx, local="weight")
            layout = Layout(kind, shapes, view.groups())
            view.cache[key] = kron_block(sums, layout, names, n, r)
        return view.cache[key]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kfac_approx={self.kfac_approx!r}, "
            f"separate_weight_and_bias={self.separate_weight_and_bias!r})"
        )


class KFLR(_KroneckerQuantity):
    r"""Kronecker factors with the exact loss Hessian (Botev et al., 2017).

    Per weight a :class:`~curvlab.backprop.kron.KronFactors` with (KFAC-expand)
    :math:`A = \frac{1}{N T}\sum_{n,t} u_{nt} u_{nt}^\top` (``T``: positions sharing the
    weight: sequence positions, convolution patches; ``1`` for a plain ``Linear``) and
    :math:`B = r \sum_{n,t} \sum_m s_{mnt} s_{mnt}^\top`, :math:`s` the exact loss-Hessian
    square root back-propagated to the layer output. KFAC-reduce (``kfac_approx="reduce"``)
    uses :math:`A = \frac1N \sum_n \bar u_n \bar u_n^\top`, :math:`\bar u_n =
    \frac1T\sum_t u_{nt}`, and :math:`B = r \sum_{m,n} (\sum_t s_{mnt})(\sum_t
    s_{mnt})^\top`. A bias gets that last :math:`B`, its exact GGN block. Normalization layers
    and modules without a Kronecker rule get their whole GGN block
    (:class:`~curvlab.backprop.kron.DenseBlock`).

    Args:
        kfac_approx: ``"expand"`` (default) or ``"reduce"``; equal when ``T = 1``.
        separate_weight_and_bias: ``False`` gives a layer's weight and bias one joint block
            (the input gains a trailing one), stored under both names.
    """

    def __init__(self, kfac_approx: str = "expand", separate_weight_and_bias: bool = True) -> None:
        super().__init__(kfac_approx, separate_weight_and_bias)

    @property
    def name(self) -> str:
        """``"KFLR"``, with ``Reduce`` / ``Joint`` appended for those options."""
        return "KFLR" + self._variant()

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (EXACT,)

    def evaluate(self, view: ParamDerivatives, ctx: Context):  # noqa: D102
        return self._block(view, ctx, EXACT)


class KFAC(_KroneckerQuantity):
    r"""Kronecker factors with an MC-sampled loss Hessian (Martens & Grosse, 2015).

    Same blocks as :class:`KFLR` with :math:`s` from ``mc_samples`` sampled labels.

    Args:
        mc_samples: Sampled labels per input (default 1).
        kfac_approx: ``"expand"`` (default) or ``"reduce"``.
        separate_weight_and_bias: ``False`` for joint weight-and-bias blocks.
    """

    def __init__(
        self,
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = True,
    ) -> None:
        if mc_samples is None:
            raise ValueError("KFAC is the MC variant; use KFLR() for the exact loss Hessian")
        self.source = MonteCarloSqrt(mc_samples)
        self.mc_samples = mc_samples
        super().__init__(kfac_approx, separate_weight_and_bias)

    @property
    def name(self) -> str:
        """``"KFAC"`` for one MC sample, ``"KFACMC{k}"`` for ``k``; then ``Reduce`` / ``Joint``."""
        base = "KFAC" if self.mc_samples == 1 else f"KFACMC{self.mc_samples}"
        return base + self._variant()

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (self.source,)

    def evaluate(self, view: ParamDerivatives, ctx: Context):  # noqa: D102
        return self._block(view, ctx, self.source)

    def __repr__(self) -> str:
        return f"KFAC(mc_samples={self.mc_samples!r}, " + super().__repr__().split("(", 1)[1]


class KFACEmpirical(_KroneckerQuantity):
    r"""Kronecker factors of the empirical Fisher: :math:`B` from the output gradients at the labels.

    Same blocks as :class:`KFLR` with :math:`s` the per-sample loss gradient w.r.t. the layer
    output (``M = 1``): :math:`B = r \sum_{n,t} g_{nt} g_{nt}^\top` (KFAC-expand).

    Args:
        kfac_approx: ``"expand"`` (default) or ``"reduce"``.
        separate_weight_and_bias: ``False`` for joint weight-and-bias blocks.
    """

    @property
    def name(self) -> str:
        """``"KFACEmpirical"``, then ``Reduce`` / ``Joint``."""
        return "KFACEmpirical" + self._variant()

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (GRAD,)

    def evaluate(self, view: ParamDerivatives, ctx: Context):  # noqa: D102
        return self._block(view, ctx, GRAD)


class KFRA(Quantity):
    r"""Kronecker factors with recursive batch averages (Botev et al., 2017).

    ``A`` as in :class:`KFLR`; ``B`` comes from the batch-averaged GGN :math:`\bar G` w.r.t. each
    activation (flattened per sample), propagated backward through the model's modules (any
    graph: a module output used several times sums its consumers' blocks, the functional glue
    between modules enters through its Jacobian):
    :math:`\bar G_{\mathrm{out}} = r \sum_n H_n`, and below a module with per-sample input
    Jacobian :math:`J_n`, :math:`\bar G_x = \frac1N \sum_n J_n^\top \bar G_y J_n` (one
    Jacobian for modules linear in their input — Linear, Conv, ConvTranspose, average pooling,
    Flatten; :math:`\bar G_a \odot \frac1N\sum_n \phi'(h_n)\phi'(h_n)^\top` for an
    elementwise activation; per-sample Jacobians for max pooling and other parameter-free
    modules). A layer's ``B`` sums the diagonal blocks of :math:`\bar G_y` over the positions that
    share its weight (KFLR's layout, grouped layers per group). Equals KFLR for one sample.
    Activations are dense ``[D, D]`` matrices, so ``D`` is capped by
    ``recursions.KFRA_MAX_FEATURES`` (a larger one raises, naming the module).
    """

    layerwise = True
    per_parameter = False

    def evaluate_model(self, ctx: Context) -> dict[str, Any]:  # noqa: D102
        from curvlab.backprop.recursions import kfra

        return kfra(ctx)


class BL89(Quantity):
    r"""Becker & LeCun (1989) diagonal Hessian approximation, shape ``[*p]``.

    Per sample, a diagonal :math:`d` is propagated backward from :math:`\mathrm{diag}(H_n)`
    dropping every off-diagonal term: through a linear map (Linear, Conv, pooling)
    :math:`d_x = (J \odot J)^\top d_y`, through an elementwise activation
    :math:`d_h = \phi'(h)^2 d_a + \phi''(h)\,\partial\ell_n/\partial a`. A weight gets
    :math:`r \sum_{n,t} d_{y,nt} x_{nt}^2` (bias :math:`r\sum_{n,t} d_{y,nt}`). Any graph:
    a tensor used several times (residual connections, branches) sums its consumers'
    contributions. Supported: Linear, Conv1d/2d/3d (zero padding) and any module whose rule has
    the input-side steps, elementwise activations, Max/Avg/AdaptiveAvg pooling, padding,
    reshapes, dropout, and between modules additions, concatenation, views, slicing, ``mean``
    and products with constants (:mod:`~curvlab.backprop.diagonals`).
    """

    layerwise = True
    per_parameter = False
    exact_last_layer: ClassVar[bool] = False

    def evaluate_model(self, ctx: Context) -> dict[str, Any]:  # noqa: D102
        from curvlab.backprop.recursions import diagonal_recursion

        return diagonal_recursion(ctx, exact_last_layer=self.exact_last_layer)


class HesScale(BL89):
    r"""HesScale (Elsayed & Mahmood, 2022): :class:`BL89` with an exact last layer.

    The diagonal w.r.t. the *input* of the last parametric layer is exact,
    :math:`d_x = \mathrm{diag}(W^\top H_n W)` (it keeps the off-diagonal entries of the loss
    Hessian, e.g. :math:`-p_i p_j` for softmax cross-entropy), and the BL89 recursion continues
    below. The last layer's own parameters are exact in both methods.
    """

    exact_last_layer = True


FIRST_ORDER = (BatchGrad, BatchL2, SumGradSquared, Variance)
"""Quantities built from per-sample gradients."""

ALL = (
    BatchGrad,
    BatchL2,
    SumGradSquared,
    Variance,
    DiagGGN,
    BatchDiagGGN,
    SqrtGGN,
    DiagHessian,
    BatchDiagHessian,
    GGNMP,
    HMP,
    KFAC,
    KFLR,
    KFACEmpirical,
    KFRA,
    BL89,
    HesScale,
)
"""Every built-in quantity class."""
