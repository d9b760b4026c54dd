"""Dense float64 references that every curvature test compares against.

Everything here is built from :mod:`torch.func` / autograd on the *whole* flattened parameter
vector, with no structure exploited, so that it is independent of the code under test. Only use
it on small problems: the matrices are ``[N*C, P]`` and ``[P, P]``.

Parameter order: the order of ``model.named_parameters()`` (only those with ``requires_grad``),
each flattened row-major, concatenated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """Return the trainable parameters by name, detached copies, in ``named_parameters`` order."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def flatten(params: dict[str, Tensor]) -> Tensor:
    """Concatenate a parameter dict into one vector ``[P]``."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split a vector ``[P]`` into a dict shaped like ``like``."""
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vec[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _output_fn(model: nn.Module, inputs: Tensor) -> Callable[[Tensor], Tensor]:
    params = trainable_params(model)
    buffers = {k: b for k, b in model.named_buffers()}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

    def f(theta: Tensor) -> Tensor:
        return functional_call(model, {**unflatten(theta, params), **frozen, **buffers}, (inputs,))

    return f


def jacobian(model: nn.Module, inputs: Tensor) -> Tensor:
    """Full Jacobian of the flattened outputs w.r.t. the flattened parameters.

    Returns:
        ``[N*C, P]`` (row index ``n*C + c`` for output ``[N, C]``; any trailing output dims are
        flattened into ``C``).
    """
    theta = flatten(trainable_params(model))
    f = _output_fn(model, inputs)
    jac = jacrev(lambda t: f(t).reshape(-1))(theta)
    return jac


def loss_hessian_wrt_output(
    loss_func: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor
) -> Tensor:
    """Hessian of the (batch) loss w.r.t. the flattened outputs, ``[N*C, N*C]``."""
    shape = outputs.shape

    def ell(flat: Tensor) -> Tensor:
        return loss_func(flat.reshape(shape), targets)

    return hessian(ell)(outputs.detach().reshape(-1))


def ggn(model: nn.Module, loss_func, inputs: Tensor, targets: Tensor) -> Tensor:
    """Generalized Gauss-Newton ``J^T H J`` of the batch loss as the user wrote it, ``[P, P]``."""
    jac = jacobian(model, inputs)
    with torch.no_grad():
        out = model(inputs)
    h = loss_hessian_wrt_output(loss_func, out, targets)
    return jac.T @ h @ jac


def full_hessian(model: nn.Module, loss_func, inputs: Tensor, targets: Tensor) -> Tensor:
    """Hessian of the batch loss w.r.t. the flattened parameters, ``[P, P]``."""
    theta = flatten(trainable_params(model))
    f = _output_fn(model, inputs)
    return hessian(lambda t: loss_func(f(t), targets))(theta)


def gradient(model: nn.Module, loss_func, inputs: Tensor, targets: Tensor) -> Tensor:
    """Gradient of the batch loss w.r.t. the flattened parameters, ``[P]``."""
    theta = flatten(trainable_params(model))
    f = _output_fn(model, inputs)
    return torch.func.grad(lambda t: loss_func(f(t), targets))(theta)


# ----------------------------------------------------------------------------------------------
# Per-sample references (tests/backprop). The per-sample loss is ``loss_func`` on one sample:
# for reduction "mean" or "sum" this is the l_n of MISSION.md's convention, L = r * sum_n l_n.
# ----------------------------------------------------------------------------------------------
def per_sample_gradients(model: nn.Module, loss_func, inputs: Tensor, targets: Tensor) -> Tensor:
    """Gradients of the per-sample losses ``loss_func(f(x_n), y_n)``, ``[N, P]``."""
    theta = flatten(trainable_params(model))
    f = _output_fn(model, inputs)

    def losses(t: Tensor) -> Tensor:
        out = f(t)
        return torch.stack(
            [loss_func(out[n : n + 1], targets[n : n + 1]) for n in range(out.shape[0])]
        )

    return jacrev(losses)(theta)


def per_sample_ggn(model: nn.Module, loss_func, inputs: Tensor, targets: Tensor) -> Tensor:
    """GGNs ``J_n^T H_n J_n`` of the per-sample losses ``loss_func(f(x_n), y_n)``, ``[N, P, P]``."""
    jac = jacobian(model, inputs)
    with torch.no_grad():
        out = model(inputs)
    n = out.shape[0]
    jac = jac.reshape(n, -1, jac.shape[-1])
    blocks = []
    for i in range(n):
        h = loss_hessian_wrt_output(loss_func, out[i : i + 1], targets[i : i + 1])
        blocks.append(jac[i].T @ h @ jac[i])
    return torch.stack(blocks)


def ggn_wrt_intermediate(head: nn.Module, loss_func, hidden: Tensor, targets: Tensor) -> Tensor:
    """GGN of ``loss_func(head(z), targets)`` w.r.t. an intermediate ``z = hidden``, ``[Z, Z]``.

    ``Z = hidden.numel()`` (row-major over ``hidden``'s shape). Used for the output-side
    Kronecker factor of the layer that produces ``hidden``.
    """
    hidden = hidden.detach()
    jac = jacrev(lambda z: head(z.reshape(hidden.shape)).reshape(-1))(hidden.reshape(-1))
    with torch.no_grad():
        out = head(hidden)
    h = loss_hessian_wrt_output(loss_func, out, targets)
    return jac.T @ h @ jac
