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
