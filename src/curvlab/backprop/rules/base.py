r"""The derivative interface that every per-layer rule implements, shared by all quantities.

A *call* is one execution of a module in the forward pass (a shared module has several). For a
call with recorded inputs and a *factor* ``F`` of shape ``[M, N, *out]`` — ``M`` vectors per
sample back-propagated to the module's output (``M = 1`` for the per-sample loss gradient, the
columns of a loss-Hessian square root for GGN quantities) — a rule returns, per parameter
(by its name relative to the module), the parameter Jacobian-transpose products
:math:`J_{\theta}(x_n)^\top F_{mn}` and reductions of them that often need not materialize the
``[M, N, *p]`` tensor. Only :meth:`Rule.jac_t` is required; the reductions default to it, and
:meth:`Rule.jvp` defaults to ``torch.func.jvp`` of the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(eq=False)
class Call:
    """One recorded execution of a module (hashed by identity: it keys the factors).

    Attributes:
        args: Positional inputs (detached), batch dimension first where they have one.
        kwargs: Keyword inputs (detached).
        outputs: The tensors among the outputs (attached to the graph), in ``tree_flatten``
            order.
        versions: The outputs' version counters right after the call (in-place checks).
        input_nodes: ``grad_fn`` of the tensor inputs before detaching (graph checks).
        graph_inputs: The tensor inputs before detaching (for back-propagating from them).
        values: The tensor outputs, detached and restricted to the subsample.
        order: When the call returned, counting every recorded call of the pass (``-1``: not
            recorded); a call's inputs come from calls of lower order.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[Tensor, ...] = ()
    versions: list[int] = field(default_factory=list)
    input_nodes: list[Any] = field(default_factory=list)
    graph_inputs: list[Tensor] = field(default_factory=list)
    values: tuple[Tensor, ...] = ()
    order: int = -1


KRON_APPROXIMATIONS = ("expand", "reduce")
"""How a weight shared over ``T`` positions gets its factors (Eschenhagen et al., 2023)."""


@dataclass
class KronSums:
    r"""Unnormalized Kronecker statistics of one call.

    For a weight with KFAC-expand (``approx="expand"``): :math:`\sum_{n,t} u_{nt} u_{nt}^\top`
    (``N * T`` rows) and :math:`\sum_{m,n,t} s_{mnt} s_{mnt}^\top`; with KFAC-reduce:
    :math:`\sum_n \bar u_n \bar u_n^\top` with :math:`\bar u_n = \frac1T \sum_t u_{nt}`
    (``N`` rows) and :math:`\sum_{m,n} (\sum_t s_{mnt})(\sum_t s_{mnt})^\top`. A bias always gets
    the latter output sum, its exact GGN block. For ``T = 1`` both coincide.

    Attributes:
        input_sum: ``[in, in]`` or ``[G, in/G, in/G]`` (``None`` for a bias, and for a whole
            block of a rule without Kronecker structure).
        input_count: Number of rows in ``input_sum``.
        output_sum: ``[out, out]``, ``[G, out/G, out/G]``, or the whole ``[P, P]`` block.
        input_total: The sum of the same rows, ``[in]`` or ``[G, in/G]`` (weights only; it
            completes the input factor of a joint weight-and-bias block).
    """

    input_sum: Tensor | None
    input_count: int
    output_sum: Tensor
    input_total: Tensor | None = None


