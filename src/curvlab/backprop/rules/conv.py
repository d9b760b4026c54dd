r"""Rule for ``nn.Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups).

A convolution is a linear layer applied to the *unfolded* input: patches ``[N, in * K, T]``
(``K = prod(kernel_size)``, ``T`` output positions), with the weight viewed as
``[out, in / groups * K]`` per group. Per-sample gradients are
:math:`\sum_t g_{nt} u_{nt}^\top`; Kronecker factors use the patches as inputs. A grouped
convolution is ``G`` independent layers: its weight gets one factor pair per group, stacked as
``A`` ``[G, in/G * K, in/G * K]`` and ``B`` ``[G, out/G, out/G]`` (the weight block is then
block-diagonal over groups).

Gram matrices of the VJPs (ViViT, :meth:`ConvRule.gram`) take the cheaper of two forms by their
multiply-adds (:func:`factored_gram_cost`): factored over position pairs,
:math:`\sum_{t,t'} (f_{mnt} \cdot h_{m'n't'})(u_{nt} \cdot u_{n't'})` (few positions, wide
patches), or the per-sample VJPs ``[N M, P]`` and one symmetric product (many positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.backprop.rules.base import Call, KronSums, Rule
from curvlab.backprop.rules.conv_factor import expand_input_sum, shifted_products_apply
from curvlab.linalg.gram import gram
from curvlab.nn import einconv

_CONV_ND = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

CHUNK_ELEMENTS = 2**22
"""Budget (tensor elements) for per-sample weight VJPs built at once in reductions."""

FACTOR_CHUNK_ELEMENTS = 2**20
"""Budget (elements) of the unfolded input per chunk of samples of a KFAC-expand input factor:
a chunk stays in cache for its product (first 3C3D layer at ``N = 128``: 55 -> 37 ms, shared
loaded machine)."""


def unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches of the input that the convolution's weight multiplies.

    Args:
        module: The convolution.
        x: Input ``[N, in, *spatial]``.

    Returns:
        ``[N, in * K, T]``, channel index ``c * K + k`` (the order of ``weight.flatten(1)``).
    """
    arguments = _einconv_arguments(module)
    if arguments is not None:  # index-based im2col: 1.2-5x faster than F.unfold on CPU
        return einconv.unfold(x, **{k: v for k, v in arguments.items() if k != "groups"})
    return torch_unfold(module, x)


def _einconv_arguments(module: nn.modules.conv._ConvNd) -> dict | None:
    """:func:`curvlab.nn.einconv.conv_hyperparameters`, or ``None`` (non-zero padding modes)."""
    if module.padding_mode != "zeros":
        return None
    return einconv.conv_hyperparameters(module)


def torch_unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """:func:`unfold` by ``F.pad`` and ``F.unfold`` (or a convolution with one-hot kernels)."""
    pairs = einconv.padding_pairs(
        module.padding, module.kernel_size, module.stride, module.dilation
    )
    pad = einconv.pad_amounts(pairs)
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


