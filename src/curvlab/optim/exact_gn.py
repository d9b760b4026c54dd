r"""Exact Gauss-Newton optimization of reversible networks (Buffelli et al., NeurIPS 2024).

The Gauss-Newton step on a batch is :math:`\Delta\theta = -\alpha\,(J^\top H J)^{+} J^\top g`; when the
``[N k, P]`` Jacobian :math:`J` has full row rank it moves the outputs, to first order, by
:math:`J \Delta\theta = -\alpha\, s` with :math:`s = H^{+} g` the function-space Newton step
(:mod:`curvlab.optim.function_space`). Every scheme here is normalized to that output change, so
schemes compare at one learning rate:

``"right-inverse"`` (default)
    :math:`\Delta\theta = -\alpha\, J^{\dashv} s` with a cheap exact right inverse. The target
    :math:`T = s U^\top` of the body output is carried back through the blocks as the tangent of
    the exact inverse; block :math:`b` alone would meet it by solving
    :math:`A_F \Delta W_F = t_1` and :math:`A_G \Delta W_G = t_2 - G'(y_1) A_F \Delta W_F`. The blocks
    whose feature matrices have full row rank :math:`N` solve exactly; a convex combination (equal
    weights) of their solutions is again an exact right inverse. By the paper's Theorem 4.3 it
    gives the same loss trajectory as the pseudo-inverse up to :math:`O(\alpha)`.
``"pinv"``
    The Moore-Penrose step :math:`-\alpha J^{+} s = -\alpha J^\top (J J^\top)^{+} s` through the
    structured NTK :math:`J J^\top = \sum_j (A_j A_j^\top) \odot (\Gamma_j \Gamma_j^\top)` with
    :math:`\Gamma_{j,n} = \partial f_n / \partial o_{j,n}` ``[k, m]`` the Jacobian of the output with
    respect to branch :math:`j`'s output; no ``[N k, P]`` Jacobian is formed. Works at any width.
    For cross-entropy it differs from :math:`(J^\top H J)^{+} J^\top g` only along directions that
    shift every logit of a sample equally, which leave the loss unchanged.
``"paper"``
    The authors' scheme: every block solves for the full tangent with a thresholded
    pseudo-inverse. Exact (up to the factor :math:`L`, divided out unless ``normalize=False``)
    only when every block's features have full row rank; otherwise it is off the step's direction
    (``track_residual=True`` measures by how much). ``normalize=False`` reproduces the authors' raw
    scale: :math:`J\Delta\theta = -\alpha\, 2 L (f - y)` for MSE, :math:`-\alpha L (p - y)` for CE.

Cost: one forward pass keeps every branch's features and activation slope; the block schemes add
one tangent sweep through the inverse (one JVP per branch), :math:`2L` Gram matrices, one batched
Cholesky solve for all full-rank blocks and an in-place ``addmm_`` per branch, about 1.1-1.3 Adam
steps; ``"pinv"`` adds a backward sweep with :math:`k` cotangents, the NTK's lower block triangle
and an :math:`N k \times N k` Cholesky (4-6 Adam steps at ``N = 256``). Measurements and the math
in full: ``docs/exact_gn.md``, ``benchmarks/exact_gn.py``.

Safeguards: the batch is checked first (:mod:`curvlab.optim.batch`: shapes, label range, NaN/Inf,
each error naming the argument). After the update, one forward pass on the same batch measures the
loss; a step that makes it non-finite or raises it above ``max_loss_ratio`` times
:math:`\max(L_\text{before}, L_0)` (:math:`L_0` the loss of a zero output: :math:`\log k` for
cross-entropy, :math:`\operatorname{mean}(y^2)` for MSE) is undone, the parameters restored
bit for bit from a copy, and :class:`DivergedStepError` names the likely cause.
``max_loss_ratio=None`` switches the check off (no forward pass, no copy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from curvlab.backprop.rules.activation import first_derivative
from curvlab.nn.reversible import InvertedBottleneck, RevMLP
from curvlab.optim.batch import check_inputs, check_targets
from curvlab.optim.function_space import LOSSES, as_targets, loss_value, newton_step
from curvlab.optim.gram import SOLVERS, GramInverse, default_rtol

SCHEMES = ("right-inverse", "pinv", "paper")

DEFAULT_CE_OUTPUT_DAMPING = 0.3
r"""Default :math:`\lambda` of the cross-entropy step :math:`s_n = (H_n + \lambda I)^{-1} g_n`.

