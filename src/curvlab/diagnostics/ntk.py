r"""The empirical neural tangent kernel (NTK) of a batch and how it moves during training.

For a network :math:`f(x; \theta) \in \mathbb{R}^C` with the Jacobian
:math:`J(x) = \partial f(x; \theta) / \partial \theta \in \mathbb{R}^{C \times P}` (``P`` trainable
parameters: those with ``requires_grad``, in ``named_parameters()`` order), the empirical NTK of
two inputs is the :math:`C \times C` matrix

.. math::
    \Theta(x, x') = J(x)\, J(x')^\top .

:func:`empirical_ntk` returns it for a batch in one of three modes (trailing output dimensions are
flattened into ``C``):

* ``"full"`` -- :math:`\Theta(x_n, x'_m)_{c c'}`, ``[N, M, C, C]``;
* ``"trace"`` -- :math:`\operatorname{tr} \Theta(x_n, x'_m) = \sum_c \Theta(x_n, x'_m)_{cc}`,
  ``[N, M]``;
* ``"diagonal"`` -- the sample diagonal :math:`\Theta(x_n, x_n)`, ``[N, C, C]`` (its diagonal
  ``.diagonal(dim1=-2, dim2=-1)`` is the ``[N, C]`` per-output variance).

Methods (all on :mod:`torch.func`):

``"jacobian"``
    Per-sample Jacobians ``vmap(jacrev(f))`` (``[N, C, P]``, about :math:`2 N C F` flops for a
    per-sample forward pass of :math:`F` flops), contracted per parameter: :math:`N M C^2 P`
    (full), :math:`N M C P` (trace), :math:`N C^2 P` (diagonal) flops. Memory: the Jacobians.
``"ntk-vp"``
    NTK-vector products :math:`\Theta v = J (J^\top v)` (:func:`ntk_vector_product`: a VJP
    then a JVP) on the :math:`M C` unit vectors, about :math:`M C (2M + 3N) F` flops for full and
    trace; the diagonal runs them per sample, :math:`5 N C F`. No ``[N C, P]`` Jacobian is
    formed; memory ``chunk_size`` parameter-sized vectors.
``"structured"``
    :class:`curvlab.nn.RevMLP` only: every trained matrix (a branch's projection ``proj``) enters
    linearly, so the NTK is a sum over branches :math:`j` of Gram products,

    .. math::
        \Theta(x_n, x'_m) = \sum_j \big(a_j(x_n)^\top a_j(x'_m) + 1_{\text{bias}}\big)\,
        \Gamma_j(x_n)\, \Gamma_j(x'_m)^\top,

    with the branch features :math:`a_j` ``[h]`` and :math:`\Gamma_j = \partial f / \partial o_j`
    ``[C, m]`` the Jacobian of the output with respect to the branch output, from the same
    linearization :class:`curvlab.optim.ExactGN`'s ``"pinv"`` scheme uses (one forward pass, one
    backward sweep with ``C`` cotangents). No parameter-sized object is formed. Exact whenever
    every trainable parameter is a branch projection, which holds for every ``RevMLP``.
``"auto"`` (default)
    ``"structured"`` for a ``RevMLP``; otherwise the cheaper of the other two by the flop counts
    above (:math:`F` measured by :class:`torch.utils.flop_counter.FlopCounterMode` on one sample,
    at least :math:`2P`), and ``"ntk-vp"`` whenever the Jacobians would exceed
    ``max_jacobian_bytes``; ties go to ``"jacobian"``. :func:`ntk_method` returns the choice.
    In short: NTK-vector products win the full kernel when :math:`C P \gtrsim 5 F` and the
    diagonal when :math:`C P > 3 F`, so for dense networks (:math:`F \approx 2P`) from about
    10 (full) or 6 (diagonal) outputs on; the trace kernel and convolutions, whose forward pass
    reuses each weight at every position (:math:`F \gg P`), go to the Jacobian. Timings that
    bear the rule out are in ``docs/ntk.md``.

The kernel's change over training (the paper's Figure 4: "NTK rate of change" and "NTK similarity
with initialization") is measured between two kernels of the same mode on the same inputs by
:func:`ntk_similarity`, :func:`ntk_change` and :func:`ntk_rate_of_change`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.utils.flop_counter import FlopCounterMode

from curvlab.nn.reversible import RevMLP
from curvlab.optim.exact_gn import ExactGN

MODES = ("full", "trace", "diagonal")
METHODS = ("auto", "jacobian", "ntk-vp", "structured")

#: ``method="auto"`` takes NTK-vector products when the per-sample Jacobians would exceed this.
DEFAULT_MAX_JACOBIAN_BYTES = 2**30

_Params = dict[str, Tensor]


def empirical_ntk(
    model: nn.Module,
    inputs: Tensor,
    other: Tensor | None = None,
    mode: str = "full",
    method: str = "auto",
    chunk_size: int | None = None,
    max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES,
) -> Tensor:
    r"""The empirical NTK :math:`\Theta(x_n, x'_m) = J(x_n) J(x'_m)^\top` of a batch.

    Args:
        model: The network; its trainable parameters (``requires_grad``) span the kernel. It must
            treat samples independently (no BatchNorm in training mode).
        inputs: ``[N, *]`` inputs :math:`x_n`.
        other: ``[M, *]`` second inputs :math:`x'_m` for a cross kernel (default: ``inputs``).
        mode: ``"full"``, ``"trace"`` or ``"diagonal"`` (see the module docs).
        method: ``"auto"``, ``"jacobian"``, ``"ntk-vp"`` or ``"structured"`` (RevMLP only).
        chunk_size: How many NTK-vector products run at once in ``"ntk-vp"`` (default: as many as
            fit in about 256 MiB of parameter-sized vectors).
        max_jacobian_bytes: ``"auto"`` avoids ``"jacobian"`` above this Jacobian size.

    Returns:
        ``[N, M, C, C]`` (full), ``[N, M]`` (trace) or ``[N, C, C]`` (diagonal), in the model's
        dtype; ``C`` is the flattened per-sample output size.

    Raises:
        ValueError: an unknown mode or method, ``other`` with ``mode="diagonal"``, no trainable
            parameters, or ``"structured"`` for a model it does not cover.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if mode == "diagonal" and other is not None:
        raise ValueError(
            "mode='diagonal' is the kernel of each sample with itself, Theta(x_n, x_n); it takes "
            "no `other` inputs (use mode='full' for a cross kernel)"
        )
    params = _trainable(model)
    if method == "auto":
        method = ntk_method(model, inputs, other, mode, max_jacobian_bytes)
    if method == "structured":
        reason = _structured_unsupported(model, params)
        if reason:
            raise ValueError(f"method='structured' {reason}; use method='jacobian' or 'ntk-vp'")
        return _structured_ntk(model, inputs, other, mode)
    if method == "jacobian":
        return _jacobian_ntk(model, params, inputs, other, mode)
    return _ntk_vp_ntk(model, params, inputs, other, mode, chunk_size)


