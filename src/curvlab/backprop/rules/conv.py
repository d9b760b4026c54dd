r"""Rule for ``nn.Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups).

A convolution is a linear layer applied to the *unfolded* input: patches ``[N, in * K, T]``
(``K = prod(kernel_size)``, ``T`` output positions), with the weight viewed as
``[out, in / groups * K]`` per group. Per-sample gradients are
:math:`\sum_t g_{nt} u_{nt}^\top`; Kronecker factors use the patches as inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.backprop.rules.base import Call, KronSums, Rule

_CONV_ND = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

CHUNK_ELEMENTS = 2**24
"""Budget (tensor elements) for per-sample weight VJPs built at once in reductions."""


def _explicit_padding(module: nn.modules.conv._ConvNd) -> list[int]:
    """``F.pad`` amounts (last dimension first) equivalent to the module's padding."""
    amounts = []
    for dim in reversed(range(len(module.kernel_size))):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[dim] * (module.kernel_size[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[dim]
        amounts += [left, right]
    return amounts


def unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches of the input that the convolution's weight multiplies.

    Args:
        module: The convolution.
        x: Input ``[N, in, *spatial]``.

    Returns:
        ``[N, in * K, T]``, channel index ``c * K + k`` (the order of ``weight.flatten(1)``).
    """
    pad = _explicit_padding(module)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    d = len(module.kernel_size)
    if d == 1:
        return F.unfold(
            x.unsqueeze(2),
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            stride=(1, module.stride[0]),
        )
    if d == 2:
        return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    k = math.prod(module.kernel_size)
    c_in = x.shape[1]
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *module.kernel_size)
    patches = _CONV_ND[d](
        x,
        eye.repeat(c_in, *([1] * (d + 1))),
        stride=module.stride,
        dilation=module.dilation,
        groups=c_in,
    )
    return patches.flatten(start_dim=2)


def _grouped(
    module: nn.modules.conv._ConvNd, call: Call, factors: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """Patches ``[N, G, in/G * K, T]`` and factor ``[M, N, G, out/G, T]``."""
    x = call.args[0]
    g = module.groups
    u = unfold(module, x)
    n, _, t = u.shape
    factor = factors[0]
    m = factor.shape[0]
    return u.reshape(n, g, -1, t), factor.reshape(m, n, g, -1, t)


class ConvRule(Rule):
    """Derivatives of ``nn.Conv1d/2d/3d`` via unfolded inputs (see the module docstring)."""

    linear_in_input = True
    kronecker = True

    def jac_t(self, module, call, factors, names):  # noqa: D102
        u, f = _grouped(module, call, factors)
        out = {}
        m, n = f.shape[:2]
        if "weight" in names:
            w = torch.einsum("mngot,ngit->mngoi", f, u)
            out["weight"] = w.reshape(m, n, *module.weight.shape)
        if "bias" in names:
            out["bias"] = f.sum(-1).reshape(m, n, -1)
        return out

    def sum_jac_t(self, module, call, factors, names):  # noqa: D102
        u, f = _grouped(module, call, factors)
        out = {}
        m = f.shape[0]
        if "weight" in names:
            w = torch.einsum("mngot,ngit->mgoi", f, u)
            out["weight"] = w.reshape(m, *module.weight.shape)
        if "bias" in names:
            out["bias"] = f.sum((1, -1)).reshape(m, -1)
        return out

    def sum_sq_jac_t(self, module, call, factors, names, per_sample):  # noqa: D102
        u, f = _grouped(module, call, factors)
        m, n = f.shape[:2]
        out = {}
        if "weight" in names:
            # per-sample weight VJPs have no factored square: build them in chunks of samples
            # so that at most ~CHUNK_ELEMENTS are alive at once
            step = max(1, CHUNK_ELEMENTS // (m * module.weight.numel()))
            parts = []
            for s in range(0, n, step):
                w = torch.einsum("mngot,ngit->mngoi", f[:, s : s + step], u[s : s + step])
                sq = w.square_().sum(0).reshape(-1, *module.weight.shape)
                parts.append(sq if per_sample else sq.sum(0))
            out["weight"] = torch.cat(parts) if per_sample else sum(parts[1:], parts[0])
        if "bias" in names:
            sq = f.sum(-1).square().sum(0).reshape(n, -1)
            out["bias"] = sq if per_sample else sq.sum(0)
        return out

    def sq_norm_jac_t(self, module, call, factors, names):  # noqa: D102
        u, f = _grouped(module, call, factors)
        out = {}
        if "weight" in names:
            _, _, _, o, t = f.shape
            i = u.shape[2]
            if t * (i + o) < i * o:  # Gram matrices over positions are cheaper
                gram_u = torch.einsum("ngit,ngis->ngts", u, u)
                gram_f = torch.einsum("mngot,mngos->mngts", f, f)
                out["weight"] = (gram_f * gram_u).sum((2, 3, 4))
            else:
                w = torch.einsum("mngot,ngit->mngoi", f, u)
                out["weight"] = w.square().sum((2, 3, 4))
        if "bias" in names:
            out["bias"] = f.sum(-1).square().sum((2, 3))
        return out

    def kron_sums(self, module, call, factors, names):  # noqa: D102
        u, f = _grouped(module, call, factors)
        if module.groups != 1 and "weight" in names:
            raise NotImplementedError(
                f"Kronecker factors for grouped convolutions (groups={module.groups})"
            )
        u = u[:, 0].transpose(1, 2).reshape(-1, u.shape[2])  # [N*T, in*K]
        f = f.flatten(2, 3).transpose(2, 3).reshape(-1, module.out_channels)  # [M*N*T, out]
        output_sum = f.T @ f
        out = {}
        if "weight" in names:
            out["weight"] = KronSums(u.T @ u, u.shape[0], output_sum)
        if "bias" in names:
            out["bias"] = KronSums(None, u.shape[0], output_sum)
        return out
