"""The dense references themselves: the Hessian is symmetric and agrees with finite differences."""

from __future__ import annotations

import torch

from tests import reference
from tests.backprop.problems import PROBLEMS, build


def test_full_hessian_through_layer_norm_is_symmetric_and_matches_finite_differences():
    model, loss_func, x, y = build(
        next(p for p in PROBLEMS if p.name == "layernorm-mlp"), "mse-mean"
    )
    h = reference.full_hessian(model, loss_func, x, y)
    torch.testing.assert_close(h, h.T, rtol=1e-10, atol=1e-12)
    theta = reference.flatten(reference.trainable_params(model))
    like = reference.trainable_params(model)

    def gradient(t: torch.Tensor) -> torch.Tensor:
        def loss(p: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(model, reference.unflatten(p, like), (x,))
            return loss_func(out, y)

        return torch.func.grad(loss)(t)

    v = torch.randn(theta.shape, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    eps = 1e-5
    finite = (gradient(theta + eps * v) - gradient(theta - eps * v)) / (2 * eps)
    torch.testing.assert_close(h @ v, finite, rtol=1e-5, atol=1e-6)  # the bug was off by 0.1-1
