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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from curvlab.nn.reversible import InvertedBottleneck, RevMLP
from curvlab.optim.function_space import LOSSES, as_targets, loss_value, newton_step
from curvlab.optim.gram import SOLVERS, GramInverse, default_rtol

SCHEMES = ("right-inverse", "pinv", "paper")


class NoExactRightInverseError(ValueError):
    """Raised when no block of the network can carry an exact share of the GN step."""


@dataclass
class _Branch:
    """Linearization of one branch at the current batch."""

    module: InvertedBottleneck
    features: Tensor  # [N, h'] (a ones column appended when the branch has a bias)
    pre: Tensor  # [N, h] pre-activation
    inputs: Tensor  # [N, m] branch input

    def output_jvp(self, tangent: Tensor) -> Tensor:
        """Tangent of the branch output for input tangents ``[N, m]`` or ``[B, N, m]``."""
        module = self.module
        if not isinstance(module.norm, nn.Identity):

            def norm_jvp(t: Tensor) -> Tensor:
                return jvp(module.norm, (self.inputs,), (t,))[1]

            tangent = norm_jvp(tangent) if tangent.ndim == 2 else vmap(norm_jvp)(tangent)
        pre_tangent = tangent if module.expansion is None else tangent @ module.expansion
        slope = _activation_slope(module.activation, self.pre)
        return (slope * pre_tangent) @ module.proj.weight.T


@dataclass
class StepInfo:
    """What one :meth:`ExactGN.step` did."""

    loss_before: float
    blocks_used: list[int] = field(default_factory=list)
    residual: float | None = None


