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
    """Hessian of the batch loss w.r.t. the flattened parameters, ``[P, P]``.

    Reverse over reverse (``jacrev(grad)``): in torch 2.13 forward over reverse
    (``torch.func.hessian``) gets the blocks *between* parameters wrong through LayerNorm's
    backward (an asymmetric matrix, off by 0.1-1 on ``layernorm-mlp``; the diagonal blocks are
    right). The math attention kernel has the double backward that the fused ones lack.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    theta = flatten(trainable_params(model))
    f = _output_fn(model, inputs)
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jacrev(torch.func.grad(lambda t: loss_func(f(t), targets)))(theta)


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


# ----------------------------------------------------------------------------------------------
# Hessian diagonals and layer recursions (tests/backprop). Dense per-sample computations; the
# math attention kernel is forced because the fused CPU kernels lack double / forward AD.
# ----------------------------------------------------------------------------------------------
def per_sample_hessian_diagonals(
    model: nn.Module, loss_func, inputs: Tensor, targets: Tensor
) -> Tensor:
    """Diagonals of the Hessians of ``loss_func(f(x_n), y_n)`` w.r.t. the parameters, ``[N, P]``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    theta = flatten(trainable_params(model))
    rows = []
    with sdpa_kernel([SDPBackend.MATH]):
        for n in range(inputs.shape[0]):
            f = _output_fn(model, inputs[n : n + 1])
            loss = lambda t, f=f, n=n: loss_func(f(t), targets[n : n + 1])  # noqa: E731
            h = torch.func.jacrev(torch.func.grad(loss))(theta)
            rows.append(torch.diagonal(h))
    return torch.stack(rows)


def hessian_diagonal(model: nn.Module, loss_func, inputs: Tensor, targets: Tensor) -> Tensor:
    """Diagonal of the Hessian of the batch loss, ``[P]``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.diagonal(full_hessian(model, loss_func, inputs, targets))


def _dense_layer(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Input Jacobian ``[out, in]`` and parameter Jacobian ``[out, P_module]`` of one sample."""
    params = {k: p.detach() for k, p in module.named_parameters()}

    def out(inp: Tensor, flat: Tensor | None) -> Tensor:
        p = unflatten(flat, params) if flat is not None else params
        return functional_call(module, p, (inp.unsqueeze(0),)).reshape(-1)

    j_x = jacrev(lambda inp: out(inp, None))(x).reshape(-1, x.numel())
    if not params:
        return j_x, None
    flat = flatten(params)
    return j_x, jacrev(lambda t: out(x, t))(flat)


_ELEMENTWISE = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.LeakyReLU)


def diagonal_recursion(
    model: nn.Sequential, loss_func, inputs: Tensor, targets: Tensor, exact_last_layer: bool
) -> Tensor:
    """BL89 / HesScale parameter diagonals by dense per-sample Jacobians, ``[P]``.

    ``d`` starts at the diagonal of the per-sample loss Hessian (BL89) and is pushed through
    each layer as ``(J_x ⊙ J_x)^T d`` (activations: ``φ'^2 d + φ'' ∂ℓ/∂a``); a parametric layer
    adds ``(J_θ ⊙ J_θ)^T d``. With ``exact_last_layer`` the diagonal at the input and output of
    the last parametric layer is the exact diagonal of ``J^T H J`` (HesScale). ``r`` from the
    loss reduction; only for ``nn.Sequential`` of plain modules.
    """
    layers = list(model)
    n_total = inputs.shape[0]
    r = 1.0 / n_total if loss_func.reduction == "mean" else 1.0
    acts = _activations(layers, inputs)
    parametric = [i for i, m in enumerate(layers) if any(True for _ in m.parameters())]
    total = {
        i: torch.zeros(sum(p.numel() for p in layers[i].parameters()), dtype=inputs.dtype)
        for i in parametric
    }
    for n in range(n_total):
        out_n = acts[-1][n : n + 1]
        y_n = targets[n : n + 1]

        def ell(o: Tensor, y_n=y_n, shape=out_n.shape) -> Tensor:
            return loss_func(o.reshape(shape), y_n)

        h_out = hessian(ell)(out_n.reshape(-1))
        g_out = torch.func.grad(ell)(out_n.reshape(-1))
        # per-sample gradients w.r.t. every activation, by the chain rule on dense Jacobians
        grads = [None] * (len(layers) + 1)
        grads[-1] = g_out
        jacs = [_dense_layer(layers[i], acts[i][n]) for i in range(len(layers))]
        for i in range(len(layers) - 1, -1, -1):
            grads[i] = jacs[i][0].T @ grads[i + 1]
        d = torch.diagonal(h_out).clone()
        start = len(layers) - 1
        if exact_last_layer:
            last = parametric[-1]
            j_top = torch.eye(h_out.shape[0], dtype=inputs.dtype)
            for i in range(len(layers) - 1, last, -1):
                j_top = j_top @ jacs[i][0]
            h_z = j_top.T @ h_out @ j_top
            total[last] += (jacs[last][1].square().T @ torch.diagonal(h_z)) * r
            j_x = j_top @ jacs[last][0]
            d = torch.diagonal(j_x.T @ h_out @ j_x).clone()
            start = last - 1
        for i in range(start, parametric[0] - 1, -1):
            layer = layers[i]
            j_x, j_p = jacs[i]
            if j_p is not None:
                total[i] += r * (j_p.square().T @ d)
            if i == parametric[0]:
                break
            if not isinstance(layer, _ELEMENTWISE):  # a linear map
                d = j_x.square().T @ d
            else:
                x = acts[i][n].reshape(-1)
                first = torch.func.vmap(torch.func.grad(lambda t, layer=layer: layer(t)))(x)
                second = torch.func.vmap(
                    torch.func.grad(torch.func.grad(lambda t, layer=layer: layer(t)))
                )(x)
                d = first.square() * d + second * grads[i + 1]
    return torch.cat([total[i] for i in parametric])