def patch_rows(
    module: nn.modules.conv._ConvNd,
    x: Tensor,
    samples: Tensor,
    channels: Tensor,
    offsets: Tensor,
) -> Tensor:
    r"""Chosen rows of the unfolded input, :math:`u_{n_b, (c_b, k_b), :}`, without unfolding.

    Gathered from the padded input: row :math:`(c, k)` of sample :math:`n` holds input channel
    :math:`c` at kernel offset :math:`k` for every output position (``B T`` elements read).

    Args:
        module: The convolution.
        x: Input ``[N, in, *spatial]``.
        samples: :math:`n_b`, ``[B]``.
        channels: Input channels :math:`c_b` (of all ``in``, not per group), ``[B]``.
        offsets: Flat kernel offsets :math:`k_b` (row-major over ``kernel_size``), ``[B]``.

    Returns:
        ``[B, T]``, positions in the order of the convolution's output.
    """
    pairs = einconv.padding_pairs(
        module.padding, module.kernel_size, module.stride, module.dilation
    )
    pad = einconv.pad_amounts(pairs)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    spatial = x.shape[2:]
    d = len(spatial)
    flat = [math.prod(spatial[a + 1 :]) for a in range(d)]  # strides of the flat spatial index
    positions = torch.zeros(1, dtype=torch.long, device=x.device)
    kernel_base = torch.zeros_like(offsets)
    remainder = offsets
    for a in range(d):
        size = spatial[a] - module.dilation[a] * (module.kernel_size[a] - 1) - 1
        count = size // module.stride[a] + 1
        axis = torch.arange(count, device=x.device) * (module.stride[a] * flat[a])
        positions = (positions[:, None] + axis[None, :]).flatten()
        inner = math.prod(module.kernel_size[a + 1 :])
        kernel_base = kernel_base + (remainder // inner) * (module.dilation[a] * flat[a])
        remainder = remainder % inner
    planes = x.reshape(-1, math.prod(spatial))  # [N * in, S]
    return planes[(samples * x.shape[1] + channels)[:, None], kernel_base[:, None] + positions]


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


def _grouped_factor(module: nn.modules.conv._ConvNd, factors: tuple[Tensor, ...]) -> Tensor:
    """The factor as ``[M, N, G, out/G, T]``."""
    factor = factors[0]
    m, n = factor.shape[:2]
    return factor.reshape(m, n, module.groups, module.out_channels // module.groups, -1)


def _sample_chunks(
    module: nn.modules.conv._ConvNd, call: Call, factors: tuple[Tensor, ...], extra: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Patches ``[n, G, in/G * K, T]`` and factor ``[M, n, G, out/G, T]`` by chunks of samples.

    Each chunk's patches and ``extra`` elements per sample (the caller's intermediate) stay
    within about ``CHUNK_ELEMENTS``, so that the unfolded input of the whole batch is never
    alive at once.
    """
    x = call.args[0]
    f = _grouped_factor(module, factors)
    n, t = f.shape[1], f.shape[-1]
    patches = module.in_channels * math.prod(module.kernel_size) * t
    step = max(1, CHUNK_ELEMENTS // max(1, patches + extra))
    for s in range(0, n, step):
        u = unfold(module, x[s : s + step])
        yield u.reshape(u.shape[0], module.groups, -1, t), f[:, s : s + step]


VJP_CHUNK_ELEMENTS = 2**20
"""Budget (patch elements) of the chunks of samples :func:`weight_vjps` unfolds at once."""


def weight_vjps(module: nn.modules.conv._ConvNd, call: Call, f: Tensor) -> Tensor:
    r"""Per-sample weight VJPs :math:`\sum_t f_{mngt} u_{ngt}^\top`, ``[M, N, G, O, I]``.

    Unfolded and multiplied by chunks of samples (about :data:`VJP_CHUNK_ELEMENTS` patch
    elements each) into one output: the patches of a chunk stay in cache and the whole batch's
    are never formed (1.5-1.7x faster than one unfold and one product on 3C3D's first two
    convolutions, one CPU thread).

    Args:
        module: The convolution.
        call: Its call (input ``call.args[0]``).
        f: The factor ``[M, N, G, O, T]``.
    """
    x = call.args[0]
    m, n, g, o, t = f.shape
    i = module.weight.shape[1] * math.prod(module.kernel_size)
    out = f.new_empty(m, n, g, o, i)
    step = max(
        1, VJP_CHUNK_ELEMENTS // max(1, module.in_channels * math.prod(module.kernel_size) * t)
    )
    for s in range(0, n, step):
        u = unfold(module, x[s : s + step])
        u = u.reshape(u.shape[0], g, i, t)
        if m == 1 and g == 1:  # one batched product straight into the output
            torch.bmm(f[0, s : s + step, 0], u[:, 0].transpose(1, 2), out=out[0, s : s + step, 0])
        else:
            out[:, s : s + step] = torch.einsum("mngot,ngit->mngoi", f[:, s : s + step], u)
    return out


def chunked_squares(
    chunks: Iterator[tuple[Tensor, Tensor]],
    shape: torch.Size,
    per_sample: bool,
    transposed: bool = False,
) -> Tensor:
    r""":math:`\sum_m (\sum_t f_{mnt} u_{nt}^\top)^{\odot 2}` from chunks of samples.

    Args:
        chunks: Pairs ``u`` ``[n, G, I, T]`` and ``f`` ``[M, n, G, O, T]`` (chunks of samples).
        shape: The weight's shape, a view of ``[G, O, I]`` (``[G, I, O]`` if ``transposed``).
        per_sample: Keep the sample dimension (``[N, *shape]``), else sum it (``shape``).
        transposed: The weight's per-group layout is ``[I, O]``.
    """
    equation = "mngot,ngit->mngio" if transposed else "mngot,ngit->mngoi"
    parts = []
    for u, f in chunks:
        sq = torch.einsum(equation, f, u).square_()
        if per_sample:
            parts.append(sq.sum(0).reshape(-1, *shape))
        else:  # one reduction over columns and samples (no [n, ...] intermediate)
            parts.append(sq.sum((0, 1)).reshape(shape))
    return torch.cat(parts) if per_sample else sum(parts[1:], parts[0])


def chunked_sq_norms(
    chunks: Callable[[int], Iterator[tuple[Tensor, Tensor]]], m: int, g: int, i: int, o: int, t: int
) -> Tensor:
    r""":math:`\lVert \sum_t f_{mnt} u_{nt}^\top \rVert^2`, ``[M, N]``, from chunks of samples.

    By Gram matrices over the ``T`` positions when :math:`T (I + O) < I O`, else by building the
    per-sample products; ``chunks(extra)`` yields ``u`` ``[n, G, I, T]`` and ``f``
    ``[M, n, G, O, T]`` with ``extra`` elements per sample of intermediate budgeted.
    """
    gram = t * (i + o) < i * o
    extra = m * g * t * t if gram else m * g * o * i
    parts = []
    for u, f in chunks(extra):
        if gram:
            gram_u = torch.einsum("ngit,ngis->ngts", u, u)
            gram_f = torch.einsum("mngot,mngos->mngts", f, f)
            parts.append((gram_f * gram_u).sum((2, 3, 4)))
        else:
            w = torch.einsum("mngot,ngit->mngoi", f, u)
            parts.append(w.square_().sum((2, 3, 4)))
    return torch.cat(parts, dim=1)


GRAM_ELEMENTS = 2**25
"""Budget (tensor elements) for the ``[G, t, M N, T, M' N]`` block of the factored Gram."""


def factored_gram_cost(m: int, m_other: int, n: int, g: int, i: int, o: int, t: int) -> tuple:
    r"""Multiply-adds of the conv weight's Gram matrix, ``(factored, materialised)``.

    Factored over position pairs: :math:`G T^2 (M M' N^2 (O + 1) + N^2 I)`; by the per-sample
    VJPs :math:`J^\top F` ``[M N, P]``: :math:`G T O I N (M + M') + M M' N^2 P` with
    :math:`P = G O I`.
    """
    factored = g * t * t * n * n * (m * m_other * (o + 1) + i)
    materialised = g * t * o * i * n * (m + m_other) + m * m_other * n * n * g * o * i
    return factored, materialised


def per_sample_rows(u: Tensor, f: Tensor) -> Tensor:
    r"""The weight VJPs :math:`\sum_t f_{mngt} u_{ngt}^\top` as rows ``[N M, G O I]`` (index ``n M + m``).

    One batched product over ``(n, g)``; a view of its result when ``G = 1``.

    Args:
        u: Patches ``[N, G, I, T]``.
        f: Factor ``[M, N, G, O, T]``.
    """
    m, n, g, o, t = f.shape
    lhs = f.permute(1, 2, 0, 3, 4).reshape(n * g, m * o, t)
    w = torch.bmm(lhs, u.reshape(n * g, -1, t).transpose(1, 2))  # [N G, M O, I]
    w = w.view(n, g, m, o, -1)
    return (w[:, 0] if g == 1 else w.transpose(1, 2)).reshape(n * m, -1)


def conv_gram(u: Tensor, f: Tensor, h: Tensor | None) -> Tensor:
    r"""Factored Gram of the weight VJPs :math:`W_{mn} = \sum_t f_{mnt} u_{nt}^\top` per group.

    .. math::
        \langle W_{mn}, W'_{m'n'} \rangle = \sum_{g} \sum_{t, t'}
        (f_{mngt} \cdot h_{m'n'gt'})(u_{ngt} \cdot u_{n'gt'}),

    summed over chunks of ``t`` so that at most about :data:`GRAM_ELEMENTS` are alive at once;
    no ``[M, N, *p]`` tensor is formed.

    Args:
        u: Patches ``[N, G, I, T]``.
        f: Factor ``[M, N, G, O, T]``.
        h: The other factor ``[M', N, G, O, T]`` (``None``: ``f``).

    Returns:
        ``[M, N, M', N]``.
    """
    h = f if h is None else h
    m, n, g, o, t = f.shape
    k = h.shape[0]
    fa = f.permute(2, 4, 0, 1, 3).reshape(g, t, m * n, o)  # [G, T, MN, O]
    hb = h.permute(2, 3, 4, 0, 1).reshape(g, o, t * k * n)  # [G, O, T M'N]
    ua = u.permute(1, 3, 0, 2)  # [G, T, N, I]
    ub = u.permute(1, 2, 3, 0).reshape(g, -1, t * n)  # [G, I, T N]
    out = f.new_zeros(m, n, k, n)
    step = max(1, GRAM_ELEMENTS // max(1, g * t * m * n * k * n))
    for s in range(0, t, step):
        c = min(step, t - s)
        gf = (fa[:, s : s + c].reshape(g, c * m * n, o) @ hb).view(g, c, m, n, t, k, n)
        gu = (ua[:, s : s + c].reshape(g, c * n, -1) @ ub).view(g, c, 1, n, t, 1, n)
        out += gf.mul_(gu).sum((0, 1, 4))
    return out


class ConvRule(Rule):
    """Derivatives of ``nn.Conv1d/2d/3d`` via unfolded inputs (see the module docstring)."""

    linear_in_input = True
    kronecker = True

    def jac_t(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
    ) -> dict[str, Tensor]:
        f = _grouped_factor(module, factors)
        out = {}
        m, n = f.shape[:2]
        if "weight" in names:
            out["weight"] = weight_vjps(module, call, f).reshape(m, n, *module.weight.shape)
        if "bias" in names:
            out["bias"] = f.sum(-1).reshape(m, n, -1)
        return out

    def sum_jac_t(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
    ) -> dict[str, Tensor]:
        u, f = _grouped(module, call, factors)
        out = {}
        m = f.shape[0]
        if "weight" in names:
            w = torch.einsum("mngot,ngit->mgoi", f, u)
            out["weight"] = w.reshape(m, *module.weight.shape)
        if "bias" in names:
            out["bias"] = f.sum((1, -1)).reshape(m, -1)
        return out

    def sum_sq_jac_t(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        per_sample: bool,
    ) -> dict[str, Tensor]:
        m = factors[0].shape[0]
        out = {}
        if "weight" in names:
            # per-sample weight VJPs have no factored square: build them (and the patches) in
            # chunks of samples so that at most ~CHUNK_ELEMENTS are alive at once
            chunks = _sample_chunks(module, call, factors, m * module.weight.numel())
            out["weight"] = chunked_squares(chunks, module.weight.shape, per_sample)
        if "bias" in names:
            f = _grouped_factor(module, factors)
            sq = f.sum(-1).square().sum(0).reshape(f.shape[1], -1)
            out["bias"] = sq if per_sample else sq.sum(0)
        return out

    def sq_norm_jac_t(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
    ) -> dict[str, Tensor]:
        out = {}
        if "weight" in names:
            m, _, g, o, t = _grouped_factor(module, factors).shape
            i = module.weight.shape[1] * math.prod(module.kernel_size)
            out["weight"] = chunked_sq_norms(
                lambda extra: _sample_chunks(module, call, factors, extra), m, g, i, o, t
            )
        if "bias" in names:
            out["bias"] = _grouped_factor(module, factors).sum(-1).square().sum((2, 3))
        return out

    def gram(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        other: tuple[Tensor, ...] | None = None,
    ) -> dict[str, Tensor]:
        # the weight: factored over position pairs or by the per-sample VJPs, whichever costs
        # fewer multiply-adds (factored_gram_cost); the bias: (sum_t f)(sum_t h)
        f = _grouped_factor(module, factors)
        h = f if other is None else _grouped_factor(module, other)
        m, n, g, o, t = f.shape
        out = {}
        if "weight" in names:
            i = module.weight.shape[1] * math.prod(module.kernel_size)
            factored, materialised = factored_gram_cost(m, h.shape[0], n, g, i, o, t)
            if factored < materialised:
                u = unfold(module, call.args[0]).reshape(n, g, i, t)
                out["weight"] = conv_gram(u, f, None if other is None else h)
            else:
                u = unfold(module, call.args[0]).reshape(n, g, i, t)
                a = per_sample_rows(u, f)
                if other is None:
                    out["weight"] = gram(a).view(n, m, n, m).permute(1, 0, 3, 2)
                else:
                    b = per_sample_rows(u, h)
                    out["weight"] = (a @ b.T).view(n, m, n, -1).permute(1, 0, 3, 2)
                del a
        if "bias" in names:
            fs, hs = f.sum(-1).reshape(m, n, -1), h.sum(-1).reshape(h.shape[0], n, -1)
            out["bias"] = torch.einsum("mnc,kqc->mnkq", fs, hs)
        return out

    def kron_sums(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        approx: str = "expand",
    ) -> dict[str, KronSums]:
        x, f = call.args[0], factors[0]
        m, n = f.shape[:2]
        g, t = module.groups, math.prod(f.shape[3:])
        flat = f.reshape(m * n, module.out_channels, t)
        summed = None  # position-summed output factor [M*N, out]: reduce, and the bias's block
        if approx == "reduce" or "bias" in names:
            summed = gram(flat.sum(-1).T)
        out = {}
        if "weight" in names:
            if approx == "reduce":
                input_sum, count, total = _reduce_input_sums(module, x, t)
                output_sum = summed
            else:
                input_sum, count = _expand_input_sum(module, x, n, t), n * t
                total = unfold(module, x.sum(0, keepdim=True))[0].sum(-1).reshape(g, -1)
                output_sum = channel_gram(flat)
            if g == 1:
                out["weight"] = KronSums(input_sum, count, output_sum, total[0])
            else:
                output_sum = grouped_output_sum(output_sum, g)
                out["weight"] = KronSums(input_sum, count, output_sum, total)
        if "bias" in names:
            out["bias"] = KronSums(None, n if approx == "reduce" else n * t, summed)
        return out

    def jvp(  # noqa: D102
        self, module: nn.modules.conv._ConvNd, call: Call, name: str, vectors: Tensor
    ) -> tuple[Tensor, ...]:
        # J_n v: the convolution of the input with v as its weight (no bias), one per vector;
        # for the bias, v broadcast over the positions
        x = call.args[0]
        if name == "weight":
            return (torch.stack([module._conv_forward(x, v, None) for v in vectors]),)
        shape = module._conv_forward(x[:1], module.weight.detach(), None).shape[2:]
        k = vectors.shape[0]
        tangent = vectors.reshape(k, 1, -1, *[1] * len(shape))
        return (tangent.expand(k, x.shape[0], module.out_channels, *shape),)

    def sample_jac_t(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        name: str,
        samples: Tensor,
        elements: Tensor,
    ) -> Tensor:
        # element (o, c, k) of sample n: sum_t f_{m,n,o,t} u_{n,(c,k),t}, one patch row each
        f = factors[0]
        m, n, out_channels = f.shape[0], f.shape[1], module.out_channels
        f = f.reshape(m, n, out_channels, -1)
        if name == "bias":
            return f.sum(-1)[:, samples, elements]
        per_group, k = module.weight.shape[1], math.prod(module.kernel_size)
        o = elements // (per_group * k)
        c = (elements // k) % per_group + (o // (out_channels // module.groups)) * per_group
        step = max(1, CHUNK_ELEMENTS // max(1, f.shape[-1] * (m + 1)))
        parts = []
        for s in range(0, samples.shape[0], step):
            chunk = slice(s, s + step)
            rows = patch_rows(module, call.args[0], samples[chunk], c[chunk], elements[chunk] % k)
            picked = f.permute(1, 2, 0, 3)[samples[chunk], o[chunk]]  # [B, M, T]
            parts.append(torch.einsum("bmt,bt->mb", picked, rows))
        return torch.cat(parts, dim=1)

    def sample_block_jac_t(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        factors: tuple[Tensor, ...],
        name: str,
        samples: Tensor,
        rows: Tensor,
        columns: Tensor,
    ) -> Tensor:
        # rows are output channels, columns (c, k) pairs: sum_t f_{m,n,o,t} u_{n,(c,k),t}
        if module.groups != 1 and name == "weight":  # the column's channel depends on the row
            return super().sample_block_jac_t(module, call, factors, name, samples, rows, columns)
        f = factors[0]
        m, n = f.shape[:2]
        f = f.reshape(m, n, module.out_channels, -1)
        s, r = rows.shape
        t = f.shape[-1]
        picked = f[:, samples[:, None], rows]  # [M, S, R, T]: only the chosen rows are read
        if name == "bias":
            return picked.sum(-1).unsqueeze(-1)  # [M, S, R, 1]
        k = math.prod(module.kernel_size)
        c = columns.shape[1]
        step = max(1, CHUNK_ELEMENTS // max(1, c * t + m * r * t))
        parts = []
        for a in range(0, s, step):
            chunk = slice(a, a + step)
            cols = columns[chunk]
            patch = patch_rows(
                module,
                call.args[0],
                samples[chunk].repeat_interleave(c),
                (cols // k).flatten(),
                (cols % k).flatten(),
            ).reshape(cols.shape[0], c, t)
            parts.append(torch.einsum("msrt,sct->msrc", picked[:, chunk], patch))
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ input side
    def diag_backprop(  # noqa: D102
        self,
        module: nn.modules.conv._ConvNd,
        call: Call,
        d_out: Tensor,
        grad_out: Tensor | None,
        vjp: Callable[[Tensor], Tensor],
    ) -> Tensor:
        if module.padding_mode != "zeros":
            raise NotImplementedError("padding modes other than zeros")
        weight_sq = module.weight.detach().square()
        _, pullback = torch.func.vjp(
            lambda z: module._conv_forward(z, weight_sq, None), call.args[0]
        )
        return pullback(d_out)[0]

    def diag_params(  # noqa: D102
        self, module: nn.modules.conv._ConvNd, call: Call, d_out: Tensor, names: list[str]
    ) -> dict[str, Tensor]:
        x = call.args[0]
        u = unfold(module, x).square()  # [N, in*K, T]
        n, g = x.shape[0], module.groups
        ds = d_out.reshape(n, g, module.out_channels // g, -1)
        us = u.reshape(n, g, -1, u.shape[-1])
        out = {}
        if "weight" in names:
            out["weight"] = torch.einsum("ngot,ngit->goi", ds, us).reshape(module.weight.shape)
        if "bias" in names:
            out["bias"] = ds.sum((0, 3)).reshape(-1)
        return out


def _expand_input_sum(module: nn.modules.conv._ConvNd, x: Tensor, n: int, t: int) -> Tensor:
    r""":math:`\sum_{n,t} u_{nt} u_{nt}^\top` ``[in*K, in*K]`` (``[G, ...]`` if grouped)."""
    g = module.groups
    arguments = _einconv_arguments(module)
    if arguments is not None and shifted_products_apply(
        module.in_channels, g, module.stride, module.kernel_size
    ):  # stride 1: shifted channel products, never the unfolded input (conv_factor.py)
        pairs = einconv.padding_pairs(
            module.padding, module.kernel_size, module.stride, module.dilation
        )
        return expand_input_sum(x, module.kernel_size, pairs, module.dilation)
    if arguments is not None:  # KFAC-expand factor by einconv (no F.unfold copy), in chunks
        step = max(
            1,
            FACTOR_CHUNK_ELEMENTS
            // max(1, module.in_channels // g * math.prod(module.kernel_size) * t),
        )
        total = None
        for start in range(0, n, step):
            part = einconv.kfac_expand_factor(x[start : start + step], **arguments, reduction="sum")
            total = part if total is None else total.add_(part)
        return total
    u = torch_unfold(module, x)  # [N, in * K, T]
    u = u.reshape(n, g, -1, t).permute(1, 2, 0, 3).flatten(2)  # [G, in/G * K, N*T]
    input_sum = gram(u)
    return input_sum[0] if g == 1 else input_sum


def _reduce_input_sums(
    module: nn.modules.conv._ConvNd, x: Tensor, t: int
) -> tuple[Tensor, int, Tensor]:
    r"""KFAC-reduce: :math:`\sum_n \bar u_n \bar u_n^\top`, ``N`` and :math:`\sum_n \bar u_n`.

    :math:`\bar u_n` is the mean patch of sample ``n`` over the ``T`` positions, computed by
    chunks of samples (the unfolded input of the whole batch is never alive at once).
    """
    g, n = module.groups, x.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, module.in_channels * math.prod(module.kernel_size) * t))
    means = torch.cat([unfold(module, x[s : s + step]).mean(-1) for s in range(0, n, step)])
    grouped = means.reshape(n, g, -1).permute(1, 2, 0)  # [G, in/G * K, N]
    input_sum = gram(grouped)
    total = grouped.sum(-1)
    return (input_sum[0] if g == 1 else input_sum), n, total


def channel_gram(f: Tensor) -> Tensor:
    r""":math:`\sum_{r, t} f_{r:t} f_{r:t}^\top` of ``f`` ``[R, C, T]``: ``[C, C]``.

    The output-side Kronecker factor of a convolution (``R`` columns times samples, ``T``
    positions). With many positions, per-row products :math:`f_r f_r^\top` summed in chunks of
    rows avoid the transposed ``[R T, C]`` copy that one product needs (3.4x faster for the
    first 3C3D layer on the CPU); otherwise one (symmetric) product of the copy.
    """
    r, c, t = f.shape
    if 2 * t < c:
        return gram(f.transpose(1, 2).reshape(r * t, c).T)
    step = max(1, CHUNK_ELEMENTS // (c * c))
    out = None
    for start in range(0, r, step):
        rows = f[start : start + step]
        part = torch.bmm(rows, rows.transpose(1, 2)).sum(0)
        out = part if out is None else out.add_(part)
    return out


def grouped_output_sum(output_sum: Tensor, groups: int) -> Tensor:
    """The diagonal blocks ``[G, out/G, out/G]`` of ``[out, out]``: one per group of channels."""
    o = output_sum.shape[0] // groups
    blocks = output_sum.reshape(groups, o, groups, o)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
