r"""What a quantity sees: per-parameter derivatives and the state of the pass.

After the backward pass, every call of a module that uses a parameter has recorded inputs and,
per *source* (:mod:`~curvlab.backprop.sources`), a factor ``F`` ``[M, N, *out]``
back-propagated to the call's output. :class:`ParamDerivatives` turns them
into per-sample Jacobian-transpose products :math:`J_n^\top F_{mn}` and reductions of them,
summing over the calls of shared modules, through the calls' rules (``rules/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.backprop.rules.base import Call, KronSums, Rule
from curvlab.backprop.sources import Source, as_source

if TYPE_CHECKING:
    from curvlab.backprop.functional import WholeModelFunc
    from curvlab.backprop.loss import LossSpec


class Owner:
    """A called module and the trainable parameters whose derivatives its calls provide.

    Attributes:
        name: The module's name in ``model.named_modules()``.
        module: The module.
        calls: Its recorded calls in this forward pass.
        local_names: Parameter names relative to the module (``"weight"``, ``"out_proj.bias"``).
        rule: The rule used for exact quantities.
        kron_rule: The per-layer rule for layer-wise approximations (``None``: generic module).
        generic_names: Parameters the module uses functionally (e.g. ``MultiheadAttention``'s
            ``out_proj``), which force the generic path.
    """

    def __init__(self, name: str, module: nn.Module, calls: list[Call]) -> None:
        self.name = name
        self.module = module
        self.calls = calls
        self.local_names: list[str] = []
        self.rule: Rule | None = None
        self.kron_rule: Rule | None = None
        self.generic_names: set[str] = set()


@dataclass
class Context:
    r"""State of one :func:`~curvlab.backprop.compute` pass that quantities may read.

    Attributes:
        model: The model.
        spec: The loss function's second-order view.
        output: Model output ``[N, ...]`` (detached).
        targets: The targets.
        r: Batch factor in :math:`L = r\sum_n \ell_n`.
        num_samples: Number of samples the quantities use (after subsampling).
        index: The subsample's indices, or ``None``.
        owners: Called modules with trainable parameters.
        param_names: Trainable parameter names in ``named_parameters()`` order.
        hessian_fallback: Set when Hessian quantities use the generic whole-model path.
        hessian_residuals: Hessian-diagonal residuals of whole blocks beyond the back-propagated
            factors (:class:`~curvlab.backprop.blocks.EncoderResiduals`), by the blocks' module
            names.
        records: Calls of *every* module (only for whole-network recursions), by module name.
        output_grads: Per-sample gradients w.r.t. recorded call outputs, by call.
        grad: The gradient of the batch loss by parameter name.
    """

    model: nn.Module
    spec: LossSpec
    output: Tensor
    targets: Tensor
    r: float
    num_samples: int
    index: Tensor | None
    owners: list[Owner]
    param_names: list[str]
    hessian_fallback: WholeModelFunc | None = None
    hessian_residuals: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[Call]] = field(default_factory=dict)
    output_grads: dict[Call, tuple[Tensor | None, ...]] = field(default_factory=dict)
    grad: dict[str, Tensor] = field(default_factory=dict)


class ParamDerivatives:
    """Derivatives of one parameter, summed over every call that uses it.

    Args:
        name: The parameter's name in ``model.named_parameters()``.
        uses: ``(owner, local_name)`` pairs.
        factors: ``factors[source][call]`` the back-propagated factors of each call (one
            ``[M, N, *out]`` tensor per output tensor of the call).
        param: The parameter (for shape, dtype and device).
        num_samples: ``N`` (after subsampling).
        cache: Shared cache of rule results (one rule call serves all parameters of a module).
        scale: The factors are ``scale`` times the stored tensors (the streamed path hands over
            autograd's output gradients unscaled instead of copying them); results scale by
            ``scale`` (linear) or ``scale ** 2`` (quadratic).
    """

    def __init__(
        self,
        name: str,
        uses: list[tuple[Owner, str]],
        factors: dict[Source, dict[Call, tuple[Tensor, ...]]],
        param: Tensor,
        num_samples: int,
        cache: dict[tuple, dict[str, Any]],
        scale: float = 1.0,
    ) -> None:
        self.scale = scale
        self.name = name
        self.uses = uses
        self.factors = factors
        self.shape = param.shape
        self.param = param
        self.num_samples = num_samples
        self.cache = cache

    def _per_call(
        self,
        primitive: str,
        source: Source,
        consume: bool = False,
        local: str | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """One rule result per call; ``consume`` hands the tensor over (no cache reference).

        ``local`` reads another parameter of the same module (a joint weight-and-bias block).
        """
        source = as_source(source)
        values = []
        for owner, own_local in self.uses:
            rule = owner.kron_rule if primitive == "kron_sums" else owner.rule
            name = own_local if local is None else local
            for call in owner.calls:
                key = (call, primitive, source, tuple(kwargs.items()))
                entry = self.cache.get(key)
                if entry is None or name not in entry:
                    factors = self.factors[source][call]
                    with torch.no_grad():
                        entry = getattr(rule, primitive)(
                            owner.module, call, factors, owner.local_names, **kwargs
                        )
                    self.cache[key] = entry
                values.append(entry.pop(name) if consume else entry[name])
        return values

    def _columns(self, source: Source) -> int:
        factors = self.factors[as_source(source)]
        return next(iter(factors.values()))[0].shape[0] if factors else 1

    def _zeros(self, *lead: int) -> Tensor:
        return self.param.new_zeros(*lead, *self.shape)

    def _scaled(self, value: Tensor, power: int) -> Tensor:
        """``value * scale ** power`` (a new tensor unless the scale is one)."""
        return value if self.scale == 1.0 else value * self.scale**power

    def _single_scaled(self, primitive: str, source: Source, power: int, **kwargs: Any) -> Tensor:
        """The one call's rule result times ``scale ** power``.

        Rescaled in place, once per cached result, so that no second tensor of the result's
        size is allocated; a result that shares memory with a factor (which may be autograd's
        own gradient) is copied instead.
        """
        value = self._per_call(primitive, source, **kwargs)[0]
        if self.scale == 1.0:
            return value
        key = ("scaled", id(value))
        if key not in self.cache:
            factors = self.factors[as_source(source)][self.uses[0][0].calls[0]]
            shared = any(_same_memory(value, f) for f in factors)
            scale = self.scale**power
            self.cache[key] = value * scale if shared else value.mul_(scale)
        return self.cache[key]

    def _single_call(self) -> bool:
        return sum(len(owner.calls) for owner, _ in self.uses) == 1

    def jac_t(self, source: Source) -> Tensor:
        r"""Per-sample parameter VJPs :math:`J_n^\top F_{mn}`, ``[M, N, *p]`` (a new tensor)."""
        values = self._per_call("jac_t", source, consume=True)
        if not values:
            return self._zeros(self._columns(source), self.num_samples)
        out = sum(values[1:], values[0])
        return out if self.scale == 1.0 else out.mul_(self.scale)

    def sum_jac_t(self, source: Source) -> Tensor:
        r""":math:`\sum_n J_n^\top F_{mn}`, ``[M, *p]``."""
        values = self._per_call("sum_jac_t", source)
        if not values:
            return self._zeros(self._columns(source))
        return self._scaled(sum(values[1:], values[0]), 1)

    def sum_sq(self, source: Source, per_sample: bool) -> Tensor:
        r""":math:`\sum_m (J_n^\top F_{mn})^{\odot 2}`: ``[N, *p]``, or also summed over ``n``.

        Factored per rule for a single call; several calls of a shared module first sum their
        VJPs (the cross terms between calls count).
        """
        if not self.uses:
            return self._zeros(self.num_samples) if per_sample else self._zeros()
        if self._single_call():
            return self._single_scaled("sum_sq_jac_t", source, 2, per_sample=per_sample)
        sq = self.jac_t(source).square().sum(0)
        return sq if per_sample else sq.sum(0)

    def sq_norm(self, source: Source) -> Tensor:
        r""":math:`\lVert J_n^\top F_{mn} \rVert^2`, ``[M, N]``."""
        if not self.uses:
            return self.param.new_zeros(self._columns(source), self.num_samples)
        if self._single_call():
            return self._single_scaled("sq_norm_jac_t", source, 2)
        return self.jac_t(source).flatten(start_dim=2).square().sum(-1)

    def factored(self) -> bool:
        r"""Whether the per-sample VJPs are outer products (:meth:`Rule.factored_per_sample`).

        ``True`` only for a single call whose rule says so (a ``Linear`` layer without
        positions): then :meth:`sq_norm`, :meth:`gram`, :meth:`dot` and :meth:`sample` never
        form ``[M, N, *p]``.
        """
        if not self.uses or not self._single_call():
            return False
        owner = self.uses[0][0]
        return owner.rule.factored_per_sample(owner.module, owner.calls[0])

    def positions(self, source: Source) -> int:
        r"""Output positions :math:`T` per sample over which the parameter is shared.

        Factor entries per sample and column over the parameter's first dimension (a weight's
        output channels): ``1`` for a ``Linear`` layer without positions, the output's spatial
        size for a convolution. Summed over the calls of a shared module.
        """
        source = as_source(source)
        channels = self.shape[0] if len(self.shape) else 1
        total = 0
        for owner, _ in self.uses:
            for call in owner.calls:
                factor = self.factors[source][call][0]
                total += factor.numel() // max(1, factor.shape[0] * factor.shape[1] * channels)
        return max(1, total)

    def gram(self, source: Source) -> Tensor:
        r"""Gram matrix of the VJPs :math:`\langle J_n^\top F_{mn}, J_{n'}^\top F_{m'n'} \rangle`.

        ``[M, N, M, N]``, by the rule's :meth:`~curvlab.backprop.rules.base.Rule.gram` (factored
        where it has a factored form) for a single call, from the summed VJPs otherwise.
        """
        if not self.uses:
            m, n = self._columns(source), self.num_samples
            return self.param.new_zeros(m, n, m, n)
        if self._single_call():
            return self._single_scaled("gram", source, 2)
        vjp = self.jac_t(source).flatten(start_dim=2)
        return torch.einsum("mnp,kqp->mnkq", vjp, vjp)

    def cross_gram(self, source: Source, other: ParamDerivatives) -> Tensor:
        r"""Dot products with another pass's VJPs of the parameter, :math:`\langle J_n^\top F_{mn}, J'^\top_{q} F'_{kq} \rangle`.

        ``other`` is a view of the same parameter from another forward and backward (another
        batch, e.g. the previous step's, kept by a quantity). When both are :meth:`factored`
        (outer products :math:`F_{mn} x_n^\top` of the factor and the call's input, a ``Linear``
        layer without positions), :math:`(F_{mn}^\top F'_{kq})(x_n^\top x'_q)`:
        :math:`N N' (\text{in} + \text{out})` multiply-adds, no per-sample gradients;
        otherwise from both VJPs.

        Returns:
            ``[M, N, M', N']``.
        """
        source = as_source(source)
        if self.factored() and other.factored():
            mine, theirs = self.uses[0][0].calls[0], other.uses[0][0].calls[0]
            f = self.factors[source][mine][0].flatten(start_dim=2)  # [M, N, out]
            h = other.factors[source][theirs][0].flatten(start_dim=2)
            with torch.no_grad():
                out = torch.einsum("mno,kqo->mnkq", f, h)
                if len(self.shape) > 1:
                    x = mine.args[0].reshape(f.shape[1], -1)
                    y = theirs.args[0].reshape(h.shape[1], -1)
                    out = out * (x @ y.T)[None, :, None, :]
            return out * (self.scale * other.scale)
        a = self.jac_t(source).flatten(start_dim=2)
        b = other.jac_t(source).flatten(start_dim=2)
        return torch.einsum("mnp,kqp->mnkq", a, b)

    def dot(self, source: Source, vectors: Tensor) -> Tensor:
        r"""Per-sample dot products :math:`\langle J_n^\top F_{mn}, v_k \rangle = \langle F_{mn}, J_n v_k \rangle`.

        Through the rules' :meth:`~curvlab.backprop.rules.base.Rule.jvp` (for a ``Linear`` layer
        one product of the inputs with :math:`v_k`, for a convolution one convolution of the
        inputs with :math:`v_k` as its weight): no ``[M, N, *p]`` tensor. Reads the stored
        factors and inputs without consuming them, so it may run after the pass, as long as
        they are kept (e.g. by a quantity's partial value).

        Args:
            source: The factor.
            vectors: ``[K, *p]``.

        Returns:
            ``[M, N, K]``.
        """
        source = as_source(source)
        k = vectors.shape[0]
        out = self.param.new_zeros(self._columns(source), self.num_samples, k)
        with torch.no_grad():
            for owner, local in self.uses:
                for call in owner.calls:
                    tangents = owner.rule.jvp(owner.module, call, local, vectors)
                    for f, t in zip(self.factors[source][call], tangents, strict=True):
                        out += torch.einsum("mn...,kn...->mnk", f, t)
        return self._scaled(out, 1)

    def sample(self, source: Source, samples: Tensor, elements: Tensor) -> Tensor:
        r"""Chosen elements :math:`(J_{n_b}^\top F_{m n_b})_{j_b}` of the per-sample VJPs, ``[M, B]``.

        By the rules' :meth:`~curvlab.backprop.rules.base.Rule.sample_jac_t` (``O(M)`` per
        element for a ``Linear`` layer, a dot over the positions for a convolution), summed
        over calls. Not cached.

        Args:
            source: The factor.
            samples: Sample indices :math:`n_b`, ``[B]``.
            elements: Flat (row-major) parameter indices :math:`j_b`, ``[B]``.
        """
        source = as_source(source)
        out = self.param.new_zeros(self._columns(source), samples.shape[0])
        with torch.no_grad():
            for owner, local in self.uses:
                for call in owner.calls:
                    factors = self.factors[source][call]
                    out += owner.rule.sample_jac_t(
                        owner.module, call, factors, local, samples, elements
                    )
        return self._scaled(out, 1)

    def sample_block(
        self, source: Source, samples: Tensor, rows: Tensor, columns: Tensor
    ) -> Tensor:
        r"""Per-sample sub-blocks of the VJPs viewed as ``[p_0, p / p_0]``, ``[M, S, R, C]``.

        By the rules' :meth:`~curvlab.backprop.rules.base.Rule.sample_block_jac_t` (for a
        ``Linear`` layer the outer product of ``R`` output gradients and ``C`` inputs per
        sample; for a convolution ``C`` gathered patch rows per sample), summed over calls.

        Args:
            source: The factor.
            samples: :math:`n_s`, ``[S]``.
            rows: Row indices per chosen sample, ``[S, R]``.
            columns: Column indices per chosen sample, ``[S, C]``.
        """
        source = as_source(source)
        s, r, c = samples.shape[0], rows.shape[1], columns.shape[1]
        out = self.param.new_zeros(self._columns(source), s, r, c)
        with torch.no_grad():
            for owner, local in self.uses:
                for call in owner.calls:
                    factors = self.factors[source][call]
                    out += owner.rule.sample_block_jac_t(
                        owner.module, call, factors, local, samples, rows, columns
                    )
        return self._scaled(out, 1)

    def selectable(self) -> bool:
        """Whether :meth:`select` applies: every call's outputs carry the batch first."""
        from curvlab.backprop.functional import output_batch_dims

        return all(
            all(d == 0 for d in output_batch_dims(owner.module, len(call.outputs)))
            for owner, _ in self.uses
            for call in owner.calls
        )

    def select(self, index: Tensor) -> ParamDerivatives:
        r"""The same derivatives on the samples ``index`` only, a view of ``S`` samples.

        The factors ``[M, N, *out]`` and the calls' batched inputs and outputs (along their
        batch dimensions, :func:`~curvlab.backprop.functional.input_batch_dims`) are
        index-selected, so that every primitive of the returned view sees a batch of ``S``
        samples and costs that many. The views of one module's parameters that share a
        ``cache`` share the selection (and one rule call still serves them all). Inputs are
        copied (``S`` rows each), the original view is unchanged.

        Args:
            index: Sample indices ``[S]`` into the batch of ``N``.

        Raises:
            ValueError: For a call whose outputs carry the batch elsewhere
                (:meth:`selectable`, e.g. a recurrent layer's ``[T, N, H]``).
        """
        from curvlab.backprop.functional import input_batch_dims

        if not self.selectable():
            raise ValueError(
                f"parameter {self.name!r}: select() needs module outputs with the batch first"
            )
        key = ("select", index.data_ptr(), index.numel())
        memo = self.cache.get(key)
        if memo is None:
            memo = self.cache[key] = {"cache": {}, "owners": {}, "calls": {}}
        n = self.num_samples

        def pick(t: Any, dim: Any) -> Any:
            if dim is None or not isinstance(t, Tensor) or t.dim() <= dim or t.shape[dim] != n:
                return t
            return t.index_select(dim, index.to(t.device))

        def tree(values: Any, dims: Any) -> Any:
            leaves, spec = tree_flatten(values)
            flat_dims, _ = tree_flatten(dims)
            return tree_unflatten([pick(a, d) for a, d in zip(leaves, flat_dims)], spec)

        uses = []
        for owner, local in self.uses:
            new = memo["owners"].get(owner)
            if new is None:
                calls = []
                for call in owner.calls:
                    args_dims, kwargs_dims = input_batch_dims(
                        owner.module, call.args, call.kwargs, n
                    )
                    calls.append(
                        replace(
                            call,
                            args=tree(call.args, args_dims),
                            kwargs=tree(call.kwargs, kwargs_dims),
                            values=tuple(pick(v, 0) for v in call.values),
                        )
                    )
                    memo["calls"][call] = calls[-1]
                new = Owner(owner.name, owner.module, calls)
                new.local_names, new.rule, new.kron_rule = (
                    owner.local_names,
                    owner.rule,
                    owner.kron_rule,
                )
                new.generic_names = owner.generic_names
                memo["owners"][owner] = new
            uses.append((new, local))
        factors = {
            source: {
                memo["calls"][call]: tuple(f.index_select(1, index.to(f.device)) for f in fs)
                for call, fs in by_call.items()
                if call in memo["calls"]
            }
            for source, by_call in self.factors.items()
        }
        return ParamDerivatives(
            self.name,
            uses,
            factors,
            self.param,
            index.numel(),
            memo["cache"],
            self.scale,
        )

    def kron_kind(self) -> str:
        """The Kronecker layout of the parameter's rule, or ``"whole"`` (no Kronecker rule)."""
        if not self.uses or any(owner.kron_rule is None for owner, _ in self.uses):
            return "whole"
        return self.uses[0][0].kron_rule.kron_kind

    def groups(self) -> int:
        """Groups of the (first) module that uses the parameter (``1`` unless grouped)."""
        return getattr(self.uses[0][0].module, "groups", 1) if self.uses else 1

    def kron(self, source: Source, approx: str = "expand", local: str | None = None) -> KronSums:
        r"""Kronecker statistics summed over calls (several calls count as more positions).

        A parameter of a module without a Kronecker rule (a generic module) gets its whole
        GGN block as a single output-side factor, :math:`\sum_{m,n} v_{mn} v_{mn}^\top` with
        :math:`v_{mn} = J_n^\top F_{mn}` flattened, as normalization layers do.

        Args:
            source: The factor.
            approx: ``"expand"`` or ``"reduce"`` (weights shared over positions).
            local: Another parameter of the same module (by its local name), for joint blocks.
        """
        if self.kron_kind() == "whole" and local is None:
            if any(owner.kron_rule is None for owner, _ in self.uses):
                vjp = self.jac_t(source).flatten(end_dim=1).flatten(start_dim=1)  # [M*N, P]
                return KronSums(None, self.num_samples, vjp.T @ vjp)
        values = self._per_call("kron_sums", source, local=local, approx=approx)
        if len(values) == 1:  # no copy
            v = values[0]
            return KronSums(
                v.input_sum, v.input_count, self._scaled(v.output_sum, 2), v.input_total
            )
        input_sum = input_total = None
        if values[0].input_sum is not None:
            input_sum = sum(v.input_sum for v in values)
            input_total = sum(v.input_total for v in values)
        return KronSums(
            input_sum,
            sum(v.input_count for v in values),
            self._scaled(sum(v.output_sum for v in values), 2),
            input_total,
        )

    def matmul(self, source: Source, vectors: Tensor) -> Tensor:
        r"""Unscaled block product :math:`\sum_{m,n} J_n^\top F_{mn} \langle F_{mn}, J_n v\rangle`.

        Args:
            source: The factor.
            vectors: ``[*p]`` or ``[K, *p]``.

        Returns:
            The product, shaped like ``vectors``.
        """
        source = as_source(source)
        single = vectors.shape == self.shape
        v = vectors.unsqueeze(0) if single else vectors
        k = v.shape[0]
        if not self.uses:
            return torch.zeros_like(vectors)
        weights = None  # [K, M, N]: sum over calls of <F_c, J_c v>
        calls = [(owner, local, call) for owner, local in self.uses for call in owner.calls]
        with torch.no_grad():
            for owner, local, call in calls:
                tangents = owner.rule.jvp(owner.module, call, local, v)
                factors = self.factors[source][call]
                for f, t in zip(factors, tangents, strict=True):
                    w = torch.einsum("mn...,kn...->kmn", f, t)
                    weights = w if weights is None else weights + w
            out = torch.zeros_like(v)
            for owner, local, call in calls:
                factors = self.factors[source][call]
                m = factors[0].shape[0]
                scaled = tuple(
                    (f.unsqueeze(0) * weights.reshape(k, m, -1, *[1] * (f.dim() - 2))).flatten(
                        end_dim=1
                    )
                    for f in factors
                )
                vjp = owner.rule.sum_jac_t(owner.module, call, scaled, [local])[local]
                out = out + vjp.reshape(k, m, *self.shape).sum(1)
        out = self._scaled(out, 2)
        return out[0] if single else out


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors share storage (a view of the other, or the same tensor)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