def ntk_method(
    model: nn.Module,
    inputs: Tensor,
    other: Tensor | None = None,
    mode: str = "full",
    max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES,
) -> str:
    r"""The method ``empirical_ntk(..., method="auto")`` takes for this problem.

    ``"structured"`` for a :class:`curvlab.nn.RevMLP`; otherwise the one with the smaller flop
    estimate of the module docs (Jacobian contraction against NTK-vector products), with
    :math:`F` the measured flops of one per-sample forward pass (at least :math:`2P`), and
    ``"ntk-vp"`` whenever the ``[N + M, C, P]`` Jacobians exceed ``max_jacobian_bytes``.

    Args:
        model: The network.
        inputs: ``[N, *]`` inputs.
        other: ``[M, *]`` second inputs, or ``None``.
        mode: ``"full"``, ``"trace"`` or ``"diagonal"``.
        max_jacobian_bytes: Largest Jacobian the ``"jacobian"`` method may form.

    Returns:
        ``"structured"``, ``"jacobian"`` or ``"ntk-vp"``.
    """
    params = _trainable(model)
    if not _structured_unsupported(model, params):
        return "structured"
    n = inputs.shape[0]
    m = n if other is None else other.shape[0]
    flops, outputs = _forward_cost(model, params, inputs[:1])
    p = sum(t.numel() for t in params.values())
    flops = max(flops, 2 * p)
    rows = n + (0 if other is None else m)
    if rows * outputs * p * inputs.element_size() > max_jacobian_bytes:
        return "ntk-vp"
    jacobian_cost = (
        2 * rows * outputs * flops
        + {
            "full": n * m * outputs**2 * p,
            "trace": n * m * outputs * p,
            "diagonal": n * outputs**2 * p,
        }[mode]
    )
    if mode == "diagonal":
        vp_cost = 5 * n * outputs * flops
    else:
        vp_cost = m * outputs * (2 * m + 3 * n) * flops
    return "ntk-vp" if vp_cost < jacobian_cost else "jacobian"


