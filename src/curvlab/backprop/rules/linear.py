r"""Rule for ``nn.Linear``: :math:`y = x W^\top + b` on inputs ``[N, *T, in]``.

The per-sample weight gradient is :math:`\sum_t g_{nt} x_{nt}^\top`; norms and squares use
factored forms (outer products of inputs and output gradients) that never form ``[N, out, in]``
when ``T = 1`` (so do the Gram matrices of :meth:`LinearRule.gram`:
:math:`(x_n \cdot x_{n'})(g_{mn} \cdot g_{m'n'})`); with ``T > 1`` the norm uses Gram matrices
over ``t`` when that is cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.backprop.rules.base import Call, KronSums, Rule
from curvlab.linalg.gram import gram


def _flat(module: nn.Linear, call: Call, factors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Inputs as ``[N, T, in]`` and the factor as ``[M, N, T, out]``."""
    x = call.args[0]
    factor = factors[0]
    m, n = factor.shape[:2]
    return x.reshape(n, -1, module.in_features), factor.reshape(m, n, -1, module.out_features)


class LinearRule(Rule):
    """Derivatives of ``nn.Linear`` (see the module docstring)."""

    linear_in_input = True
    kronecker = True
    channels_last = True

    def jac_t(  # noqa: D102
        self, module: nn.Linear, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        x, g = _flat(module, call, factors)
        out = {}
        if "weight" in names:
            out["weight"] = torch.einsum("mnto,nti->mnoi", g, x)
        if "bias" in names:
            out["bias"] = g.sum(2)
        return out

    def sum_jac_t(  # noqa: D102
        self, module: nn.Linear, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        x, g = _flat(module, call, factors)
        out = {}
        if "weight" in names:
            out["weight"] = torch.einsum("mnto,nti->moi", g, x)
        if "bias" in names:
            out["bias"] = g.sum((1, 2))
        return out

    def sum_sq_jac_t(  # noqa: D102
        self,
        module: nn.Linear,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        per_sample: bool,
    ) -> dict[str, Tensor]:
        x, g = _flat(module, call, factors)
        if x.shape[1] != 1:
            return super().sum_sq_jac_t(module, call, factors, names, per_sample)
        x2, g2 = x[:, 0].square(), g[:, :, 0].square()  # [N, in], [M, N, out]
        out = {}
        if "weight" in names:
            eq = "mno,ni->noi" if per_sample else "mno,ni->oi"
            out["weight"] = torch.einsum(eq, g2, x2)
        if "bias" in names:
            out["bias"] = g2.sum(0) if per_sample else g2.sum((0, 1))
        return out

    def sq_norm_jac_t(  # noqa: D102
        self, module: nn.Linear, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        x, g = _flat(module, call, factors)
        t = x.shape[1]
        out = {}
        if t == 1:  # reductions without temporaries; the bias shares the output-side norms
            g_norms = torch.linalg.vector_norm(g[:, :, 0], dim=-1).square_()  # [M, N]
            if "weight" in names:
                out["weight"] = g_norms * torch.linalg.vector_norm(x[:, 0], dim=-1).square_()
            if "bias" in names:
                out["bias"] = g_norms
            return out
        if "weight" in names:
            if t * (module.in_features + module.out_features) < (
                module.in_features * module.out_features
            ):
                gram_x = torch.einsum("nti,nsi->nts", x, x)
                gram_g = torch.einsum("mnto,mnso->mnts", g, g)
                out["weight"] = (gram_g * gram_x).sum((-2, -1))
            else:
                out["weight"] = torch.einsum("mnto,nti->mnoi", g, x).square().sum((-2, -1))
        if "bias" in names:
            out["bias"] = g.sum(2).square().sum(-1)
        return out

    def gram(  # noqa: D102
        self,
        module: nn.Linear,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        other: tuple[Tensor, ...] | None = None,
    ) -> dict[str, Tensor]:
        x, g = _flat(module, call, factors)
        if x.shape[1] != 1:
            return super().gram(module, call, factors, names, other)
        h = g if other is None else _flat(module, call, other)[1]
        # <g_mn x_n^T, h_kq x_q^T> = (g_mn . h_kq)(x_n . x_q): no [M, N, out, in] tensor
        out = {"bias": torch.einsum("mno,kqo->mnkq", g[:, :, 0], h[:, :, 0])}
        if "weight" in names:
            inputs = x[:, 0]
            out["weight"] = out["bias"] * (inputs @ inputs.T)[None, :, None, :]
        if "bias" not in names:
            del out["bias"]
        return out

    def factored_per_sample(self, module: nn.Linear, call: Call) -> bool:  # noqa: D102
        return math.prod(call.args[0].shape[1:-1]) == 1

    def sample_jac_t(  # noqa: D102
        self,
        module: nn.Linear,
        call: Call,
        factors: tuple[Tensor, ...],
        name: str,
        samples: Tensor,
        elements: Tensor,
    ) -> Tensor:
        # element (o, i) of sample n: sum_t g_{m,n,t,o} x_{n,t,i}, O(M T) each
        x, g = _flat(module, call, factors)  # [N, T, in], [M, N, T, out]
        if name == "bias":
            return g.sum(2)[:, samples, elements]
        rows, columns = elements // module.in_features, elements % module.in_features
        if x.shape[1] == 1:  # no positions: one product per element
            return g[:, samples, 0, rows] * x[samples, 0, columns]
        picked_g = g.permute(1, 3, 0, 2)[samples, rows]  # [B, M, T]
        picked_x = x.permute(0, 2, 1)[samples, columns]  # [B, T]
        return torch.einsum("bmt,bt->mb", picked_g, picked_x)

    def sample_block_jac_t(  # noqa: D102
        self,
        module: nn.Linear,
        call: Call,
        factors: tuple[Tensor, ...],
        name: str,
        samples: Tensor,
        rows: Tensor,
        columns: Tensor,
    ) -> Tensor:
        # sum_t g_{m,n,t,rows} x_{n,t,columns}: an outer product per sample when T = 1
        x, g = _flat(module, call, factors)  # [N, T, in], [M, N, T, out]
        m, t = g.shape[0], g.shape[2]
        s, r = rows.shape
        if t == 1:  # one outer product per sample, no positions to sum
            picked = g[:, samples, 0].gather(2, rows[None].expand(m, s, r))  # [M, S, R]
            if name == "bias":
                return picked.unsqueeze(-1)
            return picked[..., None] * x[samples, 0].gather(1, columns)[None, :, None, :]
        picked_g = g[:, samples].gather(3, rows[None, :, None, :].expand(m, s, t, r))
        if name == "bias":
            return picked_g.sum(2).unsqueeze(-1)  # [M, S, R, 1]
        picked_x = x[samples].gather(2, columns[:, None, :].expand(s, t, columns.shape[1]))
        return torch.einsum("mstr,stc->msrc", picked_g, picked_x)

    def jvp(self, module: nn.Linear, call: Call, name: str, vectors: Tensor) -> tuple[Tensor, ...]:  # noqa: D102
        x = call.args[0]
        if name == "weight":
            return (torch.einsum("n...i,koi->kn...o", x, vectors),)
        return (
            vectors.reshape(vectors.shape[0], *[1] * (x.dim() - 1), -1).expand(
                vectors.shape[0], *x.shape[:-1], -1
            ),
        )

    def kron_sums(  # noqa: D102
        self,
        module: nn.Linear,
        call: Call,
        factors: tuple[Tensor, ...],
        names: list[str],
        approx: str = "expand",
    ) -> dict[str, KronSums]:
        x, g = _flat(module, call, factors)  # [N, T, in], [M, N, T, out]
        if x.shape[1] == 1 or approx == "expand":
            rows = x.reshape(-1, module.in_features)
            output_sum = gram(g.reshape(-1, module.out_features).T)
        else:  # reduce: one row per sample, the positions' mean
            rows = x.mean(1)
            output_sum = gram(g.sum(2).reshape(-1, module.out_features).T)
        out = {}
        if "weight" in names:
            out["weight"] = KronSums(gram(rows.T), rows.shape[0], output_sum, rows.sum(0))
        if "bias" in names:  # the exact block: position-summed output gradients
            bias_sum = output_sum
            if x.shape[1] > 1 and approx == "expand":
                bias_sum = gram(g.sum(2).reshape(-1, module.out_features).T)
            out["bias"] = KronSums(None, rows.shape[0], bias_sum)
        return out

    # ------------------------------------------------------------------ input side
    def diag_backprop(  # noqa: D102
        self,
        module: nn.Linear,
        call: Call,
        d_out: Tensor,
        grad_out: Tensor | None,
        vjp: Callable[[Tensor], Tensor],
    ) -> Tensor:
        return d_out @ module.weight.detach().square()

    def diag_params(  # noqa: D102
        self, module: nn.Linear, call: Call, d_out: Tensor, names: list[str]
    ) -> dict[str, Tensor]:
        x = call.args[0]
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).square()
        ds = d_out.reshape(d_out.shape[0], -1, d_out.shape[-1])
        out = {}
        if "weight" in names:
            out["weight"] = torch.einsum("nto,nti->oi", ds, xs)
        if "bias" in names:
            out["bias"] = ds.sum((0, 1))
        return out

    def ggn_backprop(self, module: nn.Linear, x: Tensor, g_bar: Tensor) -> Tensor:  # noqa: D102
        if x.dim() == 2:  # one position: W^T G W
            w = module.weight.detach()
            return w.T @ g_bar @ w
        return super().ggn_backprop(module, x, g_bar)