def _activation_slope(activation: nn.Module, pre: Tensor) -> Tensor:
    """Elementwise derivative of ``activation`` at ``pre``."""
    if isinstance(activation, nn.Identity):
        return torch.ones((), dtype=pre.dtype, device=pre.device)
    if isinstance(activation, nn.ReLU):
        return (pre > 0).to(pre.dtype)
    return jvp(activation, (pre,), (torch.ones_like(pre),))[1]


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
        normalize: Divide the ``"paper"`` scheme's sum of block solutions by :math:`L` (and drop
            the authors' factor 2 for MSE); ``False`` reproduces their raw step.
        track_residual: After each step, measure
            :math:`\|J\Delta\theta + \alpha s\| / \|\alpha s\|` with a Jacobian-vector product (one
            extra forward pass) and store it in :attr:`last_info`.

    ``step(inputs, targets)`` returns the batch loss before the step.
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
        normalize: bool = True,
        track_residual: bool = False,
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
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__([p for p in model.parameters() if p.requires_grad], {"lr": lr})
        self.model = model
        self.loss = loss
        self.scheme = scheme
        self.solver = solver
        self.rtol = rtol
        self.atol = atol
        self.damping = damping
        self.identity_hessian = identity_hessian
        self.normalize = normalize
        self.track_residual = track_residual
        self.last_info: StepInfo | None = None

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor) -> float:  # type: ignore[override]
        """Perform one Gauss-Newton update on the batch and return the loss before it."""
        lrs = {group["lr"] for group in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(
                f"ExactGN needs one learning rate for all parameters, got {sorted(lrs)}"
            )
        lr = lrs.pop()
        model = self.model
        x = model.flatten_input(inputs)
        branches, body_out = self._linearize(x)
        outputs = body_out @ model.projection
        target_values = as_targets(targets, model.num_classes, self.loss, outputs)
        loss_before = float(loss_value(outputs, target_values, self.loss))
        if not math.isfinite(loss_before):
            raise FloatingPointError(f"ExactGN: the loss before the step is {loss_before}")
        step = newton_step(outputs, target_values, self.loss, self.identity_hessian)
        rtol = default_rtol(x.dtype) if self.rtol is None else self.rtol
        if self.scheme == "pinv":
            directions, used = self._pinv_directions(x, branches, step, rtol)
        else:
            directions, used = self._block_directions(branches, self._lift(step), rtol)
        if self.scheme == "paper" and not self.normalize:
            factor = len(model.body.blocks) * (2.0 if self.loss == "mse" else 1.0)
            directions = {p: d * factor for p, d in directions.items()}
        info = StepInfo(loss_before=loss_before, blocks_used=used)
        if self.track_residual:
            info.residual = self._relative_residual(x, directions, step)
        for param, direction in directions.items():
            param.add_(direction, alpha=-lr)
        self.last_info = info
        return loss_before

    def directions(self, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The update direction ``D`` (``Δθ = -lr·D``) by parameter name, without stepping."""
        with torch.no_grad():
            x = self.model.flatten_input(inputs)
            branches, body_out = self._linearize(x)
            outputs = body_out @ self.model.projection
            y = as_targets(targets, self.model.num_classes, self.loss, outputs)
            step = newton_step(outputs, y, self.loss, self.identity_hessian)
            rtol = default_rtol(x.dtype) if self.rtol is None else self.rtol
            if self.scheme == "pinv":
                found, _ = self._pinv_directions(x, branches, step, rtol)
            else:
                found, _ = self._block_directions(branches, self._lift(step), rtol)
        names = {p: n for n, p in self.model.named_parameters()}
        return {names[p]: d for p, d in found.items()}

    # ------------------------------------------------------------------ internals
    def _lift(self, step: Tensor) -> Tensor:
        r"""Body-output target :math:`T = s\,U^{+}`, ``[N, d]``, so that :math:`T U = s`.

        :math:`U^{+} = U^\top` for orthonormal columns; the pseudo-inverse keeps the lift exact
        after a dtype cast has rounded :math:`U`.
        """
        return step @ torch.linalg.pinv(self.model.projection)

    def _modules(self) -> Iterator[InvertedBottleneck]:
        for block in self.model.body.blocks:
            yield block.f
            yield block.g

    def _linearize(self, x: Tensor) -> tuple[list[_Branch], Tensor]:
        """Forward pass storing every branch's input, pre-activation and features."""
        branches = []
        for block in self.model.body.blocks:
            x1, x2 = x.chunk(2, dim=-1)
            branch_f = self._branch(block.f, x2)
            y1 = x1 + branch_f.module.proj(branch_f.module.activation(branch_f.pre))
            branch_g = self._branch(block.g, y1)
            y2 = x2 + branch_g.module.proj(branch_g.module.activation(branch_g.pre))
            branches += [branch_f, branch_g]
            x = torch.cat([y1, y2], dim=-1)
        return branches, x

    @staticmethod
    def _branch(module: InvertedBottleneck, z: Tensor) -> _Branch:
        pre = module.norm(z)
        if module.expansion is not None:
            pre = pre @ module.expansion
        features = module.activation(pre)
        if module.proj.bias is not None:
            features = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)
        return _Branch(module=module, features=features, pre=pre, inputs=z)

    def _gram_inverse(self, branches: list[_Branch], rtol: float) -> tuple[GramInverse, Tensor]:
        """Factorize every branch's Gram matrix ``A A^T`` at once; returns it and ``[2L, N, N]``."""
        features = torch.stack([b.features for b in branches])
        grams = features @ features.transpose(1, 2)
        svd_features = features if self.solver == "svd" else None
        inverse = GramInverse(svd_features, grams, self.solver, rtol, self.atol, self.damping)
        return inverse, grams

    def _block_directions(
        self, branches: list[_Branch], target: Tensor, rtol: float
    ) -> tuple[dict[Tensor, Tensor], list[int]]:
        """Right-inverse / paper scheme: per-block solves along the inverse's tangent."""
        num_blocks = len(branches) // 2
        inverse, grams = self._gram_inverse(branches, rtol)
        full_rank = inverse.full_rank.reshape(num_blocks, 2).all(dim=1).tolist()
        if self.scheme == "paper" or self.solver == "damped":
            used = list(range(num_blocks))
        else:
            used = [b for b in range(num_blocks) if full_rank[b]]
            if not used:
                raise NoExactRightInverseError(self._no_right_inverse_message(branches))
        weight = 1.0 / len(used)
        directions: dict[Tensor, Tensor] = {}
        tangent = target
        for b in reversed(range(num_blocks)):
            branch_f, branch_g = branches[2 * b], branches[2 * b + 1]
            t1, t2 = tangent.chunk(2, dim=-1)
            if b in used:
                coef_f = inverse.coefficients(2 * b, weight * t1)
                moved_y1 = grams[2 * b] @ coef_f
                g_tangents = branch_g.output_jvp(torch.stack([t1, moved_y1]))
                coef_g = inverse.coefficients(2 * b + 1, weight * t2 - g_tangents[1])
                self._store(directions, branch_f, coef_f)
                self._store(directions, branch_g, coef_g)
                g_t1 = g_tangents[0]
            else:
                g_t1 = branch_g.output_jvp(t1)
            # Tangent of the exact inverse: x2 = y2 - G(y1), x1 = y1 - F(x2).
            dx2 = t2 - g_t1
            dx1 = t1 - branch_f.output_jvp(dx2)
            tangent = torch.cat([dx1, dx2], dim=-1)
        for module in self._modules():
            for param in module.proj.parameters():
                directions.setdefault(param, torch.zeros_like(param))
        return directions, used

    @staticmethod
    def _store(directions: dict[Tensor, Tensor], branch: _Branch, coefficients: Tensor) -> None:
        """``ΔW = A^T C`` in the layout of ``proj.weight`` ``[m, h]`` and ``proj.bias`` ``[m]``."""
        delta = branch.features.T @ coefficients  # [h', m]
        proj = branch.module.proj
        h = proj.weight.shape[1]
        directions[proj.weight] = delta[:h].T
        if proj.bias is not None:
            directions[proj.bias] = delta[h]

    def _output_wrt_branches(self, x: Tensor) -> list[Tensor]:
        r""":math:`\Gamma_j = \partial f / \partial o_j` for every branch, each ``[N, k, m]``."""
        k = self.model.num_classes
        with torch.enable_grad():
            # Zero probes added to every branch output: d f / d probe_j = d f / d o_j, the total
            # derivative through everything downstream (including later branches).
            probes = []
            z = x
            for block in self.model.body.blocks:
                x1, x2 = z.chunk(2, dim=-1)
                probe_f = x.new_zeros(x2.shape).requires_grad_()
                y1 = x1 + block.f(x2) + probe_f
                probe_g = x.new_zeros(x2.shape).requires_grad_()
                y2 = x2 + block.g(y1) + probe_g
                probes += [probe_f, probe_g]
                z = torch.cat([y1, y2], dim=-1)
            f = z @ self.model.projection
            eye = torch.eye(k, dtype=x.dtype, device=x.device)
            seeds = eye[:, None, :].expand(k, x.shape[0], k)
            grads = torch.autograd.grad(f, probes, grad_outputs=seeds, is_grads_batched=True)
        return [g.permute(1, 0, 2) for g in grads]

    def _pinv_directions(
        self, x: Tensor, branches: list[_Branch], step: Tensor, rtol: float
    ) -> tuple[dict[Tensor, Tensor], list[int]]:
        """Moore-Penrose step through the structured ``[N k, N k]`` NTK."""
        jacobians = self._output_wrt_branches(x)
        n, k = step.shape
        ntk = step.new_zeros(n * k, n * k)
        for branch, gamma in zip(branches, jacobians):
            gram = branch.features @ branch.features.T  # [N, N]
            flat = gamma.reshape(n * k, -1)
            out_gram = (flat @ flat.T).reshape(n, k, n, k)
            ntk += (gram[:, None, :, None] * out_gram).reshape(n * k, n * k)
        solver = "eigh" if self.solver == "svd" else self.solver
        inverse = GramInverse(None, ntk[None], solver, rtol, self.atol, self.damping)
        dual = inverse.coefficients(0, step.reshape(n * k, 1)).reshape(n, k)
        directions: dict[Tensor, Tensor] = {}
        for branch, gamma in zip(branches, jacobians):
            self._store(directions, branch, torch.einsum("nc,ncm->nm", dual, gamma))
        return directions, list(range(len(branches) // 2))

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
        n = branches[0].features.shape[0]
        widths = sorted({b.features.shape[1] for b in branches})
        return (
            f"ExactGN(scheme={self.scheme!r}): no reversible block has full-row-rank features for "
            f"this batch of N={n} samples (feature widths {widths}, the first block's linear "
            f"features have rank <= {self.model.in_features // 2 + 1}), so no exact right inverse "
            f"exists (it needs hidden >= N). Use solver='damped' with damping > 0 for a least-squares "
            f"step, scheme='pinv' for the Moore-Penrose step, or a smaller batch / wider network."
        )