def ntk_vector_product(model: nn.Module, inputs: Tensor, vectors: Tensor) -> Tensor:
    r"""NTK-vector products :math:`\Theta V = J (J^\top V)` on a batch, without the NTK.

    Args:
        model: The network (trainable parameters as in :func:`empirical_ntk`).
        inputs: ``[N, *]`` inputs.
        vectors: ``[N, C]`` or a stack ``[K, N, C]`` of output-shaped vectors.

    Returns:
        Same shape as ``vectors``: :math:`\sum_m \Theta(x_n, x_m) v_m` for each vector.
    """
    params = _trainable(model)
    f = _batch_function(model)
    single = vectors.ndim == 2
    stack = vectors[None] if single else vectors
    products = _kernel_columns(f, params, inputs, inputs, stack, None)
    return products[0] if single else products


def ntk_similarity(ntk0: Tensor, ntk: Tensor) -> Tensor:
    r"""Similarity of two kernels: the cosine of the flattened kernels (kernel alignment).

    .. math::
        S(\Theta_0, \Theta) = \frac{\langle \Theta_0, \Theta \rangle_F}
        {\|\Theta_0\|_F\, \|\Theta\|_F} \in [-1, 1],

    1 when :math:`\Theta` is a positive multiple of :math:`\Theta_0`. The paper's Figure 4 plots the
    similarity of the NTK to its value at initialization over training; the authors' code
    (``fastbreak/utils/ntk.py``) estimates it as the cosine of :math:`\Theta_0 u` and
    :math:`\Theta u` for a random probe :math:`u`, whose numerator and squared norms have the
    expectations :math:`\langle \Theta_0, \Theta \rangle_F`, :math:`\|\Theta_0\|_F^2`,
    :math:`\|\Theta\|_F^2` (:math:`u \sim \mathcal N(0, I)`); this is the exact value.

    Args:
        ntk0: The reference kernel, e.g. at initialization (any shape, e.g. ``[N, N, C, C]``).
        ntk: The kernel now, same shape (same mode and inputs).

    Returns:
        A 0-dim tensor (``nan`` when either kernel is zero).
    """
    _check_same_shape(ntk0, ntk)
    a, b = ntk0.reshape(-1).double(), ntk.reshape(-1).double()
    return (a @ b) / (a.norm() * b.norm())


def ntk_change(ntk0: Tensor, ntk: Tensor) -> Tensor:
    r"""Relative change of the kernel from a reference, in the Frobenius norm.

    .. math::
        \Delta(\Theta_0, \Theta) = \frac{\|\Theta - \Theta_0\|_F}{\|\Theta_0\|_F},

    0 in the kernel (lazy) regime, where the NTK stays at its initial value.

    Args:
        ntk0: The reference kernel, e.g. at initialization (any shape).
        ntk: The kernel now, same shape.

    Returns:
        A 0-dim tensor.
    """
    _check_same_shape(ntk0, ntk)
    a, b = ntk0.reshape(-1).double(), ntk.reshape(-1).double()
    return (b - a).norm() / a.norm()


