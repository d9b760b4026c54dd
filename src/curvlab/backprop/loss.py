r"""Loss functions as the engine sees them: per-sample scaling and Hessian square roots.

For the batch loss :math:`L = r \sum_n \ell_n` (:math:`r = 1/N` for ``mean``, ``1`` for ``sum``)
this module provides, for the supported ``torch.nn`` losses, a factor :math:`S_n` with
:math:`\sum_m S_{mn} S_{mn}^\top = \nabla_f^2 \ell_n` (exact) or its MC estimate
:math:`\frac{1}{k}\sum_i s_{ni} s_{ni}^\top` with labels sampled from the model's predictive
distribution. Factors are returned as ``[M, N, *out]`` tensors: column ``m`` for every sample.

Per-sample losses (torch's ``mean`` divides by every element, so :math:`\ell_n` keeps the
per-sample part of that divisor):

* ``MSELoss`` on ``[N, *D]``: :math:`\ell_n = c \lVert f_n - y_n\rVert^2`,
  :math:`H_n = 2c I`, with :math:`c = 1/D` (mean) or ``1`` (sum), ``D = prod(*D)``.
* ``CrossEntropyLoss`` on ``[N, C]`` or ``[N, C, *T]`` (class indices or probabilities, label
  smoothing allowed): :math:`\ell_n = c \sum_t \mathrm{CE}(f_{n,:,t}, y_{n,t})` with
  :math:`c = 1/T` (mean) or ``1``; :math:`H_n = c \,\mathrm{blockdiag}_t(\mathrm{diag}(p_t) -
  p_t p_t^\top)`, :math:`p_t = \mathrm{softmax}(f_{n,:,t})`.
* ``BCEWithLogitsLoss`` on ``[N, *D]``: :math:`H_n = c\,\mathrm{diag}(\sigma(f_n)(1-\sigma(f_n)))`.

Every loss's math lives here, once: the batch loss (:meth:`LossSpec.value`), the gradients
w.r.t. the output (:meth:`LossSpec.output_gradient` of the batch loss,
:meth:`LossSpec.per_sample_gradient` of :math:`\ell_n`), the per-sample Hessian
(:meth:`LossSpec.hessian_terms` in the structured form :math:`c\,(\mathrm{diag}(d_n) - u_n
u_n^\top)`, :meth:`LossSpec.hessian` dense) and its square roots. The optimizers
(:mod:`curvlab.optim.function_space`) and the experiment runner name losses ``"mse"``, ``"ce"``
and ``"bce"`` (:data:`LOSS_NAMES`, :meth:`LossSpec.from_name`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.backprop.errors import UnsupportedLossError

SUPPORTED_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)

LOSS_NAMES: dict[str, type[nn.Module]] = {
    "mse": nn.MSELoss,
    "ce": nn.CrossEntropyLoss,
    "bce": nn.BCEWithLogitsLoss,
}
"""Short names of the supported losses (as the optimizers and the experiments' configs use them)."""


@dataclass(frozen=True)
class OutputHessian:
    r"""The per-sample loss Hessian w.r.t. the output, :math:`H_n = c\,(\mathrm{diag}(d_n) - u_n u_n^\top)`.

    For cross-entropy over ``[N, C, *T]`` the rank-one term couples the classes at each position
    only: :math:`H_n` is block-diagonal over the positions :math:`t`, each block
    :math:`c\,(\mathrm{diag}(p_t) - p_t p_t^\top)`. MSE and BCE Hessians are diagonal.

    Attributes:
        scale: :math:`c`, the per-sample share of torch's ``mean`` (1 for ``sum``).
        diagonal: :math:`d_n`, ``[N, *out]``: 2 (MSE), :math:`\sigma(f)(1 - \sigma(f))` (BCE),
            :math:`p = \operatorname{softmax}(f)` over the classes (cross-entropy).
        rank_one: :math:`u_n`, ``[N, *out]`` (cross-entropy: :math:`p`), or ``None``.
        log_diagonal: :math:`\log d_n`, ``[N, *out]``, computed without forming :math:`d_n`
            (finite where :math:`d_n` underflows to 0).
    """

    scale: float
    diagonal: Tensor
    rank_one: Tensor | None
    log_diagonal: Tensor


class LossSpec:
    """Second-order view of a supported loss module.

    Args:
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` with
            ``reduction`` ``"mean"`` or ``"sum"``.

    Raises:
        UnsupportedLossError: For other losses, ``reduction="none"``, class weights,
            ``pos_weight``.
    """

    def __init__(self, loss_func: nn.Module) -> None:
        if not isinstance(loss_func, SUPPORTED_LOSSES):
            names = ", ".join(c.__name__ for c in SUPPORTED_LOSSES)
            raise UnsupportedLossError(
                f"curvlab has no second-order rule for loss {type(loss_func).__name__}; "
                f"supported: {names}"
            )
        if loss_func.reduction not in ("mean", "sum"):
            raise UnsupportedLossError(
                f"{type(loss_func).__name__}(reduction={loss_func.reduction!r}): use 'mean' or "
                "'sum' (a per-sample loss vector has no batch loss to differentiate)"
            )
        if getattr(loss_func, "weight", None) is not None:
            raise UnsupportedLossError(f"{type(loss_func).__name__} with weight is not supported")
        if getattr(loss_func, "pos_weight", None) is not None:
            raise UnsupportedLossError("BCEWithLogitsLoss with pos_weight is not supported")
        self.loss_func = loss_func
        self.reduction: str = loss_func.reduction

    @classmethod
    def from_name(cls, name: str, reduction: str = "mean") -> LossSpec:
        """The spec of a loss by its short name in :data:`LOSS_NAMES` (``"mse"``, ``"ce"``, ``"bce"``).

        Raises:
            ValueError: For an unknown name.
        """
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}; choose one of {tuple(LOSS_NAMES)}")
        return cls(LOSS_NAMES[name](reduction=reduction))

    # ------------------------------------------------------------------ shapes and scaling
    def check(self, output: Tensor, target: Tensor) -> None:
        """Validate shapes of ``output`` ``[N, ...]`` and ``target``.

        Raises:
            UnsupportedLossError: On shapes the loss does not define per sample.
        """
        name = type(self.loss_func).__name__
        if output.dim() < 1:
            raise UnsupportedLossError(f"{name}: the model output needs a batch dimension")
        if isinstance(self.loss_func, nn.CrossEntropyLoss):
            if output.dim() < 2:
                raise UnsupportedLossError(
                    f"CrossEntropyLoss: output must be [N, C] or [N, C, *T], got "
                    f"{list(output.shape)} (unbatched input)"
                )
            if target.is_floating_point():
                if target.shape != output.shape:
                    raise UnsupportedLossError(
                        "CrossEntropyLoss: probability targets must have the output's shape "
                        f"{list(output.shape)}, got {list(target.shape)}"
                    )
            else:
                expected = (output.shape[0], *output.shape[2:])
                if tuple(target.shape) != expected:
                    raise UnsupportedLossError(
                        f"CrossEntropyLoss: class targets must be {list(expected)}, got "
                        f"{list(target.shape)}"
                    )
                classes = output.shape[1]
                outside = (target < 0) | (target >= classes)
                outside &= target != self.loss_func.ignore_index
                if outside.any():
                    first = int(outside.reshape(outside.shape[0], -1).any(1).nonzero()[0])
                    raise UnsupportedLossError(
                        f"CrossEntropyLoss: class targets must lie in [0, {classes - 1}] for "
                        f"an output of {classes} classes; got {sorted(set(target[outside].tolist()))[:5]} "
                        f"(first at sample {first})"
                    )
                if (target == self.loss_func.ignore_index).any():
                    raise UnsupportedLossError(
                        "CrossEntropyLoss: targets equal to ignore_index "
                        f"({self.loss_func.ignore_index}) are not supported"
                    )
        elif target.shape != output.shape:
            raise UnsupportedLossError(
                f"{name}: target shape {list(target.shape)} differs from output shape "
                f"{list(output.shape)}"
            )

    def batch_factor(self, batch_size: int) -> float:
        r"""The factor :math:`r` in :math:`L = r \sum_n \ell_n`: ``1/N`` (mean) or ``1`` (sum)."""
        return 1.0 / batch_size if self.reduction == "mean" else 1.0

    def _per_sample_scale(self, output: Tensor) -> float:
        """The factor ``c`` of the module docstring (per-sample share of torch's mean)."""
        if self.reduction == "sum":
            return 1.0
        if isinstance(self.loss_func, nn.CrossEntropyLoss):
            return 1.0 / math.prod(output.shape[2:])
        return 1.0 / math.prod(output.shape[1:])

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        r"""The per-sample losses :math:`\ell_n`, ``[N]`` (so that ``L = r * sum``)."""
        per_element = type(self.loss_func)(
            reduction="none",
            **(
                {"label_smoothing": self.loss_func.label_smoothing}
                if isinstance(self.loss_func, nn.CrossEntropyLoss)
                else {}
            ),
        )(output, target)
        per_sample = per_element.reshape(per_element.shape[0], -1).sum(1)
        return per_sample * self._per_sample_scale(output)

    def output_gradient(self, output: Tensor, target: Tensor) -> Tensor:
        r""":math:`\partial L / \partial f` of the batch loss, ``[N, *out]`` (on a detached copy)."""
        with torch.enable_grad():
            f = output.detach().requires_grad_(True)
            # forward(), not __call__: no hooks (a capture hooks the loss function)
            (grad,) = torch.autograd.grad(self.loss_func.forward(f, target), f)
        return grad

    def value(self, output: Tensor, target: Tensor) -> Tensor:
        r"""The batch loss :math:`L = r \sum_n \ell_n` as the loss module computes it (a scalar).

        Differentiable in ``output``; the module's ``forward`` runs without its hooks.
        """
        return self.loss_func.forward(output, target)

    def per_sample_gradient(self, output: Tensor, target: Tensor) -> Tensor:
        r""":math:`\partial \ell_n / \partial f_n` in closed form, ``[N, *out]``.

        MSE :math:`2c\,(f_n - y_n)`, BCE :math:`c\,(\sigma(f_n) - y_n)`, cross-entropy
        :math:`c\,(p_n - q_n)` with :math:`q_n` the target distribution (one-hot labels or the
        given probabilities, label smoothing applied). :math:`r` times it is
        :meth:`output_gradient`.
        """
        output = output.detach()
        scale = self._per_sample_scale(output)
        if isinstance(self.loss_func, nn.MSELoss):
            return 2.0 * scale * (output - target)
        if isinstance(self.loss_func, nn.BCEWithLogitsLoss):
            return scale * (torch.sigmoid(output) - target)
        return scale * (output.softmax(dim=1) - self._target_distribution(output, target))

    def _target_distribution(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy targets as probabilities ``[N, C, *T]`` (label smoothing applied)."""
        classes = output.shape[1]
        if target.is_floating_point():
            distribution = target.to(output.dtype)
        else:
            distribution = F.one_hot(target.long(), classes).movedim(-1, 1).to(output.dtype)
        smoothing = self.loss_func.label_smoothing
        if smoothing:
            distribution = (1.0 - smoothing) * distribution + smoothing / classes
        return distribution

    # ------------------------------------------------------------------ Hessians
    def hessian_terms(self, output: Tensor) -> OutputHessian:
        r"""The per-sample Hessian :math:`H_n = c\,(\mathrm{diag}(d_n) - u_n u_n^\top)` in factored form.

        Args:
            output: Model output ``[N, *out]``.

        Returns:
            The :class:`OutputHessian`; it does not depend on the targets.
        """
        output = output.detach()
        scale = self._per_sample_scale(output)
        if isinstance(self.loss_func, nn.MSELoss):
            two = torch.full_like(output, 2.0)
            return OutputHessian(scale, two, None, torch.full_like(output, math.log(2.0)))
        if isinstance(self.loss_func, nn.BCEWithLogitsLoss):
            prob = torch.sigmoid(output)
            log_diagonal = -F.softplus(output) - F.softplus(-output)
            return OutputHessian(scale, prob * (1.0 - prob), None, log_diagonal)
        prob = output.softmax(dim=1)
        return OutputHessian(scale, prob, prob, output.log_softmax(dim=1))

    def hessian(self, output: Tensor, target: Tensor) -> Tensor:
        r"""The dense per-sample Hessian :math:`\nabla_{f_n}^2 \ell_n`, ``[N, *out, *out]``.

        Args:
            output: Model output ``[N, *out]``.
            target: Targets (the Hessians of the supported losses do not depend on them).

        Returns:
            ``H`` with ``H[n]`` the Hessian of :math:`\ell_n` w.r.t. ``output[n]``.
        """
        terms = self.hessian_terms(output)
        n, d = output.shape[0], math.prod(output.shape[1:])
        dense = torch.diag_embed(terms.diagonal.reshape(n, d))
        if terms.rank_one is not None:  # cross-entropy: classes coupled per position
            u = terms.rank_one.reshape(n, d)
            position = torch.arange(d, device=output.device) % math.prod(output.shape[2:])
            same = position[:, None] == position[None, :]
            dense = dense - u[:, :, None] * u[:, None, :] * same
        return (terms.scale * dense).reshape(n, *output.shape[1:], *output.shape[1:])

    # ------------------------------------------------------------------ Hessian square roots
    def sqrt_hessian(self, output: Tensor, target: Tensor) -> Tensor:
        r"""Exact symmetric factor of :math:`\nabla_f^2 \ell_n` for every sample.

        Args:
            output: Model output ``[N, *out]``.
            target: Targets (see the module docstring).

        Returns:
            ``S`` of shape ``[M, N, *out]`` with :math:`\sum_m S_{mn} S_{mn}^\top = H_n`;
            ``M = prod(out)`` for MSE / BCE, ``C * prod(T)`` for cross-entropy.
        """
        output = output.detach()
        scale = self._per_sample_scale(output)
        if isinstance(self.loss_func, nn.CrossEntropyLoss):
            return self._sqrt_hessian_ce(output, scale)
        n, d = output.shape[0], math.prod(output.shape[1:])
        if isinstance(self.loss_func, nn.MSELoss):
            diag = torch.full((n, d), math.sqrt(2.0 * scale), dtype=output.dtype)
        else:  # BCEWithLogits
            prob = torch.sigmoid(output).reshape(n, d)
            diag = (scale * prob * (1.0 - prob)).sqrt()
        eye = torch.eye(d, dtype=output.dtype, device=output.device)
        factor = eye[:, None, :] * diag.to(output.device)[None, :, :]  # [D, N, D]
        return factor.reshape(d, *output.shape)

    def _sqrt_hessian_ce(self, output: Tensor, scale: float) -> Tensor:
        n, c = output.shape[:2]
        spatial = output.shape[2:]
        t = math.prod(spatial)
        prob = output.reshape(n, c, t).softmax(dim=1)  # [N, C, T]
        sqrt_prob = prob.sqrt()
        # block t' of column (c', t'):  sqrt(p_c') e_c' - p sqrt(p_c')   (block-diagonal over t)
        eye_c = torch.eye(c, dtype=output.dtype, device=output.device)
        block = sqrt_prob.permute(1, 0, 2)[:, :, None, :] * (
            eye_c[:, None, :, None] - prob[None, :, :, :]
        )  # [C', N, C, T]
        block = block * math.sqrt(scale)
        if t == 1:
            return block.reshape(c, *output.shape)
        eye_t = torch.eye(t, dtype=output.dtype, device=output.device)
        full = block[:, None, :, :, :] * eye_t[None, :, None, None, :]  # [C', T', N, C, T]
        return full.reshape(c * t, *output.shape)

    def sampled_sqrt_hessian(
        self, output: Tensor, mc_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""MC factor :math:`S_{in} = s_{ni}/\sqrt{k}` from sampled labels.

        Args:
            output: Model output ``[N, *out]``.
            mc_samples: Number ``k`` of samples per input.
            generator: Optional random number generator.

        Returns:
            ``[k, N, *out]`` with :math:`\mathbb{E}[\sum_i S_{in} S_{in}^\top] = H_n`.
        """
        output = output.detach()
        k = mc_samples
        scale = self._per_sample_scale(output)
        shape = (k, *output.shape)
        if isinstance(self.loss_func, nn.MSELoss):
            noise = torch.randn(
                shape, dtype=output.dtype, device=output.device, generator=generator
            )
            return noise * math.sqrt(2.0 * scale / k)
        if isinstance(self.loss_func, nn.BCEWithLogitsLoss):
            prob = torch.sigmoid(output).expand(shape)
            label = torch.bernoulli(prob, generator=generator)
            return (prob - label) * math.sqrt(scale / k)
        n, c = output.shape[:2]
        prob = output.movedim(1, -1).softmax(dim=-1)  # [N, *T, C]
        flat = prob.reshape(-1, c)
        labels = torch.multinomial(flat, k, replacement=True, generator=generator)  # [N*T, k]
        onehot = torch.nn.functional.one_hot(labels.T, c).to(output.dtype)  # [k, N*T, C]
        diff = (flat[None] - onehot).reshape(k, *prob.shape)  # [k, N, *T, C]
        return diff.movedim(-1, 2) * math.sqrt(scale / k)
