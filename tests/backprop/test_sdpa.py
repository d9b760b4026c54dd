"""``F.scaled_dot_product_attention`` inside a custom module against dense float64 references.

The attention core has no parameters: its projections are ``nn.Linear`` layers with their own
rules and the core is functional glue between them, which the batched backward passes and the
per-sample VJPs go through. The exact Hessian diagonal takes the generic path (the core's
second derivatives are not in the signed-factor Hessian) and says so.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.backprop import (
    BatchDiagGGN,
    BatchGrad,
    BatchL2,
    DiagGGN,
    DiagHessian,
    GenericPathWarning,
    SumGradSquared,
    compute,
)
from tests import reference
from tests.backprop.problems import LOSSES, make_targets


class SelfAttention(nn.Module):
    """Multi-head self-attention written with ``F.scaled_dot_product_attention``.

    Args:
        features: Model width ``D``.
        heads: Number of heads (divides ``D``).
        causal: Passed as ``is_causal``.
        dropout: ``dropout_p`` passed explicitly, or ``None`` to leave the default.
    """

    def __init__(self, features: int, heads: int, causal: bool, dropout: float | None) -> None:
        super().__init__()
        self.qkv = nn.Linear(features, 3 * features)
        self.out = nn.Linear(features, features)
        self.heads, self.causal, self.dropout = heads, causal, dropout

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, D] -> [N, T, D]``."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, T, D / heads]
        kwargs = {} if self.dropout is None else {"dropout_p": self.dropout}
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, **kwargs)
        return self.out(a.transpose(1, 2).reshape(n, t, d))


class AttentionNet(nn.Module):
    """Attention, tanh, mean over the sequence and a linear head."""

    def __init__(self, causal: bool, dropout: float | None) -> None:
        super().__init__()
        self.attn = SelfAttention(8, 2, causal, dropout)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, 8] -> [N, 3]``."""
        return self.head(self.act(self.attn(x)).mean(1))


def _case(causal: bool, dropout: float | None, loss: str):
    torch.manual_seed(0)
    model = AttentionNet(causal, dropout).double().eval()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    loss_func = LOSSES[loss]()
    return model, loss_func, x, make_targets(loss_func, model(x).detach())


def _flat(values: dict[str, Tensor], start: int) -> Tensor:
    return torch.cat([v.flatten(start) for v in values.values()], -1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout", [None, 0.0])
@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
def test_first_order_and_ggn_on_the_fast_rules(causal, dropout, loss):
    model, loss_func, x, y = _case(causal, dropout, loss)
    quantities = [BatchGrad(), BatchL2(), SumGradSquared(), DiagGGN(), BatchDiagGGN()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)
        results = compute(model, loss_func, x, y, quantities)
    per_sample = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    torch.testing.assert_close(_flat(results["BatchGrad"], 1), per_sample)
    batch_l2 = torch.stack(list(results["BatchL2"].values())).sum(0)  # [N], over parameters
    torch.testing.assert_close(batch_l2, per_sample.square().sum(1))
    torch.testing.assert_close(_flat(results["SumGradSquared"], 0), per_sample.square().sum(0))
    torch.testing.assert_close(
        _flat(results["DiagGGN"], 0), reference.ggn(model, loss_func, x, y).diagonal()
    )
    per_sample_ggn = reference.per_sample_ggn(model, loss_func, x, y)  # [N, P, P]
    torch.testing.assert_close(
        _flat(results["BatchDiagGGN"], 1), per_sample_ggn.diagonal(dim1=1, dim2=2)
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout", [None, 0.0])
def test_hessian_diagonal_equals_the_dense_reference(causal, dropout):
    model, loss_func, x, y = _case(causal, dropout, "ce-mean")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = compute(model, loss_func, x, y, [DiagHessian()], method="func")
    assert not [w for w in caught if issubclass(w.category, GenericPathWarning)]
    expected = reference.hessian_diagonal(model, loss_func, x, y)
    torch.testing.assert_close(_flat(results["DiagHessian"], 0), expected)
    fast = compute(model, loss_func, x, y, [DiagHessian()])
    torch.testing.assert_close(_flat(fast["DiagHessian"], 0), expected)
