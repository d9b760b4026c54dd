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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvlab.backprop.errors import UnsupportedLossError

SUPPORTED_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


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