def ntk_rate_of_change(previous: Tensor, current: Tensor, interval: float = 1.0) -> Tensor:
    r"""The NTK's rate of change: its relative change between two measurements per unit time.

    .. math::
        \dot\Theta_t = \frac{\|\Theta_t - \Theta_{t - \delta}\|_F}{\delta\, \|\Theta_{t-\delta}\|_F},

    :func:`ntk_change` of consecutive kernels divided by the interval :math:`\delta` between
    them (in epochs or steps; say which). The paper's Figure 4 plots it over training next to
    :func:`ntk_similarity`; its exact normalization is not in the notes this code follows
    (``papers/exact-gn.md``), so this is the definition the project uses.

    Args:
        previous: The kernel at the previous measurement :math:`\Theta_{t-\delta}`.
        current: The kernel now :math:`\Theta_t`, same shape.
        interval: :math:`\delta > 0`.

    Returns:
        A 0-dim tensor.
    """
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval}")
    return ntk_change(previous, current) / interval


# ---------------------------------------------------------------------------------- internals
def _check_same_shape(ntk0: Tensor, ntk: Tensor) -> None:
    if ntk0.shape != ntk.shape:
        raise ValueError(
            f"the kernels differ in shape: {tuple(ntk0.shape)} and {tuple(ntk.shape)} (compare "
            f"kernels of the same mode on the same inputs)"
        )


def _trainable(model: nn.Module) -> _Params:
    """Trainable parameters by name, detached, in ``named_parameters`` order."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (requires_grad=True): its NTK "
            f"is zero"
        )
    return params


def _batch_function(model: nn.Module) -> Callable[[_Params, Tensor], Tensor]:
    """``f(params, x)``: outputs ``[N, C]`` (trailing output dimensions flattened)."""

    def f(params: _Params, x: Tensor) -> Tensor:
        out = functional_call(model, params, (x,))
        return out.reshape(x.shape[0], -1)

    return f


def _sample_function(model: nn.Module) -> Callable[[_Params, Tensor], Tensor]:
    """``f(params, x)`` for one sample ``x`` (no batch axis): outputs ``[C]``."""

    def f(params: _Params, x: Tensor) -> Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).reshape(-1)

    return f


def _forward_cost(model: nn.Module, params: _Params, sample: Tensor) -> tuple[int, int]:
    """Counted flops of a forward pass on ``[1, *]`` and the output size ``C``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = functional_call(model, params, (sample,))
    return counter.get_total_flops(), out[0].numel()


def _per_sample_jacobians(model: nn.Module, params: _Params, x: Tensor) -> list[Tensor]:
    """Per-sample Jacobians, one ``[N, C, D_p]`` per parameter (flattened)."""
    jac = vmap(jacrev(_sample_function(model)), in_dims=(None, 0))(params, x)
    return [jac[name].flatten(start_dim=2) for name in params]


def _jacobian_ntk(
    model: nn.Module, params: _Params, inputs: Tensor, other: Tensor | None, mode: str
) -> Tensor:
    """The NTK by Jacobian contraction, summed over parameters."""
    jacs = _per_sample_jacobians(model, params, inputs)
    jacs_other = jacs if other is None else _per_sample_jacobians(model, params, other)
    equation = {"full": "ncp,mdp->nmcd", "trace": "ncp,mcp->nm", "diagonal": "ncp,ndp->ncd"}[mode]
    total = None
    for jac, jac_other in zip(jacs, jacs_other):
        term = torch.einsum(equation, jac, jac_other)
        total = term if total is None else total.add_(term)
    return total


