r"""Rules for normalization layers: ``BatchNorm1d/2d/3d`` (eval), ``LayerNorm``, ``GroupNorm``.

All three are an elementwise affine map of a normalized input,
:math:`y = \hat x \odot w + b`, with :math:`w, b` broadcast along the channel dimension (batch
and group norm) or the trailing ``normalized_shape`` (layer norm). The per-sample parameter
VJPs are :math:`\sum_t F_{mnt} \odot \hat x_{nt}` and :math:`\sum_t F_{mnt}` over the positions
``t`` that share a parameter entry. The parameters are small (one entry per channel), so the
Kronecker quantities give their *exact* (or MC) GGN block as a single factor ``(B,)`` with
:math:`B = r\sum_{m,n} v_{mn} v_{mn}^\top`, :math:`v_{mn}` the VJP above.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.backprop.rules.base import Call, KronSums, Rule


def normalized_input(module: nn.Module, x: Tensor) -> Tensor:
    r"""The normalized input :math:`\hat x` before the affine map, same shape as ``x``."""
    if isinstance(module, _BatchNorm):
        shape = (1, -1, *[1] * (x.dim() - 2))
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        return (x - mean) / (var + module.eps).sqrt()
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    raise TypeError(f"not a normalization layer: {type(module).__name__}")


def layer_norm_statistics(module: nn.LayerNorm, u: Tensor) -> tuple[Tensor, Tensor]:
    r"""The normalized input :math:`\hat x = (u - \bar u) / \sigma` and :math:`\sigma` ``[..., 1]``.

    For a layer norm over the last dimension ``D`` (one-entry ``normalized_shape``):
    :math:`\sigma = (\frac{1}{D} \lVert u - \bar u \rVert^2 + \epsilon)^{1/2}`.
    """
    centered = u - u.mean(-1, keepdim=True)
    sigma = (centered.square().mean(-1, keepdim=True) + module.eps).sqrt()
    return centered / sigma, sigma


def layer_norm_input_jacobian(xhat: Tensor, sigma: Tensor, weight: Tensor | None) -> Tensor:
    r""":math:`\partial y / \partial u = \mathrm{diag}(w) (P - \hat x \hat x^\top / D) / \sigma`.

    Args:
        xhat: Normalized input ``[..., D]``.
        sigma: ``[..., 1]``.
        weight: :math:`w` ``[D]``, or ``None`` (no affine map).

    Returns:
        ``[..., D, D]`` (row: output entry, column: input entry); :math:`P = I - 11^\top / D`.
    """
    d = xhat.shape[-1]
    eye = torch.eye(d, dtype=xhat.dtype, device=xhat.device)
    jac = (eye - 1.0 / d) - xhat[..., :, None] * xhat[..., None, :] / d
    jac = jac / sigma[..., None]
    return jac if weight is None else weight[:, None] * jac


class CenteredLowRank(NamedTuple):
    r"""A symmetric matrix :math:`\alpha P + V S V^\top` per position, :math:`P = I - 11^\top / D`.

    Attributes:
        alpha: ``[..., 1, 1]``.
        vectors: :math:`V` ``[..., D, R]``.
        core: :math:`S` ``[..., R, R]``, symmetric.
    """

    alpha: Tensor
    vectors: Tensor
    core: Tensor

    def dense(self) -> Tensor:
        """The matrix ``[..., D, D]``."""
        d = self.vectors.shape[-2]
        eye = torch.eye(d, dtype=self.alpha.dtype, device=self.alpha.device)
        return self.alpha * (eye - 1.0 / d) + self.vectors @ self.core @ self.vectors.mT

    def diagonal(self) -> Tensor:
        """Its diagonal ``[..., D]``."""
        d = self.vectors.shape[-2]
        low_rank = ((self.vectors @ self.core) * self.vectors).sum(-1)
        return self.alpha[..., 0] * (1.0 - 1.0 / d) + low_rank


def layer_norm_input_hessian(
    xhat: Tensor, sigma: Tensor, weight: Tensor | None, grad_out: Tensor
) -> CenteredLowRank:
    r"""Second derivative of :math:`\langle g, \mathrm{LN}(u) \rangle` w.r.t. the input :math:`u`.

    With :math:`\tilde a = P (g \odot w)` and :math:`\gamma = \tilde a^\top \hat x`,

    .. math::
        \nabla_u^2 \langle g, y \rangle = \frac{1}{D \sigma^2} \Big(
            -\tilde a \hat x^\top - \hat x \tilde a^\top - \gamma P
            + \frac{3 \gamma}{D} \hat x \hat x^\top \Big),

    the residual a layer norm adds to the Hessian w.r.t. its input (the bias does not enter):
    :math:`\alpha = -\gamma / (D \sigma^2)`, :math:`V = [\tilde a, \hat x]`.

    Args:
        xhat: Normalized input ``[..., D]``.
        sigma: ``[..., 1]``.
        weight: :math:`w` ``[D]``, or ``None``.
        grad_out: :math:`g = \partial \ell / \partial y` ``[..., D]``.

    Returns:
        The residual as :class:`CenteredLowRank` (rank-two :math:`V`).
    """
    d = xhat.shape[-1]
    a = grad_out if weight is None else grad_out * weight
    a = a - a.mean(-1, keepdim=True)
    gamma = (a * xhat).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    scale = 1.0 / (d * sigma.square()[..., None])  # [..., 1, 1]
    core = torch.zeros(*gamma.shape[:-2], 2, 2, dtype=xhat.dtype, device=xhat.device)
    core[..., 0, 1] = core[..., 1, 0] = -scale[..., 0, 0]
    core[..., 1, 1] = (3.0 / d) * (gamma * scale)[..., 0, 0]
    return CenteredLowRank(-gamma * scale, torch.stack([a, xhat], dim=-1), core)


def _as_positions(module: nn.Module, t: Tensor, batch_dims: int) -> Tensor:
    """Reshape ``[*batch, N, ...]`` to ``[*batch, N, T, P]``: ``P`` entries of the parameter."""
    if isinstance(module, nn.LayerNorm):
        p = math.prod(module.normalized_shape)
        return t.reshape(*t.shape[: batch_dims + 1], -1, p)
    channels = t.shape[batch_dims + 1]
    moved = t.movedim(batch_dims + 1, -1)
    return moved.reshape(*t.shape[: batch_dims + 1], -1, channels)


class NormRule(Rule):
    """Derivatives of batch norm (eval), layer norm and group norm (see the module docstring).

    Layer-wise quantities get each parameter's whole GGN block (``kron_kind = "whole"``).
    """

    kronecker = True
    kron_kind = "whole"

    def __init__(self, linear_in_input: bool) -> None:
        self.linear_in_input = linear_in_input

    def jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        x_hat = _as_positions(module, normalized_input(module, call.args[0]), 0)
        f = _as_positions(module, factors[0], 1)  # [M, N, T, P]
        out = {}
        if "weight" in names:
            out["weight"] = torch.einsum("mntp,ntp->mnp", f, x_hat).reshape(
                *f.shape[:2], *module.weight.shape
            )
        if "bias" in names:
            out["bias"] = f.sum(2).reshape(*f.shape[:2], *module.bias.shape)
        return out

    def kron_sums(  # noqa: D102
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        approx: str = "expand",
    ) -> dict[str, KronSums]:
        out = {}
        for name, vjp in self.jac_t(module, call, factors, names).items():
            flat = vjp.flatten(end_dim=1).flatten(start_dim=1)  # [M*N, P]
            out[name] = KronSums(None, vjp.shape[1], flat.T @ flat)
        return out


class EmbeddingRule(Rule):
    r"""Derivatives of ``nn.Embedding``: row ``idx[n, t]`` of the weight receives :math:`F_{mnt}`.

    Kronecker factors: the input is one-hot, so :math:`A = \frac{1}{NT}\mathrm{diag}(\text{token
    counts})` ``[V, V]`` and :math:`B` ``[D, D]`` as for ``Linear``. The weight is stored
    ``[in, out] = [V, D]`` (transposed w.r.t. ``Linear``), so its row-major block is
    ``torch.kron(A, B)``.
    """

    linear_in_input = True
    kronecker = True
    kron_kind = "columns"
    channels_last = True

    def _check(self, module: nn.Module) -> None:
        if module.max_norm is not None:
            raise NotImplementedError("Embedding(max_norm=...) renormalizes its weight in place")

    def jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        self._check(module)
        idx = call.args[0]
        m, n = factors[0].shape[:2]
        onehot = F.one_hot(idx.reshape(n, -1), module.num_embeddings).to(factors[0].dtype)
        f = factors[0].reshape(m, n, -1, module.embedding_dim)
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0.0
        return {"weight": torch.einsum("mntd,ntv->mnvd", f, onehot)}

    def sum_jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        self._check(module)
        idx = call.args[0].reshape(-1)
        m = factors[0].shape[0]
        f = factors[0].reshape(m, -1, module.embedding_dim)
        out = f.new_zeros(m, module.num_embeddings, module.embedding_dim)
        out.index_add_(1, idx, f)
        if module.padding_idx is not None:
            out[:, module.padding_idx] = 0.0
        return {"weight": out}

    def kron_sums(  # noqa: D102
        self,
        module: nn.Module,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        approx: str = "expand",
    ) -> dict[str, KronSums]:
        self._check(module)
        idx = call.args[0]
        n, d = idx.shape[0], module.embedding_dim
        f = factors[0].reshape(factors[0].shape[0], n, -1, d)  # [M, N, T, D]
        if approx == "reduce" and f.shape[2] > 1:  # mean one-hot per sample
            onehot = F.one_hot(idx.reshape(n, -1), module.num_embeddings).to(f.dtype).mean(1)
            if module.padding_idx is not None:
                onehot[:, module.padding_idx] = 0.0
            summed = f.sum(2).reshape(-1, d)
            return {"weight": KronSums(onehot.T @ onehot, n, summed.T @ summed, onehot.sum(0))}
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=module.num_embeddings).to(f.dtype)
        if module.padding_idx is not None:
            counts[module.padding_idx] = 0.0
        rows = f.reshape(-1, d)
        return {"weight": KronSums(torch.diag(counts), flat.numel(), rows.T @ rows, counts)}
