r"""Exact Hessian diagonals through a whole ``nn.TransformerEncoderLayer`` (no HVPs).

The Hessian diagonal is the GGN's plus, for every nonlinear operation :math:`y = f(u)` between a
parameter and the loss, :math:`\mathrm{diag}(J_{\theta u}^\top R\, J_{\theta u})` with the
residual :math:`R = \sum_k (\partial \ell / \partial y_k) \nabla_u^2 f_k`. In a post-norm encoder
layer with a ReLU feed-forward block,

.. math::
    a = \mathrm{attn}(x), \quad u_1 = x + W_o a + b_o, \quad x_1 = \mathrm{LN}_1(u_1), \quad
    u_2 = x_1 + W_2\, \mathrm{relu}(W_1 x_1 + b_1) + b_2, \quad y = \mathrm{LN}_2(u_2),

the nonlinear operations are the two layer norms, the softmax and the bilinear products
:math:`q k^\top` and :math:`P v` (ReLU's second derivative vanishes; GELU's adds
:math:`\mathrm{diag}(\phi'' \odot \partial\ell/\partial h)` at the hidden layer, pulled back as
:math:`W_1^\top \mathrm{diag}(\cdot) W_1` by a second ``[N T, ff] @ [ff, D D]`` product). The bilinear products add
nothing to the diagonal: no single parameter enters both factors. Everything after the attention
core acts on each position separately, so the layer norms' residuals pulled back to any point
there are *position-local* blocks :math:`B_t` (``[D, D]`` per sample and position):

.. math::
    B^{u_2}_t = R^{\mathrm{LN}_2}_t, \quad B^{x_1}_t = K_t^\top B^{u_2}_t K_t, \quad
    B^{u_1}_t = J_t^\top B^{x_1}_t J_t + R^{\mathrm{LN}_1}_t, \quad
    B^{a}_t = W_o^\top B^{u_1}_t W_o,

with :math:`K_t = I + W_2 \mathrm{diag}(\mathrm{relu}'_t) W_1` (one product
``[N T, ff] @ [ff, D D]`` for all positions) and :math:`J_t` the first layer norm's Jacobian. A
``Linear`` layer applied per position reads its residual through :math:`\sum_t x_t^2
\mathrm{diag}(B_t)`. The in-projection reads the attention output's blocks through the core's
Jacobian, which is cheap per position: :math:`a_t` depends on :math:`q_t` only through row
:math:`t` (:math:`\partial a_t / \partial q_t = d^{-1/2} \sum_s P_{ts} (v_s - a_t) k_s^\top`),
on :math:`k_s` through a rank-one term and on :math:`v_s` through :math:`P_{ts} I`; the softmax
residual enters the query and key weights by its quadratic forms
(:func:`~curvlab.backprop.rules.attention.softmax_hessian_forms`). The key bias has a zero
Hessian (softmax is shift invariant).

:class:`EncoderResiduals` holds these residual diagonals for the layer's parameters; the GGN part
comes from the engine's exact factors as for every other module. The route applies when the
layer's input carries no parameters upstream and the graph after it is linear
(:func:`encoder_route`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.backprop.rules.activation import activation_derivatives
from curvlab.backprop.rules.attention import (
    AttentionRule,
    _mask,
    _query,
    softmax_hessian_forms,
)
from curvlab.backprop.rules.base import Call
from curvlab.backprop.rules.norm import layer_norm_input_hessian, layer_norm_statistics

CHUNK_ELEMENTS = 2**20
"""Budget (elements) of the position-local ``[n, T, D, D]`` blocks of one chunk of samples: chunks
that stay in cache are faster on the CPU than the whole batch at once."""


def encoder_obstacle(module: nn.Module, call: Call) -> str | None:
    """Why :class:`EncoderResiduals` does not cover this encoder-layer call, or ``None``."""
    if not isinstance(module, nn.TransformerEncoderLayer):
        return "not a TransformerEncoderLayer"
    att = module.self_attn
    checks = {
        "norm_first=True": module.norm_first,
        "batch_first=False": not att.batch_first,
        "an activation other than ReLU or GELU": module.activation_relu_or_gelu not in (1, 2),
        "dropout in training mode": module.training
        and any(m.p > 0 for m in module.modules() if isinstance(m, nn.Dropout)),
        "a separate key/value projection or add_bias_kv / add_zero_attn": (
            not att._qkv_same_embed_dim or att.bias_k is not None or att.add_zero_attn
        ),
        "layers without bias": any(
            t is None
            for t in (
                att.in_proj_bias,
                att.out_proj.bias,
                module.linear1.bias,
                module.linear2.bias,
                module.norm1.weight,
                module.norm1.bias,
                module.norm2.weight,
                module.norm2.bias,
            )
        ),
        "a mask or is_causal": len(call.args) != 1
        or any(v is not None and v is not False for v in call.kwargs.values()),
        "an input that depends on parameters": bool(call.graph_inputs)
        and call.graph_inputs[0].requires_grad,
    }
    reasons = [reason for reason, failed in checks.items() if failed]
    return None if not reasons else ", ".join(reasons)


def _layer_norm(module: nn.LayerNorm, u: Tensor) -> Tensor:
    """The layer norm with its parameters detached (and no module hooks run)."""
    weight, bias = module.weight.detach(), module.bias.detach()
    return F.layer_norm(u, module.normalized_shape, weight, bias, module.eps)


def _activation_module(module: nn.TransformerEncoderLayer) -> nn.Module:
    """The feed-forward activation as a module (``nn.ReLU`` or ``nn.GELU``)."""
    act = module.activation
    if isinstance(act, (nn.ReLU, nn.GELU)):
        return act
    return nn.ReLU() if act is F.relu else nn.GELU()


def _activate(act: nn.Module, z: Tensor) -> Tensor:
    """``act(z)`` by its functional form (no module hooks run)."""
    return F.relu(z) if isinstance(act, nn.ReLU) else F.gelu(z, approximate=act.approximate)


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[N, T, D]`` as ``[N, H, T, D / H]`` (contiguous: products with it keep that layout)."""
    n, length, d = t.shape
    return t.reshape(n, length, heads, d // heads).transpose(1, 2).contiguous()


class EncoderResiduals:
    r"""Residual Hessian diagonals of one encoder-layer call (see the module docstring).

    Args:
        module: The ``nn.TransformerEncoderLayer`` (checked with :func:`encoder_obstacle`).
        call: Its recorded call; ``call.args[0]`` is the input ``[N, T, D]``.
        grad_out: Per-sample :math:`\partial \ell_n / \partial y` at its output ``[N, T, D]``.

    Raises:
        RuntimeError: If the recomputed layer does not reproduce the recorded output.
    """

    def __init__(self, module: nn.TransformerEncoderLayer, call: Call, grad_out: Tensor) -> None:
        self.module = module
        self.activation = _activation_module(module)
        self._state = self._forward(call, grad_out.detach())
        self._values: dict[bool, dict[str, Tensor]] = {}

    def _forward(self, call: Call, grad_out: Tensor) -> dict[str, Tensor]:
        """Recompute the layer's intermediates and the gradients the residuals need."""
        mod, x = self.module, call.args[0].detach()
        att, heads = mod.self_attn, mod.self_attn.num_heads
        d = x.shape[-1]
        with torch.enable_grad():
            qkv = F.linear(x, att.in_proj_weight.detach(), att.in_proj_bias.detach())
            q, k, v = qkv.split(d, -1)
            qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(d // heads)
            probs = scores.softmax(-1).requires_grad_()
            a = (probs @ vh).transpose(1, 2).reshape(x.shape)
            u1 = x + F.linear(a, att.out_proj.weight.detach(), att.out_proj.bias.detach())
            x1 = _layer_norm(mod.norm1, u1)
            z1 = F.linear(x1, mod.linear1.weight.detach(), mod.linear1.bias.detach())
            hidden = _activate(self.activation, z1)
            u2 = x1 + F.linear(hidden, mod.linear2.weight.detach(), mod.linear2.bias.detach())
            y = _layer_norm(mod.norm2, u2)
            grad_probs, grad_x1, grad_hidden = torch.autograd.grad(y, [probs, x1, hidden], grad_out)
        recorded = call.outputs[0].detach()
        if not torch.allclose(y.detach(), recorded, rtol=1e-4, atol=1e-5 * recorded.abs().max()):
            raise RuntimeError(
                "EncoderResiduals: the recomputed TransformerEncoderLayer does not reproduce "
                "its recorded output"
            )
        return {
            "x": x,
            "qh": qh,
            "kh": kh,
            "vh": vh,
            "probs": probs.detach(),
            "a": a.detach(),
            "u1": u1.detach(),
            "x1": x1.detach(),
            "z1": z1.detach(),
            "u2": u2.detach(),
            "grad_out": grad_out,
            "grad_probs": grad_probs,
            "grad_x1": grad_x1,
            "hidden": hidden.detach(),
            "grad_hidden": grad_hidden,
        }

    def values(self, per_sample: bool) -> dict[str, Tensor]:
        """Residual diagonals by local parameter name: ``[N, *p]`` per sample, else ``[*p]``."""
        if per_sample not in self._values:
            self._values[per_sample] = self._compute(per_sample)
        return self._values[per_sample]

    def _compute(self, per_sample: bool) -> dict[str, Tensor]:
        """:meth:`_chunk` over chunks of samples (temporaries of about ``CHUNK_ELEMENTS``)."""
        n, length, d = self._state["x"].shape
        step = max(1, CHUNK_ELEMENTS // (length * d * d))
        parts = []
        for start in range(0, n, step):
            chunk = {k: v[start : start + step] for k, v in self._state.items()}
            parts.append(self._chunk(chunk, per_sample))
        if len(parts) == 1:
            return parts[0]
        if per_sample:
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: sum(p[k] for p in parts[1:]).add_(parts[0][k]) for k in parts[0]}

    def _chunk(self, s: dict[str, Tensor], per_sample: bool) -> dict[str, Tensor]:
        """The residual diagonals of one chunk of samples (see the module docstring)."""
        mod = self.module
        att = mod.self_attn
        x, probs, a = s["x"], s["probs"], s["a"]
        n, length, d = x.shape
        heads = att.num_heads
        dh = d // heads
        w_o = att.out_proj.weight.detach()
        w1, w2 = mod.linear1.weight.detach(), mod.linear2.weight.detach()
        ln1, ln2 = mod.norm1.weight.detach(), mod.norm2.weight.detach()
        lead = "n" if per_sample else ""

        def outer(left: Tensor, right: Tensor) -> Tensor:  # sum_t left_ti right_tj
            return torch.einsum(f"nti,ntj->{lead}ij", left, right)

        def total(t: Tensor, dims: tuple[int, ...]) -> Tensor:
            return t.sum(dims) if per_sample else t.sum((0, *dims))

        out: dict[str, Tensor] = {}
        nt, ff = n * length, w1.shape[0]
        # the second layer norm's residual R2 = alpha P + V S V^T and the feed-forward block
        xhat2, sigma2 = layer_norm_statistics(mod.norm2, s["u2"])
        r2 = layer_norm_input_hessian(xhat2, sigma2, ln2, s["grad_out"])
        diag_u2 = r2.diagonal()  # [N, T, D]
        slope, curvature = activation_derivatives(self.activation, s["z1"])  # phi', phi''
        rho = None if isinstance(self.activation, nn.ReLU) else curvature * s["grad_hidden"]
        out["linear2.weight"] = outer(diag_u2, s["hidden"].square())
        out["linear2.bias"] = total(diag_u2, (1,))
        projected_norms = ((w2 - w2.mean(0)) * w2).sum(0)  # w2_k^T P w2_k  [ff]
        low = r2.vectors.mT @ w2  # V^T W2  [N, T, 2, ff]
        diag_z1 = r2.alpha[..., 0] * projected_norms + ((r2.core @ low) * low).sum(-2)
        diag_z1 = diag_z1 * slope.square()  # diag of phi' W2^T R2 W2 phi' (+ the residual)
        diag_z1 = diag_z1 if rho is None else diag_z1 + rho
        out["linear1.weight"] = outer(diag_z1, s["x1"].square())
        out["linear1.bias"] = total(diag_z1, (1,))
        # B_x1 = K^T R2 K = alpha (K^T K - k k^T / D) + (K^T V) S (K^T V)^T,  k = K^T 1
        paths = (w2.T[:, :, None] * w1[:, None, :]).reshape(ff, d * d)  # W2[i,k] W1[k,j]
        jac_ff = (slope.reshape(nt, ff) @ paths).view(nt, d, d)
        jac_ff.diagonal(dim1=-2, dim2=-1).add_(1.0)  # K = I + W2 diag(relu') W1
        ones = x.new_ones(nt, d, 1)
        pulled = torch.bmm(jac_ff.mT, torch.cat([r2.vectors.reshape(nt, d, 2), ones], -1))
        block = torch.bmm(jac_ff.mT, jac_ff)
        del jac_ff
        alpha = r2.alpha.reshape(nt, 1, 1)
        block.mul_(alpha)
        core = x.new_zeros(nt, 3, 3)
        core[:, :2, :2] = r2.core.reshape(nt, 2, 2)
        core[:, 2:, 2:] = -alpha / d
        block.baddbmm_(pulled @ core, pulled.mT)  # [N T, D, D]: B_x1
        if rho is not None:  # + W1^T diag(phi'' g_h) W1
            pairs = (w1[:, :, None] * w1[:, None, :]).reshape(ff, d * d)
            block.add_((rho.reshape(nt, ff) @ pairs).view(nt, d, d))
        diag_x1 = block.diagonal(dim1=-2, dim2=-1).reshape(n, length, d)
        xhat1, sigma1 = layer_norm_statistics(mod.norm1, s["u1"])
        out["norm1.weight"] = total(diag_x1 * xhat1.square(), (1,))
        out["norm1.bias"] = total(diag_x1, (1,))
        # B_u1 = J^T B_x1 J + R1, J = diag(w) Q / sigma, Q = I - E E^T / D, E = [1, xhat]
        block.mul_(ln1[:, None] * ln1[None, :])
        frame = torch.cat([ones, xhat1.reshape(nt, d, 1)], -1)  # E  [N T, D, 2]
        block.baddbmm_(frame, torch.bmm(frame.mT, block), alpha=-1.0 / d)
        block.baddbmm_(torch.bmm(block, frame), frame.mT, alpha=-1.0 / d)
        block.mul_(sigma1.reshape(nt, 1, 1).square().reciprocal())
        r1 = layer_norm_input_hessian(xhat1, sigma1, ln1, s["grad_x1"])
        alpha = r1.alpha.reshape(nt, 1, 1)
        block.diagonal(dim1=-2, dim2=-1).add_(alpha[..., 0])
        core = x.new_zeros(nt, 3, 3)
        core[:, :2, :2] = r1.core.reshape(nt, 2, 2)
        core[:, 2:, 2:] = -alpha / d
        vectors = torch.cat([r1.vectors.reshape(nt, d, 2), ones], -1)
        block.baddbmm_(vectors @ core, vectors.mT)  # B_u1
        diag_u1 = block.diagonal(dim1=-2, dim2=-1).reshape(n, length, d)
        out["self_attn.out_proj.weight"] = outer(diag_u1, a.square())
        out["self_attn.out_proj.bias"] = total(diag_u1, (1,))
        # the in-projection: head blocks of B_a = W_o^T B_u1 W_o  [N, H, T, dh, dh]
        right = (block.view(nt * d, d) @ w_o).view(nt, d, d)
        del block
        per_head = w_o.view(d, heads, dh)
        blocks = torch.einsum("iha,nihb->nhab", per_head, right.view(nt, d, heads, dh))
        blocks = blocks.view(n, length, heads, dh, dh).transpose(1, 2).contiguous()
        diag_a = blocks.diagonal(dim1=-2, dim2=-1)  # [N, H, T, dh]
        xs = x[:, None]  # [N, 1, S, D]
        mixed = probs @ xs  # sum_s P_ts x_s: [N, H, T, D]
        head = f"{lead}hcj"
        w_v = torch.einsum(f"nhtc,nhtj->{head}", diag_a, mixed.square())
        b_v = total(diag_a, (2,))
        scale = 1.0 / math.sqrt(dh)
        qh, kh, vh, ah = s["qh"], s["kh"], s["vh"], _heads(a, heads)
        # query: d a_t / d q_t = scale (sum_s P_ts v_s k_s^T - a_t (P k)_t^T)   [dh(a), dh(q)]
        vk = (vh[..., :, None] * kh[..., None, :]).flatten(-2)  # [N, H, S, dh*dh]
        jac_q = (probs @ vk).view(*probs.shape[:-1], dh, dh) - ah[..., :, None] * (probs @ kh)[
            ..., None, :
        ]
        jac_q = scale * jac_q
        form_q = (jac_q * (blocks @ jac_q)).sum(-2)  # diag of J^T B J: [N, H, T, dh]
        form_q = form_q + scale**2 * softmax_hessian_forms(probs, s["grad_probs"], kh)
        w_q = torch.einsum(f"nhtc,ntj->{head}", form_q, x.square())
        b_q = total(form_q, (2,))
        # key: d a_t / d W_k[c, j] = scale q_tc w_tj, w_tj = Z_tj - (P x)_tj a_t with
        # Z_tj = sum_s P_ts x_sj v_s; w^T B w = Z^T B Z - 2 (P x) a^T B Z + (P x)^2 a^T B a
        xv = (xs[..., :, :, None] * vh[..., :, None, :]).flatten(-2)  # [N, H, S, D*dh]
        z = (probs @ xv).view(n, heads, length, d, dh)
        del xv
        block_a = blocks @ ah[..., None]  # B a  [N, H, T, dh, 1]
        form_k = (z @ blocks).mul_(z).sum(-1) - 2 * mixed * (z @ block_a)[..., 0]
        form_k = form_k + mixed.square() * (ah[..., None, :] @ block_a)[..., 0]
        form_k = form_k + softmax_hessian_forms(probs, s["grad_probs"], xs)
        w_k = torch.einsum(f"nhtc,nhtj->{head}", scale**2 * qh.square(), form_k)
        shape = (n, d, d) if per_sample else (d, d)
        out["self_attn.in_proj_weight"] = torch.cat(
            [w.reshape(shape) for w in (w_q, w_k, w_v)], dim=-2
        )
        biases = [b.reshape(*shape[:-1]) for b in (b_q, b_v)]
        out["self_attn.in_proj_bias"] = torch.cat(
            [biases[0], torch.zeros_like(biases[0]), biases[1]], dim=-1
        )
        return out


def attention_obstacle(module: nn.Module, call: Call) -> str | None:
    """Why :class:`AttentionResiduals` does not cover this attention call, or ``None``."""
    if not isinstance(module, nn.MultiheadAttention):
        return "not a MultiheadAttention"
    if not AttentionRule().applies(module, [call]):
        return "a variant the attention rule does not cover"
    if _mask(module, call, _query(call)) is not None:
        return "a mask or is_causal"
    if any(t.requires_grad for t in call.graph_inputs):
        return "an input that depends on parameters"
    return None


class AttentionResiduals:
    r"""Residual Hessian diagonals of one self-attention call followed by linear operations.

    With nothing nonlinear after the layer, only the softmax's residual remains: it enters the
    query and key weights (and the query bias) through its quadratic forms
    (:func:`~curvlab.backprop.rules.attention.softmax_hessian_forms`); the value and output
    projections get none.

    Args:
        module: The ``nn.MultiheadAttention`` (checked with :func:`attention_obstacle`).
        call: Its recorded call; the query ``[N, T, D]`` is its input.
        grad_out: Per-sample :math:`\partial \ell_n / \partial y` at its output ``[N, T, D]``.
    """

    def __init__(self, module: nn.MultiheadAttention, call: Call, grad_out: Tensor) -> None:
        self.module = module
        x = _query(call).detach()
        d, heads = x.shape[-1], module.num_heads
        qkv = F.linear(x, module.in_proj_weight.detach(), module.in_proj_bias.detach())
        q, k, v = (_heads(t, heads) for t in qkv.split(d, -1))
        probs = (q @ k.mT / math.sqrt(d // heads)).softmax(-1)
        grad_a = _heads(grad_out.detach() @ module.out_proj.weight.detach(), heads)
        self._state = {"x": x, "qh": q, "kh": k, "probs": probs, "grad_probs": grad_a @ v.mT}
        self._values: dict[bool, dict[str, Tensor]] = {}

    def values(self, per_sample: bool) -> dict[str, Tensor]:
        """Residual diagonals by local parameter name: ``[N, *p]`` per sample, else ``[*p]``."""
        if per_sample not in self._values:
            s = self._state
            x, qh, kh, probs = s["x"], s["qh"], s["kh"], s["probs"]
            n, d = x.shape[0], x.shape[-1]
            lead = "n" if per_sample else ""
            scale2 = qh.shape[-1] ** -1.0
            form_q = scale2 * softmax_hessian_forms(probs, s["grad_probs"], kh)
            form_k = softmax_hessian_forms(probs, s["grad_probs"], x[:, None])
            w_q = torch.einsum(f"nhtc,ntj->{lead}hcj", form_q, x.square())
            w_k = torch.einsum(f"nhtc,nhtj->{lead}hcj", scale2 * qh.square(), form_k)
            shape = (n, d, d) if per_sample else (d, d)
            b_q = form_q.sum(2) if per_sample else form_q.sum((0, 2))
            b_q = b_q.reshape(*shape[:-1])
            zeros = torch.zeros_like(b_q)
            self._values[per_sample] = {
                "in_proj_weight": torch.cat(
                    [w_q.reshape(shape), w_k.reshape(shape), x.new_zeros(shape)], dim=-2
                ),
                "in_proj_bias": torch.cat([b_q, zeros, zeros], dim=-1),
            }
        return self._values[per_sample]


def block_residual(
    residuals: dict[str, EncoderResiduals | AttentionResiduals], name: str, per_sample: bool
) -> Tensor | None:
    """The residual diagonal of parameter ``name`` from the block that holds it, or ``None``."""
    for block, values in residuals.items():
        prefix = f"{block}." if block else ""
        if name.startswith(prefix):
            return values.values(per_sample).get(name[len(prefix) :])
    return None


BLOCKS = {
    nn.TransformerEncoderLayer: (encoder_obstacle, EncoderResiduals),
    nn.MultiheadAttention: (attention_obstacle, AttentionResiduals),
}
"""Module classes with closed-form Hessian residuals: ``(obstacle check, residuals class)``."""

__all__ = [
    "BLOCKS",
    "AttentionResiduals",
    "EncoderResiduals",
    "attention_obstacle",
    "block_residual",
    "encoder_obstacle",
]
