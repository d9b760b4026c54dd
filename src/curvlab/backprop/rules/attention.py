r"""Rule for ``nn.MultiheadAttention`` (batch-first, packed in-projection): two linear layers.

Multi-head attention is linear in its parameters around a parameter-free core:

.. math::

    [q;k;v]_{nt} = W_{\mathrm{in}} x_{nt} + b_{\mathrm{in}}, \qquad
    a_n = \mathrm{attention}(q_n, k_n, v_n), \qquad
    y_{nt} = W_{\mathrm{o}} a_{nt} + b_{\mathrm{o}},

with :math:`T` sequence positions sharing the weights. So a factor :math:`F` at the output gives
the out-projection's derivatives as a ``Linear`` layer with inputs :math:`a` and output factor
:math:`F`, and the in-projection's as a ``Linear`` layer with inputs :math:`x` and output factor
:math:`[\partial q; \partial k; \partial v]`, the VJP of :math:`F W_{\mathrm{o}}` through the
attention core (one batched backward over the ``M`` columns; the core treats samples
independently, so no per-sample loop). Every reduction and the Kronecker factors then come from
:class:`~curvlab.backprop.rules.linear.LinearRule`'s factored forms. The core is recomputed from
the recorded inputs and checked against the recorded output.

Covered: self-attention (``query``, ``key`` and ``value`` the same tensor), ``batch_first=True``,
``attn_mask`` / ``key_padding_mask`` (boolean or additive), ``is_causal``, no dropout in training
mode, no ``add_bias_kv`` / ``add_zero_attn``, ``kdim == vdim == embed_dim``. Anything else uses
the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.backprop.rules.base import Call, KronSums, Rule
from curvlab.backprop.rules.linear import LinearRule

_LINEAR = LinearRule()

IN_PROJ = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
OUT_PROJ = {"out_proj.weight": "weight", "out_proj.bias": "bias"}


def softmax_hessian_forms(probs: Tensor, grad_probs: Tensor, u: Tensor) -> Tensor:
    r"""Quadratic forms :math:`u_j^\top R_t u_j` of the softmax residual, per row ``t``.

    For one row :math:`p = \mathrm{softmax}(s)` with output gradient :math:`g`,
    :math:`R = \sum_k g_k \nabla_s^2 p_k = \mathrm{diag}(p \odot (g - \bar g))
    - (g \odot p) p^\top - p (g \odot p)^\top + 2 \bar g\, p p^\top`,
    :math:`\bar g = p^\top g` (diagonal plus rank three), so
    :math:`u^\top R u = \sum_s p_s (g_s - \bar g) u_s^2 - 2 (u^\top (g \odot p))(u^\top p)
    + 2 \bar g (u^\top p)^2`.

    Args:
        probs: :math:`p` ``[..., T, S]`` (rows ``t`` over ``S`` keys).
        grad_probs: :math:`g` ``[..., T, S]``.
        u: Vectors over the keys ``[..., S, J]``, shared by the rows.

    Returns:
        ``[..., T, J]``.
    """
    weighted = grad_probs * probs
    mean = weighted.sum(-1, keepdim=True)
    along_p = probs @ u
    forms = (weighted - mean * probs) @ u.square()
    return forms - 2 * (weighted @ u) * along_p + 2 * mean * along_p.square()


@dataclass(frozen=True)
class _LinearShape:
    """What :class:`LinearRule` reads of a module: its feature sizes."""

    in_features: int
    out_features: int


def _query(call: Call) -> Tensor:
    return call.args[0] if call.args else call.kwargs["query"]


def _argument(call: Call, name: str, position: int):
    if len(call.args) > position:
        return call.args[position]
    return call.kwargs.get(name)


def _is_self_attention(call: Call) -> bool:
    q, k, v = (_argument(call, n, i) for i, n in enumerate(("query", "key", "value")))
    return all(isinstance(t, Tensor) for t in (q, k, v)) and (
        q.data_ptr() == k.data_ptr() == v.data_ptr() and q.shape == k.shape == v.shape
    )


def _additive(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """An MHA mask (boolean: ``True`` = masked out; or additive) as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def _mask(module: nn.MultiheadAttention, call: Call, q: Tensor) -> Tensor | None:
    """The combined additive mask ``[N, H, T, S]`` (or ``None``) for the attention core."""
    n, t = q.shape[:2]
    h = module.num_heads
    attn_mask = _additive(_argument(call, "attn_mask", 5), q)
    padding = _additive(_argument(call, "key_padding_mask", 3), q)
    if _argument(call, "is_causal", 7) and attn_mask is None:
        attn_mask = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape(n, h, t, -1) if attn_mask.dim() == 3 else attn_mask
    if padding is not None:
        pad = padding.reshape(n, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


class AttentionRule(Rule):
    """Derivatives of ``nn.MultiheadAttention`` (see the module docstring)."""

    kronecker = True
    kron_kind = "rows"
    channels_last = True
    claims = tuple(OUT_PROJ)
    linear_in_params = False  # the softmax of q k^T: queries and keys enter nonlinearly

    def applies(self, module: nn.Module, calls: list[Call]) -> bool:
        """Whether every call is a case this rule covers (else the generic path runs)."""
        if not isinstance(module, nn.MultiheadAttention):
            return False
        if not (
            module._qkv_same_embed_dim and module.batch_first and module.in_proj_bias is not None
        ):
            return False
        if module.bias_k is not None or module.add_zero_attn or module.out_proj.bias is None:
            return False
        if module.dropout > 0 and module.training:
            return False
        for call in calls:
            if _query(call).dim() != 3 or not _is_self_attention(call) or not call.outputs:
                return False
            with torch.no_grad():
                _, _, a = self._core(module, call)
                out = F.linear(a, module.out_proj.weight, module.out_proj.bias)
            if not torch.allclose(out, call.outputs[0].detach(), rtol=1e-4, atol=1e-5):
                return False  # a variant this recomputation does not model
        return True

    # ------------------------------------------------------------------ the linear views
    def _core(self, module: nn.MultiheadAttention, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, qkv, a)``: the input, the projections (attached) and the core's output."""
        x = _query(call)
        n, t, e = x.shape
        h = module.num_heads
        with torch.enable_grad():
            qkv = F.linear(x, module.in_proj_weight.detach(), module.in_proj_bias.detach())
            qkv.requires_grad_(True)
            q, k, v = (p.reshape(n, t, h, e // h).transpose(1, 2) for p in qkv.chunk(3, dim=-1))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(module, call, x))
            a = a.transpose(1, 2).reshape(n, t, e)
        return x, qkv, a

    def _views(self, module: nn.MultiheadAttention, call: Call, factors: tuple[Tensor, ...]):
        """The two linear layers' ``(shape, call, factors)`` for the factor at the output."""
        if len(factors) > 1 and bool(factors[1].any()):
            raise NotImplementedError("the loss depends on the attention weights (need_weights)")
        f = factors[0]  # [M, N, T, E]
        w_out = module.out_proj.weight.detach()
        if f.shape[0] == 1:  # one column: a plain backward through the fused kernel
            x, qkv, a = self._core(module, call)
            (d_qkv,) = torch.autograd.grad(a, qkv, (f[0] @ w_out))
            d_qkv = d_qkv.unsqueeze(0)
        else:  # the math kernel has batching rules for the vmapped backward
            with sdpa_kernel([SDPBackend.MATH]):
                x, qkv, a = self._core(module, call)
                (d_qkv,) = torch.autograd.grad(a, qkv, f @ w_out, is_grads_batched=True)
        e = module.embed_dim
        return (
            (_LinearShape(e, 3 * e), Call(args=(x,)), (d_qkv,)),
            (_LinearShape(e, e), Call(args=(a.detach(),)), (f,)),
        )

    def _apply(self, primitive: str, module, call, factors, names: list[str], **kwargs) -> dict:
        out = {}
        for (shape, view, fs), mapping in zip(
            self._views(module, call, factors), (IN_PROJ, OUT_PROJ), strict=True
        ):
            local = [mapping[n] for n in names if n in mapping]
            if not local:
                continue
            values = getattr(_LINEAR, primitive)(shape, view, fs, local, **kwargs)
            out.update({n: values[mapping[n]] for n in names if n in mapping})
        return out

    def jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        return self._reshaped(module, self._apply("jac_t", module, call, factors, names), 2)

    def sum_jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        return self._reshaped(module, self._apply("sum_jac_t", module, call, factors, names), 1)

    def sum_sq_jac_t(  # noqa: D102
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        per_sample: bool,
    ) -> dict[str, Tensor]:
        values = self._apply("sum_sq_jac_t", module, call, factors, names, per_sample=per_sample)
        return self._reshaped(module, values, 1 if per_sample else 0)

    def sq_norm_jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        return self._apply("sq_norm_jac_t", module, call, factors, names)

    def kron_sums(  # noqa: D102
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        approx: str = "expand",
    ) -> dict[str, KronSums]:
        return self._apply("kron_sums", module, call, factors, names, approx=approx)

    @staticmethod
    def _reshaped(module: nn.Module, values: dict[str, Tensor], lead: int) -> dict[str, Tensor]:
        """Results in the parameters' own shapes (the linear views use the same ones)."""
        params = dict(module.named_parameters())
        return {k: v.reshape(*v.shape[:lead], *params[k].shape) for k, v in values.items()}