class Rule:
    r"""Parameter derivatives of one module type (see the module docstring).

    Every method takes the module, one :class:`Call`, the factors ``[M, N, *out]`` (one per
    output tensor of the call) and the parameter names to return.

    Attributes:
        linear_in_input: The module's output is linear (affine) in its tensor inputs, so it adds
            no second-order term to the Hessian w.r.t. earlier activations.
        linear_in_params: The module's output is linear (affine) in its parameters, so their
            Hessian block is :math:`J_\theta^\top (\nabla_z^2 L) J_\theta` (the signed-factor
            Hessian path needs it).
        kronecker: The rule provides :meth:`kron_sums`.
        kron_kind: How :meth:`kron_sums` maps to the weight (:class:`~curvlab.backprop.kron.
            Layout` kinds): ``"rows"``, ``"transposed"``, ``"columns"``, or ``"whole"`` (the
            output sum is the parameter's whole block).
    """

    linear_in_input: bool = False
    linear_in_params: bool = True
    kronecker: bool = False
    kron_kind: str = "rows"
    channels_last: bool = False
    """The output's channel (the output factor's) dimension is the last (``Linear``,
    ``Embedding``), not dimension 1 (convolutions)."""
    claims: tuple[str, ...] = ()
    """Parameters of child modules the rule handles although the children are never called
    (e.g. ``MultiheadAttention``'s ``out_proj.weight``)."""

    def applies(self, module: nn.Module, calls: list[Call]) -> bool:
        """Whether the rule covers this module's recorded calls (else the generic path)."""
        return True

    def jac_t(
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        """Per-sample parameter VJPs, ``{name: [M, N, *p]}``."""
        raise NotImplementedError

    def sum_jac_t(
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        r""":math:`\sum_n J_n^\top F_{mn}`, ``{name: [M, *p]}``."""
        return {k: v.sum(1) for k, v in self.jac_t(module, call, factors, names).items()}

    def sum_sq_jac_t(
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        per_sample: bool,
    ) -> dict[str, Tensor]:
        r""":math:`\sum_m (J_n^\top F_{mn})^{\odot 2}`: ``[N, *p]``, or summed over ``n``."""
        out = {}
        for k, v in self.jac_t(module, call, factors, names).items():
            sq = v.square().sum(0)
            out[k] = sq if per_sample else sq.sum(0)
        return out

    def sq_norm_jac_t(
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        r""":math:`\lVert J_n^\top F_{mn} \rVert^2`, ``{name: [M, N]}``."""
        return {
            k: v.flatten(start_dim=2).square().sum(-1)
            for k, v in self.jac_t(module, call, factors, names).items()
        }

    def gram(
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        other: tuple[Tensor, ...] | None = None,
    ) -> dict[str, Tensor]:
        r"""Gram matrices of the VJPs, :math:`\langle J_n^\top F_{mn}, J_{n'}^\top F'_{m'n'} \rangle`.

        The default forms the VJPs (``[M, N, *p]``) with :meth:`jac_t`; rules with a factored
        form override it (ViViT, :mod:`curvlab.vivit`).

        Args:
            module: The module.
            call: One of its calls.
            factors: ``F``, ``[M, N, *out]`` per output tensor.
            names: The parameters to return.
            other: ``F'``, ``[M', N, *out]`` per output tensor (``None``: ``F`` itself).

        Returns:
            ``{name: [M, N, M', N]}``.
        """
        left = self.jac_t(module, call, factors, names)
        right = left if other is None else self.jac_t(module, call, other, names)
        out = {}
        for k, v in left.items():
            a, b = v.flatten(start_dim=2), right[k].flatten(start_dim=2)
            out[k] = (a.flatten(end_dim=1) @ b.flatten(end_dim=1).T).reshape(
                *a.shape[:2], *b.shape[:2]
            )
        return out

    def kron_sums(
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        approx: str = "expand",
    ) -> dict[str, KronSums]:
        """Kronecker statistics per parameter (weights: both sides; biases: output side)."""
        raise NotImplementedError(f"no Kronecker factors for {type(module).__name__}")

    # ------------------------------------------------------------------ input side
    def diag_backprop(
        self,
        module: nn.Module,
        call: Call,
        d_out: Tensor,
        grad_out: Tensor | None,
        vjp: Callable[[Tensor], Tensor],
    ) -> Tensor:
        r"""BL89 / HesScale step: the Hessian diagonal w.r.t. the input from the output's.

        :math:`d_x = (J \odot J)^\top d_y`, plus :math:`\phi''(h) \odot \partial\ell_n/\partial a`
        for an elementwise activation; off-diagonal terms are dropped (Becker & LeCun, 1989).

        Args:
            module: The module.
            call: Its call (the input is ``call.args[0]``).
            d_out: :math:`d_y` per sample, ``[N, *out]``.
            grad_out: :math:`\partial \ell_n / \partial y`, ``[N, *out]`` (if recorded).
            vjp: The call's input VJP through the recorded graph, ``[N, *out] -> [N, *in]``.

        Returns:
            :math:`d_x`, ``[N, *in]``.
        """
        raise NotImplementedError("no diagonal backpropagation rule")

    def diag_params(
        self, module: nn.Module, call: Call, d_out: Tensor, names: list[str]
    ) -> dict[str, Tensor]:
        r"""BL89 parameter diagonals :math:`\sum_{n,t} d_{y,nt}\, x_{nt}^{\odot 2}` (no :math:`r`)."""
        raise NotImplementedError("no parameter diagonals for this layer")

    def ggn_backprop(self, module: nn.Module, x: Tensor, g_bar: Tensor) -> Tensor:
        r"""KFRA step: :math:`\frac1N\sum_n J_n^\top \bar G J_n` ``[D_in, D_in]`` from ``[D_out, D_out]``.

        The default needs one Jacobian when the module is linear in its input
        (:attr:`linear_in_input`), and averages per-sample sandwiches otherwise.
        """
        if self.linear_in_input:
            return sandwich(module, x[0], g_bar)
        return sum(sandwich(module, xn, g_bar) for xn in x) / x.shape[0]

    def jvp(self, module: nn.Module, call: Call, name: str, vectors: Tensor) -> tuple[Tensor, ...]:
        r"""Parameter Jacobian-vector products :math:`J_n v_k` of the call's outputs.

        Args:
            module: The module.
            call: One of its calls.
            name: The parameter (relative to the module).
            vectors: ``[K, *p]``.

        Returns:
            One ``[K, N, *out]`` tensor per output tensor of the call.
        """
        params = dict(module.named_parameters(remove_duplicate=False))
        value = params[name].detach()

        def outputs(p: Tensor) -> tuple[Tensor, ...]:
            # the math attention kernel supports forward-mode AD, the fused CPU kernels do not
            with sdpa_kernel([SDPBackend.MATH]):
                out = functional_call(module, {name: p}, call.args, call.kwargs, strict=False)
            leaves, _ = torch.utils._pytree.tree_flatten(out)
            return tuple(o for o in leaves if isinstance(o, Tensor))

        def single(v: Tensor) -> tuple[Tensor, ...]:
            return jvp(outputs, (value,), (v,))[1]

        return vmap(single)(vectors)

    def factored_per_sample(self, module: nn.Module, call: Call) -> bool:
        r"""Whether the call's per-sample VJPs are outer products :math:`F_{mn} x_n^\top`.

        Then per-sample norms, dot products (:meth:`jvp`) and elements
        (:meth:`sample_jac_t`) cost :math:`O(N (\text{in} + \text{out}))` or one product of
        the inputs with a weight-shaped vector, and materialising ``[M, N, *p]`` never pays.
        Default ``False``.
        """
        return False

    def sample_jac_t(
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        name: str,
        samples: Tensor,
        elements: Tensor,
    ) -> Tensor:
        r"""Chosen elements of the per-sample VJPs, :math:`(J_{n_b}^\top F_{m n_b})_{j_b}`.

        The default forms :meth:`jac_t` (``[M, N, *p]``) and gathers; rules override it with
        forms that never build the per-sample VJPs.

        Args:
            module: The module.
            call: One of its calls.
            factors: ``[M, N, *out]`` per output tensor.
            name: The parameter (relative to the module).
            samples: Sample indices :math:`n_b`, ``[B]`` (``int64``).
            elements: Flat indices :math:`j_b` into the parameter (row-major), ``[B]``.

        Returns:
            ``[M, B]``.
        """
        vjp = self.jac_t(module, call, factors, [name])[name]
        return vjp.flatten(start_dim=2)[:, samples, elements]

    def sample_block_jac_t(
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        name: str,
        samples: Tensor,
        rows: Tensor,
        columns: Tensor,
    ) -> Tensor:
        r"""A sub-block of each chosen sample's VJP, :math:`(J_{n_s}^\top F_{m n_s})_{r_{si}, c_{sj}}`.

        The parameter is viewed as a matrix ``[p_0, p / p_0]`` (its first dimension against the
        rest; a vector as ``[p_0, 1]``). Per chosen sample :math:`n_s`, the rows
        :math:`r_{s\cdot}` and columns :math:`c_{s\cdot}` of its block: ``S R + S C`` indices
        for ``S R C`` elements (an outer product for a ``Linear`` layer). The default forms
        :meth:`jac_t` and gathers.

        Args:
            module: The module.
            call: One of its calls.
            factors: ``[M, N, *out]`` per output tensor.
            name: The parameter (relative to the module).
            samples: :math:`n_s`, ``[S]``.
            rows: ``[S, R]``.
            columns: ``[S, C]``.

        Returns:
            ``[M, S, R, C]``.
        """
        vjp = self.jac_t(module, call, factors, [name])[name]
        m, n = vjp.shape[:2]
        matrix = vjp.reshape(m, n, vjp.shape[2], -1)[:, samples]  # [M, S, p_0, p / p_0]
        s, r, c = rows.shape[0], rows.shape[1], columns.shape[1]
        picked = matrix.gather(2, rows[None, :, :, None].expand(m, s, r, matrix.shape[-1]))
        return picked.gather(3, columns[None, :, None, :].expand(m, s, r, c))


def sandwich(module: nn.Module, x: Tensor, g_bar: Tensor) -> Tensor:
    r""":math:`J^\top \bar G J` for the input Jacobian :math:`J` of ``module`` at one sample ``x``.

    Two batched VJPs: rows of :math:`\bar G J` from the rows of :math:`\bar G`, then rows of
    :math:`J^\top (\bar G J)` (symmetric) from the columns of :math:`\bar G J`.

    Args:
        module: A module that treats samples independently.
        x: One sample's input, ``[*in]``.
        g_bar: ``[D_out, D_out]``.

    Returns:
        ``[D_in, D_in]``.
    """
    with torch.enable_grad():
        _, pullback = torch.func.vjp(module, x.unsqueeze(0))
    out_shape = module(x.unsqueeze(0)).shape

    def rows(m: Tensor) -> Tensor:
        (vjp,) = torch.func.vmap(pullback)(m.reshape(m.shape[0], *out_shape))
        return vjp.reshape(m.shape[0], -1)

    g_j = rows(g_bar)  # [D_out, D_in]
    return rows(g_j.T.contiguous())  # [D_in, D_in]
