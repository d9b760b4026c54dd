"""The attention rule (MultiheadAttention as two linear layers around its core) against references."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from curvlab.backprop import (
    KFLR,
    BatchGrad,
    BatchL2,
    DiagGGN,
    GenericPathWarning,
    KronFactors,
    SumGradSquared,
    compute,
    recording,
)
from curvlab.backprop.rules import find_rule
from curvlab.backprop.rules.attention import AttentionRule
from tests import reference
from tests.backprop.problems import LOSSES, make_targets


class Encoder(nn.Module):
    """A transformer encoder layer (batch first, no dropout) and a linear head on the mean."""

    def __init__(self, mask: str | None = None) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, 3)
        self.mask = mask

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        kwargs = {}
        if self.mask == "causal":
            kwargs["src_mask"] = nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
            kwargs["is_causal"] = True
        elif self.mask == "bool":
            kwargs["src_mask"] = torch.ones(t, t, dtype=torch.bool).triu(2)
        elif self.mask == "padding":
            padding = torch.zeros(x.shape[0], t, dtype=torch.bool)
            padding[:, -1] = True
            kwargs["src_key_padding_mask"] = padding
        return self.head(self.layer(x, **kwargs).mean(1))


def _case(mask: str | None, loss: str, n: int = 3, t: int = 4):
    torch.manual_seed(0)
    model = Encoder(mask).double().eval()
    x = torch.randn(n, t, 8, dtype=torch.float64)
    loss_func = LOSSES[loss]()
    return model, loss_func, x, make_targets(loss_func, model(x).detach())


@pytest.mark.parametrize("mask", [None, "causal", "bool", "padding"])
@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
def test_per_sample_gradients_and_ggn_diagonal(mask, loss):
    model, loss_func, x, y = _case(mask, loss)
    recording._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)  # the rule, not the generic path
        results = compute(model, loss_func, x, y, [BatchGrad(), DiagGGN(), SumGradSquared()])
    per_sample = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    ours = torch.cat([v.flatten(1) for v in results["BatchGrad"].values()], dim=1)
    torch.testing.assert_close(ours, per_sample, rtol=1e-8, atol=1e-10)
    ggn = reference.ggn(model, loss_func, x, y)
    diag = torch.cat([v.flatten() for v in results["DiagGGN"].values()])
    torch.testing.assert_close(diag, ggn.diagonal(), rtol=1e-8, atol=1e-10)
    sgs = torch.cat([v.flatten() for v in results["SumGradSquared"].values()])
    torch.testing.assert_close(sgs, per_sample.square().sum(0), rtol=1e-8, atol=1e-10)


def test_kflr_of_attention_is_the_ggn_block_for_one_token():
    """One sample, one position: the in- and out-projection blocks are exactly Kronecker."""
    model, loss_func, x, y = _case(None, "ce-mean", n=1, t=1)
    results = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    ggn = reference.ggn(model, loss_func, x, y)
    start = 0
    checked = 0
    for name, p in model.named_parameters():
        size = p.numel()
        if "self_attn" in name:
            block = results[name]
            assert isinstance(block, KronFactors)
            expected = ggn[start : start + size, start : start + size]
            torch.testing.assert_close(block.dense(), expected, rtol=1e-8, atol=1e-10, msg=name)
            checked += 1
        start += size
    assert checked == 4


def test_batch_l2_uses_no_per_sample_gradients(monkeypatch):
    model, loss_func, x, y = _case(None, "ce-mean")

    def forbidden(*args, **kwargs):
        raise AssertionError("per-sample gradients formed")

    monkeypatch.setattr(AttentionRule, "jac_t", forbidden)
    compute(model, loss_func, x, y, [BatchL2()])


def test_uncovered_variants_use_the_generic_path():
    cross = nn.MultiheadAttention(4, 2, batch_first=True)
    rule = find_rule(cross)
    assert isinstance(rule, AttentionRule)
    zero = nn.MultiheadAttention(4, 2, batch_first=True, add_zero_attn=True)
    assert not rule.applies(zero, [])
    second = nn.MultiheadAttention(4, 2, batch_first=False)
    assert not rule.applies(second, [])
