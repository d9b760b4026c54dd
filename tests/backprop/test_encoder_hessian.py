"""Exact Hessian diagonals through a TransformerEncoderLayer or attention (blocks.py), no HVPs."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

from curvlab.backprop import (
    HMP,
    BatchDiagHessian,
    DiagGGN,
    DiagHessian,
    GenericPathWarning,
    blocks,
    compute,
    general,
)
from tests import reference
from tests.backprop.problems import LOSSES, make_targets


class EncoderNet(nn.Module):
    """One encoder layer on the input, then linear operations only (mean or flatten, head)."""

    def __init__(self, pool: str = "mean", **options) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=12, dropout=0.0, batch_first=True, **options
        )
        self.pool = pool
        self.head = nn.Linear(8 if pool == "mean" else 8 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.head(h.mean(1) if self.pool == "mean" else h.flatten(1))


class ProjectedEncoderNet(EncoderNet):
    """A Linear layer before the encoder: its input then depends on parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.inp(x))


class AttentionOnlyNet(nn.Module):
    """Self-attention on the input, then linear operations only."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        mask = None
        if self.causal:
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        return self.head(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0].mean(1))


def _case(model: nn.Module, loss: str, seed: int = 0):
    torch.manual_seed(seed)
    model = model.double().eval()
    for p in model.parameters():  # away from the initialization's small attention scores
        p.data.normal_(0.0, 0.7)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    loss_func = LOSSES[loss]()
    return model, loss_func, x, make_targets(loss_func, model(x).detach())


def _compute(model, loss_func, x, y, quantities):
    """``compute`` that fails on the whole-model fallback (its warning is one-time: reset)."""
    with warnings.catch_warnings(), mock.patch.object(general, "_WARNED", set()):
        warnings.simplefilter("error", GenericPathWarning)  # the block route, no fallback
        return compute(model, loss_func, x, y, quantities)


@pytest.mark.parametrize("loss", ["ce-mean", "ce-sum", "mse-mean", "bce-sum"])
@pytest.mark.parametrize(
    ("pool", "activation"), [("mean", "relu"), ("flatten", "relu"), ("mean", "gelu")]
)
def test_diag_hessian_through_encoder_layer(loss, pool, activation):
    model, loss_func, x, y = _case(EncoderNet(pool, activation=activation), loss)
    ours = _compute(model, loss_func, x, y, [DiagHessian()])["DiagHessian"]
    expected = reference.hessian_diagonal(model, loss_func, x, y)
    actual = torch.cat([ours[name].flatten() for name, _ in model.named_parameters()])
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("activation", ["relu", nn.GELU(approximate="tanh")], ids=["relu", "gelu"])
def test_batch_diag_hessian_through_encoder_layer(loss, activation):
    model, loss_func, x, y = _case(EncoderNet(activation=activation), loss, seed=1)
    ours = _compute(model, loss_func, x, y, [BatchDiagHessian(), DiagHessian()])
    expected = reference.per_sample_hessian_diagonals(model, loss_func, x, y)
    actual = torch.cat(
        [ours["BatchDiagHessian"][name].flatten(1) for name, _ in model.named_parameters()], 1
    )
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_encoder_residuals_are_not_zero():
    """The layer norms' and softmax's terms matter here: the GGN alone is far off."""
    model, loss_func, x, y = _case(EncoderNet(), "ce-mean")
    ours = _compute(model, loss_func, x, y, [DiagHessian(), DiagGGN()])
    name = "encoder.self_attn.in_proj_weight"
    assert (ours["DiagHessian"][name] - ours["DiagGGN"][name]).abs().max() > 1e-3


def _spy_route(monkeypatch) -> list[str | None]:
    """Record why the block route did not apply (``None`` when it did)."""
    reasons: list[str | None] = []
    route = general._block_route

    def spy(*args):
        residuals, why = route(*args)
        reasons.append(why)
        return residuals, why

    monkeypatch.setattr(general, "_block_route", spy)
    return reasons


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (EncoderNet(norm_first=True), "norm_first=True"),
        (EncoderNet(activation=torch.tanh), "an activation other than ReLU or GELU"),
        (ProjectedEncoderNet(), "an input that depends on parameters"),
    ],
    ids=["norm-first", "tanh", "parameters-upstream"],
)
def test_uncovered_encoders_fall_back_exactly(model, reason, monkeypatch):
    model, loss_func, x, y = _case(model, "ce-mean")
    reasons = _spy_route(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        ours = compute(model, loss_func, x, y, [DiagHessian()])["DiagHessian"]
    assert reason in reasons[0]
    expected = reference.hessian_diagonal(model, loss_func, x, y)
    actual = torch.cat([ours[name].flatten() for name, _ in model.named_parameters()])
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_hessian_products_keep_the_whole_model_path(monkeypatch):
    """HMP needs factors of the whole Hessian: the block route does not apply."""
    model, loss_func, x, y = _case(EncoderNet(), "ce-mean")
    reasons = _spy_route(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        compute(model, loss_func, x, y, [HMP()])
    assert "other than DiagHessian" in reasons[0]


@pytest.mark.parametrize("quantity", [DiagHessian(), BatchDiagHessian()], ids=lambda q: q.name)
def test_residuals_in_chunks_of_samples(quantity, monkeypatch):
    """One sample per chunk gives the same values as the whole batch at once."""
    model, loss_func, x, y = _case(EncoderNet(), "ce-mean", seed=2)
    whole = _compute(model, loss_func, x, y, [quantity])[quantity.name]
    monkeypatch.setattr(blocks, "CHUNK_ELEMENTS", 1)
    chunked = _compute(model, loss_func, x, y, [quantity])[quantity.name]
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
def test_diag_hessian_through_attention_only(loss):
    model, loss_func, x, y = _case(AttentionOnlyNet(), loss, seed=3)
    ours = _compute(model, loss_func, x, y, [DiagHessian(), BatchDiagHessian()])
    expected = reference.hessian_diagonal(model, loss_func, x, y)
    actual = torch.cat(
        [ours["DiagHessian"][name].flatten() for name, _ in model.named_parameters()]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    per_sample = reference.per_sample_hessian_diagonals(model, loss_func, x, y)
    actual = torch.cat(
        [ours["BatchDiagHessian"][name].flatten(1) for name, _ in model.named_parameters()], 1
    )
    torch.testing.assert_close(actual, per_sample, rtol=1e-9, atol=1e-12)


def test_masked_attention_falls_back_exactly(monkeypatch):
    """Attention is not linear in its parameters: without the block route, the exact fallback."""
    model, loss_func, x, y = _case(AttentionOnlyNet(causal=True), "ce-mean", seed=4)
    reasons = _spy_route(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        ours = compute(model, loss_func, x, y, [DiagHessian()])["DiagHessian"]
    assert "a mask or is_causal" in reasons[0]
    expected = reference.hessian_diagonal(model, loss_func, x, y)
    actual = torch.cat([ours[name].flatten() for name, _ in model.named_parameters()])
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
