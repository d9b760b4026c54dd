r"""The Hessian of the loss over the data, :math:`\nabla^2_\theta L`, as an operator."""

from __future__ import annotations

from torch import nn
from torch.func import grad, vjp, vmap

from curvlab.linops.empirical_risk import Data, ModelOperator, Params


class Hessian(ModelOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of :math:`L = r \sum_{n=1}^N \ell_n` over the data.

    Each batch contributes the Hessian of its own loss times :math:`r / r_b`; the product with
    ``K`` columns is one reverse-over-reverse pass per batch (``vmap`` over the columns of
    the VJP of the gradient). Symmetric; scales like the loss.

    Args:
        model: Any module (twice differentiable).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        params: The parameters (``None``: all trainable ones).
        data: Re-iterable ``(inputs, targets)`` batches.
        check_deterministic: Check at construction that two passes over the data agree.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        params: Params,
        data: Data,
        check_deterministic: bool = True,
    ) -> None:
        super().__init__(model, loss_func, params, data, check_deterministic)

    def _batch_matmat(self, index, inputs, targets, columns):
        weight = self.batch_weight(targets.shape[0])

        def loss(p):
            return self.spec.value(self.model_output(p, inputs), targets)

        # reverse over reverse: forward-mode AD through torch's MSE backward fails on the
        # targets' zero tangent; the Hessian is symmetric, so the VJP of the gradient is Hv
        _, hvp = vjp(grad(loss), self.params)
        product = vmap(hvp, randomness="same")(columns)[0]
        return {k: weight * v for k, v in product.items()}