def _activations(layers: list[nn.Module], inputs: Tensor) -> list[Tensor]:
    """The input and every layer's output of a chain, without a graph."""
    with torch.no_grad():
        acts = [inputs]
        for layer in layers:
            acts.append(layer(acts[-1]))
    return acts


def kfra_output_factors(model: nn.Sequential, loss_func, inputs: Tensor, targets: Tensor):
    """KFRA's ``B`` for each ``Linear`` of an MLP, by explicit batch-averaged matrices.

    ``B_out = r Σ_n H_n``; below a Linear ``W^T B W``; below an elementwise activation
    ``B ⊙ mean_n φ'(h_n) φ'(h_n)^T``. Returns ``{layer index: B}``.
    """
    layers = list(model)
    r = 1.0 / inputs.shape[0] if loss_func.reduction == "mean" else 1.0
    acts = _activations(layers, inputs)
    out = acts[-1]
    b = sum(
        loss_hessian_wrt_output(loss_func, out[n : n + 1], targets[n : n + 1])
        for n in range(out.shape[0])
    ) * (r * 1.0)
    factors = {}
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, nn.Linear):
            factors[i] = b
            w = layer.weight.detach()
            b = w.T @ b @ w
        elif isinstance(layer, _ELEMENTWISE):
            x = acts[i]
            first = torch.func.vmap(
                torch.func.vmap(torch.func.grad(lambda t, layer=layer: layer(t)))
            )(x)
            b = b * (first.T @ first) / x.shape[0]
    return factors


def kfra_dense_ggns(model: nn.Sequential, loss_func, inputs: Tensor, targets: Tensor):
    """KFRA's batch-averaged GGN w.r.t. every layer output of a ``Sequential``, by Jacobians.

    ``G_out = r Σ_n H_n``; below layer ``i``: ``(1/N) Σ_n J_nᵀ G J_n`` with ``J_n`` the full
    Jacobian of layer ``i`` at sample ``n`` (flattened). Returns ``{i: G w.r.t. output of i}``.
    """
    layers = list(model)
    n = inputs.shape[0]
    r = 1.0 / n if loss_func.reduction == "mean" else 1.0
    acts = _activations(layers, inputs)
    out = acts[-1]
    g = r * sum(
        loss_hessian_wrt_output(loss_func, out[k : k + 1], targets[k : k + 1]) for k in range(n)
    )
    ggns = {}
    for i in range(len(layers) - 1, -1, -1):
        ggns[i] = g
        x = acts[i]
        jacs = [
            torch.func.jacrev(layers[i])(x[k : k + 1]).reshape(acts[i + 1][0].numel(), -1)
            for k in range(n)
        ]
        g = sum(j.T @ g @ j for j in jacs) / n
    return ggns