def _default_chunk(params: _Params) -> int:
    """How many parameter-sized vectors fit in about 256 MiB."""
    size = sum(t.numel() * t.element_size() for t in params.values())
    return max(1, (256 * 2**20) // max(size, 1))


def _kernel_columns(
    f: Callable[[_Params, Tensor], Tensor],
    params: _Params,
    inputs: Tensor,
    other: Tensor,
    cotangents: Tensor,
    chunk_size: int | None,
) -> Tensor:
    r""":math:`J(X) J(X')^\top v_k` for cotangents ``[K, M, C]`` on ``other``; returns ``[K, N, C]``."""
    _, pullback = vjp(lambda p: f(p, other), params)

    def column(cotangent: Tensor) -> Tensor:
        (tangent,) = pullback(cotangent)
        return jvp(lambda p: f(p, inputs), (params,), (tangent,))[1]

    chunk = _default_chunk(params) if chunk_size is None else chunk_size
    return vmap(column, chunk_size=chunk)(cotangents)


def _ntk_vp_ntk(
    model: nn.Module,
    params: _Params,
    inputs: Tensor,
    other: Tensor | None,
    mode: str,
    chunk_size: int | None,
) -> Tensor:
    """The NTK from NTK-vector products on unit vectors."""
    chunk = _default_chunk(params) if chunk_size is None else chunk_size
    if mode == "diagonal":
        g = _sample_function(model)

        def block(x: Tensor) -> Tensor:
            out, pullback = vjp(lambda p: g(p, x), params)

            def column(cotangent: Tensor) -> Tensor:
                (tangent,) = pullback(cotangent)
                return jvp(lambda p: g(p, x), (params,), (tangent,))[1]

            eye = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
            return vmap(column)(eye).T  # [C, C'] with rows c

        return vmap(block, chunk_size=max(1, chunk // 4))(inputs)
    f = _batch_function(model)
    second = inputs if other is None else other
    with torch.no_grad():
        outputs = f(params, second[:1]).shape[1]
    m = second.shape[0]
    eye = torch.eye(m * outputs, dtype=inputs.dtype, device=inputs.device)
    columns = _kernel_columns(f, params, inputs, second, eye.view(-1, m, outputs), chunk)
    ntk = columns.view(m, outputs, inputs.shape[0], outputs).permute(2, 0, 3, 1)  # [N, M, C, C']
    if mode == "trace":
        return ntk.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ntk.contiguous()


def _structured_unsupported(model: nn.Module, params: _Params) -> str:
    """Why the structured RevMLP form does not apply (empty when it does)."""
    if not isinstance(model, RevMLP):
        return f"covers curvlab.nn.RevMLP only, got {type(model).__name__}"
    projections = {
        id(p)
        for block in model.body.blocks
        for br in (block.f, block.g)
        for p in br.proj.parameters()
    }
    named = dict(model.named_parameters())
    others = [name for name in params if id(named[name]) not in projections]
    if others:
        return (
            f"covers the branch projections of a RevMLP only, but {others[0]} is trainable too "
            f"(its Jacobian has no Gram-product form)"
        )
    return ""


def _revmlp_factors(model: RevMLP, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    r"""Per branch: the Gram factor ``[N, h']`` and :math:`\Gamma_j` ``[N, C, m]``.

    The Gram factor is the features with a ones column when the bias trains, features only when
    only the weight trains, ones only when only the bias does (and empty when neither trains).
    The linearization is :class:`curvlab.optim.ExactGN`'s (the ``"pinv"`` scheme's structured
    NTK); the optimizer is built only to reuse it and never steps.
    """
    linearization = ExactGN(model, lr=1.0, scheme="pinv", max_loss_ratio=None)
    with torch.no_grad():
        branches, _ = linearization._linearize(model.flatten_input(x))
        gammas = linearization._output_wrt_branches(branches)
    factors = []
    for branch, gamma in zip(branches, gammas):
        proj = branch.module.proj
        parts = []
        if proj.weight.requires_grad:
            parts.append(branch.features)
        if proj.bias is not None and proj.bias.requires_grad:
            parts.append(branch.features.new_ones(branch.features.shape[0], 1))
        if parts:
            factors.append((torch.cat(parts, dim=1), gamma))
    return factors


def _structured_ntk(model: RevMLP, inputs: Tensor, other: Tensor | None, mode: str) -> Tensor:
    r""":math:`\sum_j (A_j A_j'^\top) \odot (\Gamma_j \Gamma_j'^\top)` in the requested mode."""
    factors = _revmlp_factors(model, inputs)
    factors_other = factors if other is None else _revmlp_factors(model, other)
    total = None
    for (features, gamma), (features_o, gamma_o) in zip(factors, factors_other):
        if mode == "diagonal":
            gram = features.square().sum(1)  # [N]
            term = torch.einsum("ncj,ndj->ncd", gamma, gamma) * gram[:, None, None]
        elif mode == "trace":
            gram = features @ features_o.T  # [N, M]
            term = gram * (gamma.flatten(1) @ gamma_o.flatten(1).T)
        else:
            gram = features @ features_o.T
            term = torch.einsum("ncj,mdj->nmcd", gamma, gamma_o) * gram[:, :, None, None]
        total = term if total is None else total.add_(term)
    return total