Measured on the bundled Fashion-MNIST subset with ``RevMLP(784, 10, hidden=1024, depth=4)``
(``benchmarks/exact_gn_ce_defaults.py``, figures in ``docs/exact_gn.md``): the undamped Newton step
diverged in every run (lr 0.1 to 2), :math:`\lambda \le 10^{-2}` at lr >= 0.5 and
:math:`\lambda = 0.1` at lr >= 2 on unstandardized inputs; :math:`\lambda = 0.3` trained in every
run (lr 0.1 to 4, three seeds, raw and standardized inputs, n = 256 and 512) and faster than the
identity-Hessian step at the same learning rate.
"""


class NoExactRightInverseError(ValueError):
    """Raised when no block of the network can carry an exact share of the GN step."""


class DivergedStepError(FloatingPointError):
    """A step made the loss or the parameters non-finite, or raised the loss by orders of magnitude.

    The step has been undone: the parameters hold exactly their values from before it. The
    message names the likely cause (learning rate, the cross-entropy step's damping or
    ``identity_hessian``, the Gram solves' damping).

    Attributes:
        loss_before: Batch loss before the step.
        loss_after: Batch loss after it (``nan`` when the parameters were not finite).
    """

    def __init__(self, message: str, loss_before: float, loss_after: float) -> None:
        super().__init__(message)
        self.loss_before = loss_before
        self.loss_after = loss_after


@dataclass
class _Branch:
    r"""Linearization of one branch :math:`o = \sigma(\operatorname{norm}(z) C) W^\top + b` at the batch.

    Holds what the forward pass computed, so no step recomputes it: the features
    :math:`A = \sigma(\operatorname{norm}(z) C)` ``[N, h]`` (without the bias's ones column; a bias
    enters the Gram matrix as :math:`A A^\top + \mathbf 1 \mathbf 1^\top`), the activation's slope
    :math:`\sigma'` at the pre-activation (``None`` for the identity; from
    :mod:`curvlab.backprop.rules.activation`) and the branch input ``[N, m]`` (for the norm's
    derivatives).
    """

    module: InvertedBottleneck
    features: Tensor  # [N, h]
    slope: Tensor | None  # [N, h]; None: identity activation
    inputs: Tensor  # [N, m] branch input

    @property
    def has_bias(self) -> bool:
        return self.module.proj.bias is not None

    def output(self) -> Tensor:
        r"""Branch output :math:`A W^\top + b`, ``[N, m]`` (the branch's own projection)."""
        return self.module.proj(self.features)

    def gram(self) -> Tensor:
        r"""Gram matrix :math:`A A^\top` (:math:`+\mathbf 1 \mathbf 1^\top` with a bias), ``[N, N]``."""
        gram = self.features @ self.features.T
        return gram.add_(1.0) if self.has_bias else gram

    def output_jvp(self, tangent: Tensor) -> Tensor:
        r"""Output tangent :math:`((\dot z' C) \odot \sigma') W^\top` for input tangents ``[..., N, m]``."""
        module = self.module
        if not isinstance(module.norm, nn.Identity):
            tangent = _batched(lambda t: jvp(module.norm, (self.inputs,), (t,))[1], tangent)
        pre_tangent = tangent if module.expansion is None else tangent @ module.expansion
        if self.slope is not None:
            pre_tangent = pre_tangent * self.slope
        return pre_tangent @ module.proj.weight.T

    def input_vjp(self, cotangent: Tensor) -> Tensor:
        r"""Input cotangent :math:`((\bar o W) \odot \sigma') C^\top` for ``[..., N | 1, m]``.

        A cotangent shared by all samples may be passed with a sample axis of size 1; it is
        broadcast only after the first product.
        """
        module = self.module
        pre_cotangent = cotangent @ module.proj.weight
        if self.slope is not None:
            pre_cotangent = pre_cotangent * self.slope
        out = pre_cotangent if module.expansion is None else pre_cotangent @ module.expansion.T
        if not isinstance(module.norm, nn.Identity):
            out = out.expand(*out.shape[:-2], *self.inputs.shape)
            pullback = vjp(module.norm, self.inputs)[1]
            out = _batched(lambda c: pullback(c)[0], out)
        return out

    def parameter_deltas(self, coefficients: Tensor) -> tuple[Tensor, Tensor | None]:
        r""":math:`\Delta W = C^\top A` ``[m, h]`` and :math:`\Delta b = C^\top \mathbf 1` ``[m]``.

        The minimum-norm solution of :math:`[A, \mathbf 1] [\Delta W, \Delta b]^\top = R` for
        coefficients :math:`C = ([A, \mathbf 1][A, \mathbf 1]^\top)^{+} R`, ``[N, m]``.
        """
        delta_w = coefficients.T @ self.features
        return delta_w, (coefficients.sum(0) if self.has_bias else None)


def _batched(function: Callable[[Tensor], Tensor], tangents: Tensor) -> Tensor:
    """Apply a per-batch linear map to ``[N, m]`` or, through ``vmap``, to ``[..., N, m]``."""
    if tangents.ndim == 2:
        return function(tangents)
    flat = tangents.reshape(-1, *tangents.shape[-2:])
    return vmap(function)(flat).reshape(tangents.shape)


@dataclass
class StepInfo:
    """What one :meth:`ExactGN.step` did."""

    loss_before: float
    blocks_used: list[int] = field(default_factory=list)
    residual: float | None = None
    loss_after: float | None = None  # measured by the divergence check; None when it is off


def _with_ones(branch: _Branch) -> Tensor:
    """Feature matrix with the bias's ones column, ``[N, h + 1]`` (``[N, h]`` without a bias)."""
    if not branch.has_bias:
        return branch.features
    ones = branch.features.new_ones(branch.features.shape[0], 1)
    return torch.cat([branch.features, ones], dim=1)


class ExactGN(torch.optim.Optimizer):
    r"""Exact Gauss-Newton optimizer for :class:`curvlab.nn.RevMLP`.

    Args:
        model: The reversible network (its trained parameters are the projections ``proj``).
        lr: Learning rate :math:`\alpha`.
        loss: ``"mse"`` (targets: labels or ``[N, k]``) or ``"ce"`` (labels or probabilities).
        scheme: ``"right-inverse"`` (default), ``"pinv"`` or ``"paper"``; see the module docs.
        solver: Gram solver, one of ``"cholesky"``, ``"eigh"``, ``"svd"``, ``"damped"``
            (:mod:`curvlab.optim.gram`).
        rtol: Relative singular-value threshold (default :math:`10\sqrt{\varepsilon}` of the dtype).
        atol: Absolute singular-value threshold.
        damping: :math:`\lambda` added to every Gram matrix / the NTK; required by ``"damped"``.
        identity_hessian: CE only: the authors' :math:`H = I` variant (:math:`s = p - y`).
        output_damping: CE with the true Hessian only: Levenberg-Marquardt damping :math:`\lambda`
            of the function-space step, :math:`s = (H + \lambda I)^{-1} g`; bounds the Newton
            step, which grows like :math:`1/p_y` on confidently wrong samples (see
            :mod:`curvlab.optim.function_space`). ``None`` (default):
            :data:`DEFAULT_CE_OUTPUT_DAMPING` for cross-entropy, 0 otherwise; ``0.0`` gives the
            undamped Newton step.
        normalize: Divide the ``"paper"`` scheme's sum of block solutions by :math:`L` (and drop
            the authors' factor 2 for MSE); ``False`` reproduces their raw step.
        track_residual: After each step, measure
            :math:`\|J\Delta\theta + \alpha c\, s\| / \|\alpha c\, s\|` with a Jacobian-vector
            product (one extra forward pass) and store it in :attr:`last_info`; :math:`c` is the
            scheme's scale (1, or the authors' raw factor with ``normalize=False``), so an exact
            step reports 0.
        max_loss_ratio: Undo a step and raise :class:`DivergedStepError` when the batch loss
            after it is non-finite or exceeds ``max_loss_ratio`` times
            :math:`\max(L_\text{before}, L_0)`, :math:`L_0` the loss of a zero output. Costs one
            forward pass on the batch and a copy of the moved parameters per step; ``None``
            switches the check off (the step's coefficients are still checked to be finite).

    ``step(inputs, targets)`` returns the batch loss before the step; :attr:`last_info` holds the
    loss after it (when checked), the blocks used and the residual.
    """

    def __init__(
        self,
        model: RevMLP,
        lr: float,
        loss: str = "mse",
        scheme: str = "right-inverse",
        solver: str = "cholesky",
        rtol: float | None = None,
        atol: float = 0.0,
        damping: float = 0.0,
        identity_hessian: bool = False,
        output_damping: float | None = None,
        normalize: bool = True,
        track_residual: bool = False,
        max_loss_ratio: float | None = 100.0,
    ) -> None:
        if not isinstance(model, RevMLP):
            raise TypeError(
                f"ExactGN needs a curvlab.nn.RevMLP (a reversible net whose trained parameters "
                f"enter linearly), got {type(model).__name__}"
            )
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        if solver == "damped" and damping <= 0:
            raise ValueError("solver='damped' needs damping > 0")
        if identity_hessian and loss != "ce":
            raise ValueError("identity_hessian applies to loss='ce' only")
        true_ce = loss == "ce" and not identity_hessian
        if output_damping is None:
            output_damping = DEFAULT_CE_OUTPUT_DAMPING if true_ce else 0.0
        if output_damping and not true_ce:
            raise ValueError("output_damping applies to loss='ce' with the true Hessian only")
        if output_damping < 0:
            raise ValueError(f"output_damping must be >= 0, got {output_damping}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if max_loss_ratio is not None and not max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio must be > 1 or None (no check), got {max_loss_ratio}")
        super().__init__([p for p in model.parameters() if p.requires_grad], {"lr": lr})
        self.model = model
        self.loss = loss
        self.scheme = scheme
        self.solver = solver
        self.rtol = rtol
        self.atol = atol
        self.damping = damping
        self.identity_hessian = identity_hessian
        self.output_damping = output_damping
        self.normalize = normalize
        self.track_residual = track_residual
        self.max_loss_ratio = max_loss_ratio
        self.last_info: StepInfo | None = None
        self._projection_pinv: tuple[tuple, Tensor] | None = None

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor) -> float:  # type: ignore[override]
        """Perform one Gauss-Newton update on the batch and return the loss before it.

        Args:
            inputs: ``[N, *]`` floating inputs flattening to ``[N, d]`` (model's dtype).
            targets: ``[N]`` integer class labels, or ``[N, k]`` values (MSE) / probabilities (CE).

        Raises:
            TypeError, ValueError: a bad batch; the message names the argument
                (:mod:`curvlab.optim.batch`).
            DivergedStepError: the step diverged and was undone.
            NoExactRightInverseError: a block scheme found no full-rank block.
        """
        lr = self._learning_rate()
        x, target_values, branches, outputs = self._prepare(inputs, targets, "ExactGN.step")
        loss_before = float(loss_value(outputs, target_values, self.loss))
        if not math.isfinite(loss_before):
            raise FloatingPointError(
                f"ExactGN.step: the loss before the step is {loss_before} for finite outputs "
                f"(max |output| {float(outputs.abs().max()):.3g}): {self._parameter_state()}"
            )
        step = self._function_space_step(outputs, target_values, "ExactGN.step")
        coefficients, used = self._coefficients(branches, step)
        scale = self._raw_scale()
        info = StepInfo(loss_before=loss_before, blocks_used=used)
        if self.track_residual:
            directions = self._directions_from(branches, coefficients)
            info.residual = self._relative_residual(x, directions, step)
        if not all(bool(torch.isfinite(c).all()) for c in coefficients.values()):
            raise DivergedStepError(
                "ExactGN: the step's coefficients are not finite; nothing was changed. "
                + self._causes(step, lr),
                loss_before,
                math.nan,
            )
        saved = None
        if self.max_loss_ratio is not None:
            saved = {p: p.detach().clone() for p in self._moved_parameters(branches, coefficients)}
        self._apply(branches, coefficients, alpha=-lr * scale)
        if saved is not None:
            info.loss_after = self._check_step(x, target_values, loss_before, step, saved, lr)
        self.last_info = info
        return loss_before

    def directions(self, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The update direction ``D`` (``Δθ = -lr·D``) by parameter name, without stepping."""
        with torch.no_grad():
            _, y, branches, outputs = self._prepare(inputs, targets, "ExactGN.directions")
            step = self._function_space_step(outputs, y, "ExactGN.directions")
            coefficients, _ = self._coefficients(branches, step)
            found = self._directions_from(branches, coefficients)
        names = {p: n for n, p in self.model.named_parameters()}
        return {names[p]: d for p, d in found.items()}

    # ------------------------------------------------------------------ safeguards
    def _learning_rate(self) -> float:
        lrs = {group["lr"] for group in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(
                f"ExactGN needs one learning rate for all parameters, got {sorted(lrs)}"
            )
        return lrs.pop()

    def _raw_scale(self) -> float:
        """The authors' raw factor (``"paper"``, ``normalize=False``): :math:`2L` MSE, :math:`L` CE."""
        if self.scheme == "paper" and not self.normalize:
            return len(self.model.body.blocks) * (2.0 if self.loss == "mse" else 1.0)
        return 1.0

    def _prepare(
        self, inputs: Tensor, targets: Tensor, where: str
    ) -> tuple[Tensor, Tensor, list[_Branch], Tensor]:
        """Check the batch, run the forward pass; returns ``x [N, d]``, targets, branches, ``f``."""
        model = self.model
        x = check_inputs(inputs, model.in_features, model.projection, where)
        check_targets(targets, x.shape[0], model.num_classes, self.loss, where)
        branches, body_out = self._linearize(x)
        outputs = body_out @ model.projection
        target_values = as_targets(targets, model.num_classes, self.loss, outputs)
        if not bool(torch.isfinite(outputs).all()):
            raise FloatingPointError(
                f"{where}: the model's outputs are not finite for finite inputs: "
                f"{self._parameter_state()}"
            )
        return x, target_values, branches, outputs

    def _function_space_step(self, outputs: Tensor, targets: Tensor, where: str) -> Tensor:
        """The step :math:`s` ``[N, k]`` of the loss; raises when it overflows."""
        step = newton_step(outputs, targets, self.loss, self.identity_hessian, self.output_damping)
        if not bool(torch.isfinite(step).all()):
            raise FloatingPointError(
                f"{where}: the function-space step is not finite for outputs up to "
                f"|f| = {float(outputs.abs().max()):.3g}: {self._parameter_state()}"
            )
        return step

    def _parameter_state(self) -> str:
        """A sentence on the trained parameters: which hold NaN/Inf, or how large they are."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            return (
                f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or "
                f"Inf (did an earlier step diverge with max_loss_ratio=None?); restore them"
            )
        largest = max(float(p.abs().max()) for p in self.model.parameters())
        return (
            f"the parameters are finite but large (max |entry| {largest:.3g}), so the computation "
            f"overflows (did an earlier step diverge with max_loss_ratio=None?); restore them"
        )

    def _moved_parameters(
        self, branches: list[_Branch], coefficients: dict[int, Tensor]
    ) -> list[Tensor]:
        return [p for index in coefficients for p in branches[index].module.proj.parameters()]

    def _check_step(
        self,
        x: Tensor,
        targets: Tensor,
        loss_before: float,
        step: Tensor,
        saved: dict[Tensor, Tensor],
        lr: float,
    ) -> float:
        r"""Loss after the step; undo the step and raise if it diverged (see ``max_loss_ratio``)."""
        assert self.max_loss_ratio is not None
        finite = all(bool(torch.isfinite(p).all()) for p in saved)
        loss_after = math.nan
        if finite:
            loss_after = float(loss_value(self.model(x), targets, self.loss))
        zero_loss = float(loss_value(torch.zeros_like(targets), targets, self.loss))
        limit = self.max_loss_ratio * max(loss_before, zero_loss)
        if math.isfinite(loss_after) and loss_after <= limit:
            return loss_after
        moved = sum(float((p - old).double().square().sum()) for p, old in saved.items())
        size = sum(float(old.double().square().sum()) for old in saved.values())
        change = math.sqrt(moved / size) if size > 0 else math.inf
        for p, old in saved.items():
            p.copy_(old)
        what = (
            "made the parameters non-finite"
            if not finite
            else f"took the batch loss from {loss_before:.4g} to {loss_after:.4g}"
        )
        raise DivergedStepError(
            f"ExactGN: the step {what} (limit: max_loss_ratio={self.max_loss_ratio:g} x "
            f"max(loss before, loss of a zero output {zero_loss:.4g}) = {limit:.4g}; the moved "
            f"parameters changed by {change:.3g} x their norm). The step was undone: the "
            f"parameters are restored exactly. " + self._causes(step, lr),
            loss_before,
            loss_after,
        )

    def _causes(self, step: Tensor, lr: float) -> str:
        """The likely causes of a diverged step, most likely first, with what to change."""
        causes = []
        if self.loss == "ce" and not self.identity_hessian:
            per_sample = step.abs().amax(dim=-1)
            worst = int(per_sample.argmax())
            size = f"its largest entry is {float(per_sample[worst]):.3g} (sample {worst})"
            if self.output_damping == 0:
                causes.append(
                    f"the undamped cross-entropy Newton step (identity_hessian=False, "
                    f"output_damping=0): it grows like 1/p_y on confidently wrong samples and {size}; "
                    f"use output_damping > 0 (default {DEFAULT_CE_OUTPUT_DAMPING:g}) or "
                    f"identity_hessian=True"
                )
            else:
                causes.append(
                    f"the cross-entropy step's damping output_damping={self.output_damping:g} "
                    f"bounds it by |g|/output_damping and {size}; raise output_damping or use "
                    f"identity_hessian=True"
                )
        causes.append(
            f"the learning rate lr={lr:g}: to first order the outputs move by lr x the "
            f"function-space step; try a smaller lr (e.g. {lr / 10:g})"
        )
        if self._raw_scale() != 1:
            causes.append(
                f"normalize=False multiplies the paper scheme's step by {self._raw_scale():g}"
            )
        causes.append(
            f"nearly singular Gram matrices (damping={self.damping:g} of the Gram solves): "
            f"solver='damped' with damping > 0, or a larger rtol, bounds the step"
        )
        return "Likely causes: " + "; ".join(f"({i}) {c}" for i, c in enumerate(causes, 1)) + "."

    # ------------------------------------------------------------------ internals
    def _coefficients(
        self, branches: list[_Branch], step: Tensor
    ) -> tuple[dict[int, Tensor], list[int]]:
        r"""Per-branch coefficients :math:`C_j` ``[N, m]`` and the blocks used.

        :math:`\Delta W_j = C_j^\top A_j`; branches without an entry do not move.
        """
        rtol = default_rtol(step.dtype) if self.rtol is None else self.rtol
        if self.scheme == "pinv":
            return self._pinv_coefficients(branches, step, rtol)
        return self._block_coefficients(branches, self._lift(step), rtol)

    def _directions_from(
        self, branches: list[_Branch], coefficients: dict[int, Tensor]
    ) -> dict[Tensor, Tensor]:
        """Directions of every trained parameter (zeros for branches that do not move)."""
        directions: dict[Tensor, Tensor] = {}
        for index, coef in coefficients.items():
            delta_w, delta_b = branches[index].parameter_deltas(coef)
            proj = branches[index].module.proj
            directions[proj.weight] = delta_w
            if delta_b is not None:
                directions[proj.bias] = delta_b
        for module in self._modules():
            for param in module.proj.parameters():
                if param not in directions:
                    directions[param] = torch.zeros_like(param)
        return directions

    @staticmethod
    def _apply(branches: list[_Branch], coefficients: dict[int, Tensor], alpha: float) -> None:
        r"""Update in place: :math:`W \leftarrow W + \alpha C^\top A`, :math:`b \leftarrow b + \alpha C^\top 1`.

        One ``addmm_`` per branch; no direction tensor is materialized.
        """
        for index, coef in coefficients.items():
            branch = branches[index]
            proj = branch.module.proj
            proj.weight.addmm_(coef.T, branch.features, alpha=alpha)
            if proj.bias is not None:
                proj.bias.add_(coef.sum(0), alpha=alpha)

    def _lift(self, step: Tensor) -> Tensor:
        r"""Body-output target :math:`T = s\,U^{+}`, ``[N, d]``, so that :math:`T U = s`.

        :math:`U^{+} = U^\top` for orthonormal columns; the pseudo-inverse keeps the lift exact
        after a dtype cast has rounded :math:`U`. :math:`U` is a fixed buffer, so :math:`U^{+}`
        ``[k, d]`` is computed once and again only when the buffer changes (its storage, dtype,
        device or in-place version).
        """
        projection = self.model.projection
        key = (projection.data_ptr(), projection._version, projection.dtype, projection.device)
        if self._projection_pinv is None or self._projection_pinv[0] != key:
            self._projection_pinv = (key, torch.linalg.pinv(projection))
        return step @ self._projection_pinv[1]

    def _modules(self) -> Iterator[InvertedBottleneck]:
        for block in self.model.body.blocks:
            yield block.f
            yield block.g

    def _linearize(self, x: Tensor) -> tuple[list[_Branch], Tensor]:
        """Forward pass storing every branch's input, features and activation slope.

        Each block's own coupling (:meth:`curvlab.nn.reversible.ReversibleBlock.couple`) runs
        with branches that record their linearization (F before G, block by block).
        """
        branches: list[_Branch] = []

        def recorded(module: InvertedBottleneck) -> Callable[[Tensor], Tensor]:
            def branch(z: Tensor) -> Tensor:
                branches.append(self._branch(module, z))
                return branches[-1].output()

            return branch

        for block in self.model.body.blocks:
            x = block.couple(x, recorded(block.f), recorded(block.g))
        return branches, x

    @staticmethod
    def _branch(module: InvertedBottleneck, z: Tensor) -> _Branch:
        r"""The branch's pre-activation, features and slope :math:`\sigma'` at the input ``z``."""
        pre = module.pre_activation(z)
        slope = None
        if not isinstance(module.activation, nn.Identity):
            slope = first_derivative(module.activation, pre)
        features = module.activation(pre)
        return _Branch(module=module, features=features, slope=slope, inputs=z)

    def _gram_inverse(self, branches: list[_Branch], rtol: float) -> tuple[GramInverse, Tensor]:
        """Factorize every branch's Gram matrix at once; returns it and the ``[2L, N, N]`` Grams."""
        grams = torch.stack([branch.gram() for branch in branches])
        self._check_finite_gram(grams)
        features = None
        if self.solver == "svd":
            features = torch.stack([_with_ones(branch) for branch in branches])
        inverse = GramInverse(features, grams, self.solver, rtol, self.atol, self.damping)
        return inverse, grams

    def _check_finite_gram(self, gram: Tensor) -> None:
        """Raise on an overflowed Gram matrix, which would otherwise read as rank-deficient."""
        if not bool(torch.isfinite(gram).all()):
            raise FloatingPointError(
                f"ExactGN: the Gram matrices of the branch features are not finite: "
                f"{self._parameter_state()}"
            )

    def _block_coefficients(
        self, branches: list[_Branch], target: Tensor, rtol: float
    ) -> tuple[dict[int, Tensor], list[int]]:
        r"""Right-inverse / paper scheme: per-block solves along the inverse's tangent.

        The target is carried back as the tangent :math:`(t_1, t_2)` of every block's output
        (forward-mode through the exact inverse: :math:`\dot x_2 = t_2 - G'\,t_1`,
        :math:`\dot x_1 = t_1 - F'\,\dot x_2`). A used block with weight :math:`w` solves
        :math:`A_F \Delta W_F = w\,t_1` and
        :math:`A_G \Delta W_G = w\,t_2 - G'\,(A_F \Delta W_F)`. When :math:`A_F` has full row rank
        and no damping, :math:`A_F \Delta W_F = w\,t_1` exactly, so the second right-hand side is
        :math:`w\,\dot x_2`, already at hand: every right-hand side is known after the tangent
        sweep and all blocks are solved in one batched call. Other blocks (damped, or rank-deficient
        in the paper scheme) take the sequential path with the actual :math:`A_F \Delta W_F`.
        The sweep stops at the lowest block that is used.
        """
        num_blocks = len(branches) // 2
        inverse, grams = self._gram_inverse(branches, rtol)
        rank = inverse.full_rank.tolist()
        full_rank = [rank[2 * b] and rank[2 * b + 1] for b in range(num_blocks)]
        if self.scheme == "paper" or self.solver == "damped":
            used = list(range(num_blocks))
        else:
            used = [b for b in range(num_blocks) if full_rank[b]]
            if not used:
                raise NoExactRightInverseError(self._no_right_inverse_message(branches))
        weight = 1.0 / len(used)
        exact_f = [rank[2 * b] and self.damping == 0 for b in range(num_blocks)]
        batched_rhs: list[Tensor] = []
        batched_index: list[int] = []
        sequential: list[tuple[int, Tensor, Tensor]] = []
        tangent = target
        for b in reversed(range(used[0], num_blocks)):
            branch_f, branch_g = branches[2 * b], branches[2 * b + 1]
            t1, t2 = tangent.chunk(2, dim=-1)
            dx2 = t2 - branch_g.output_jvp(t1)
            if b in used:
                if exact_f[b]:
                    batched_rhs += [weight * t1, weight * dx2]
                    batched_index += [2 * b, 2 * b + 1]
                else:
                    sequential.append((b, t1, t2))
            if b > used[0]:
                dx1 = t1 - branch_f.output_jvp(dx2)
                tangent = torch.cat([dx1, dx2], dim=-1)
        coefficients: dict[int, Tensor] = {}
        if batched_rhs:
            solved = inverse.solve(torch.stack(batched_rhs), batched_index)
            coefficients.update(zip(batched_index, solved.unbind(0)))
        for b, t1, t2 in sequential:
            coef_f = inverse.coefficients(2 * b, weight * t1)
            moved_y1 = grams[2 * b] @ coef_f
            rhs_g = weight * t2 - branches[2 * b + 1].output_jvp(moved_y1)
            coefficients[2 * b] = coef_f
            coefficients[2 * b + 1] = inverse.coefficients(2 * b + 1, rhs_g)
        return coefficients, used

    def _output_wrt_branches(self, branches: list[_Branch]) -> list[Tensor]:
        r""":math:`\Gamma_j = \partial f / \partial o_j` for every branch, each ``[N, k, m]``.

        One backward sweep with the ``k`` cotangents :math:`U^\top` (rows of the output map)
        through the stored linearization: with cotangents :math:`(c_1, c_2)` of a block's outputs,
        :math:`\Gamma_G = c_2`, :math:`\Gamma_F = c_1 + G'^\top c_2`, and the block's inputs get
        :math:`(\Gamma_F,\; c_2 + F'^\top \Gamma_F)`. The first branch's input needs no
        cotangent. The cotangent is the same for every sample until the first branch is crossed,
        so it starts with a sample axis of size 1.
        """
        num_blocks = len(branches) // 2
        n = branches[0].features.shape[0]
        cotangent = self.model.projection.T[:, None, :]  # [k, 1, d]
        c1, c2 = cotangent.chunk(2, dim=-1)
        gammas: list[Tensor] = [cotangent] * len(branches)
        for b in reversed(range(num_blocks)):
            branch_f, branch_g = branches[2 * b], branches[2 * b + 1]
            gammas[2 * b + 1] = c2
            c1 = c1 + branch_g.input_vjp(c2)
            gammas[2 * b] = c1
            if b > 0:
                c2 = c2 + branch_f.input_vjp(c1)
        return [g.expand(g.shape[0], n, g.shape[-1]).transpose(0, 1).contiguous() for g in gammas]

    def _structured_ntk(self, branches: list[_Branch], gammas: list[Tensor]) -> Tensor:
        r"""Lower block triangle of :math:`\Theta = \sum_j (A_j A_j^\top) \odot (\Gamma_j \Gamma_j^\top)`.

        ``[N k, N k]`` with rows ordered (sample, output). Only the tiles on and below the
        diagonal are computed (:class:`GramInverse` reads the lower triangle), which saves close to
        half of the :math:`2 N^2 k^2 m` flops per branch.
        """
        n, k, m = gammas[0].shape
        flats = [g.view(n * k, m) for g in gammas]  # rows (n, c)
        grams = [branch.gram() for branch in branches]
        ntk = flats[0].new_zeros(n * k, n * k)
        tile = max(1, -(-n // 8))
        for start in range(0, n, tile):
            stop = min(n, start + tile)
            rows = ntk[start * k : stop * k, : stop * k].view(stop - start, k, stop, k)
            for flat, gram in zip(flats, grams):
                product = flat[start * k : stop * k] @ flat[: stop * k].T
                product = product.view(stop - start, k, stop, k)
                rows.addcmul_(product, gram[start:stop, None, :stop, None])
        return ntk

    def _pinv_coefficients(
        self, branches: list[_Branch], step: Tensor, rtol: float
    ) -> tuple[dict[int, Tensor], list[int]]:
        r"""Moore-Penrose step :math:`J^\top \Theta^{+} s` through the structured ``[N k, N k]`` NTK."""
        gammas = self._output_wrt_branches(branches)
        ntk = self._structured_ntk(branches, gammas)
        self._check_finite_gram(ntk)
        n, k = step.shape
        solver = "eigh" if self.solver == "svd" else self.solver
        inverse = GramInverse(None, ntk[None], solver, rtol, self.atol, self.damping)
        dual = inverse.coefficients(0, step.reshape(n * k, 1)).reshape(n, k)
        coefficients = {
            j: torch.einsum("nc,ncm->nm", dual, gamma) for j, gamma in enumerate(gammas)
        }
        return coefficients, list(range(len(branches) // 2))

    def _relative_residual(
        self, x: Tensor, directions: dict[Tensor, Tensor], step: Tensor
    ) -> float:
        r""":math:`\|J D - s\| / \|s\|` (CE: constant-per-sample parts removed)."""
        names = {p: n for n, p in self.model.named_parameters()}
        params = {names[p]: p.detach() for p in directions}
        tangents = {names[p]: d for p, d in directions.items()}
        buffers = dict(self.model.named_buffers())

        def f(theta: dict[str, Tensor]) -> Tensor:
            return functional_call(self.model, {**theta, **buffers}, (x,))

        moved = jvp(f, (params,), (tangents,))[1]
        if self.loss == "ce":
            moved = moved - moved.mean(dim=-1, keepdim=True)
            step = step - step.mean(dim=-1, keepdim=True)
        return float((moved - step).norm() / step.norm().clamp_min(torch.finfo(step.dtype).tiny))

    def _no_right_inverse_message(self, branches: list[_Branch]) -> str:
        r"""Why no block is full rank: too narrow for :math:`N`, or numerically degenerate features.

        The first block's features are linear in the raw input (rank :math:`\le d/2 + 1`); the
        others have rank :math:`\le h + 1`. When some block is wide enough and still fails the
        rank test, the width is not the cause: duplicated samples or features blown up by a
        diverged step are.
        """
        n = branches[0].features.shape[0]
        widths = sorted({b.features.shape[1] + b.has_bias for b in branches})
        first_rank = min(branches[0].features.shape[1], self.model.in_features // 2)
        first_rank += branches[0].has_bias
        ranks = [first_rank] + [b.features.shape[1] + b.has_bias for b in branches[2::2]]
        options = (
            "Use solver='damped' with damping > 0 for a least-squares step, scheme='pinv' for "
            "the Moore-Penrose step"
        )
        if max(ranks) >= n:
            largest = max(float(b.features.abs().max()) for b in branches)
            return (
                f"ExactGN(scheme={self.scheme!r}): no reversible block has numerically "
                f"full-row-rank features for this batch of N={n} samples, although the blocks are "
                f"wide enough (feature widths {widths} >= N), so the features are degenerate: "
                f"the batch may repeat samples (identical samples give identical feature rows), "
                f"or the parameters have blown up (largest |feature| {largest:.3g}; a step that "
                f"diverged with max_loss_ratio=None is not undone: restore the parameters). "
                f"{options}."
            )
        return (
            f"ExactGN(scheme={self.scheme!r}): no reversible block has full-row-rank features for "
            f"this batch of N={n} samples (feature widths {widths}, the first block's linear "
            f"features have rank <= {first_rank}), so no exact right inverse exists (it needs "
            f"hidden >= N). {options}, or a smaller batch / wider network."
        )
