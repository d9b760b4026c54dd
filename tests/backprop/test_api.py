"""Results, naming, subsampling, generic-path warnings and errors that name the culprit."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from curvlab.backprop import (
    BL89,
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGN,
    BatchDiagHessian,
    BatchGrad,
    BatchL2,
    DenseBlock,
    DiagGGN,
    DiagHessian,
    GenericPathWarning,
    HesScale,
    Quantity,
    SqrtGGN,
    UnsupportedLossError,
    UnsupportedModuleError,
    compute,
)
from tests import reference
from tests.backprop.problems import PROBLEMS, AttentionNet, build, generic_attention


@pytest.mark.parametrize(
    ("quantity", "name"),
    [
        (DiagGGN(), "DiagGGN"),
        (DiagGGN(mc_samples=1), "DiagGGNMC"),
        (DiagGGN(mc_samples=8), "DiagGGNMC8"),
        (BatchDiagGGN(mc_samples=1), "BatchDiagGGNMC"),
        (SqrtGGN(), "SqrtGGN"),
        (KFAC(), "KFAC"),
        (KFAC(mc_samples=4), "KFACMC4"),
        (KFLR(), "KFLR"),
        (BatchL2(), "BatchL2"),
    ],
)
def test_quantity_names(quantity, name):
    assert quantity.name == name


def test_exact_and_mc_in_one_pass():
    model, loss_func, x, y = build(PROBLEMS[0], "ce-mean")
    results = compute(model, loss_func, x, y, [DiagGGN(), DiagGGN(mc_samples=1)])
    assert set(results) == {"DiagGGN", "DiagGGNMC"}


def test_results_indexed_by_object_and_name():
    model, loss_func, x, y = build(PROBLEMS[0], "ce-mean")
    results = compute(model, loss_func, x, y, [BatchGrad()])
    assert results[BatchGrad()] is results["BatchGrad"]


def test_keys_are_named_parameters():
    model, loss_func, x, y = build(PROBLEMS[5], "mse-mean")
    results = compute(model, loss_func, x, y, [DiagGGN()])
    assert list(results["DiagGGN"]) == [n for n, _ in model.named_parameters()]


def test_loss_matches_user_loss():
    model, loss_func, x, y = build(PROBLEMS[0], "bce-sum")
    results = compute(model, loss_func, x, y)
    assert torch.equal(results.loss, loss_func(model(x), y).detach())


def test_param_grad_untouched():
    model, loss_func, x, y = build(PROBLEMS[0], "mse-mean")
    compute(model, loss_func, x, y, [BatchGrad()])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum"])
def test_subsampling_batch_grad(loss):
    model, loss_func, x, y = build(PROBLEMS[2], loss)
    full = compute(model, loss_func, x, y, [BatchGrad()])["BatchGrad"]
    sub = compute(model, loss_func, x, y, [BatchGrad()], subsampling=[2, 0])["BatchGrad"]
    assert all(torch.allclose(sub[k], full[k][[2, 0]]) for k in full)


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_subsampling_diag_ggn(loss):
    model, loss_func, x, y = build(PROBLEMS[5], loss)
    ours = compute(model, loss_func, x, y, [DiagGGN()], subsampling=[1, 3])["DiagGGN"]
    per_sample = reference.per_sample_ggn(model, loss_func, x, y)
    r = 1.0 / x.shape[0] if loss_func.reduction == "mean" else 1.0
    expected = r * torch.diagonal(per_sample[[1, 3]], dim1=1, dim2=2).sum(0)
    actual = torch.cat([v.flatten() for v in ours.values()])
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


def _named(name: str):
    return next(p for p in PROBLEMS if p.name == name)


def test_generic_path_warns_naming_modules():
    model, loss_func, x, y = generic_attention("ce-mean")
    from curvlab.backprop import recording

    recording._WARNED.clear()
    with pytest.warns(GenericPathWarning, match=r"MultiheadAttention \('attn'\)"):
        compute(model, loss_func, x, y, [BatchGrad()])


def test_generic_path_warns_once():
    model, loss_func, x, y = build(_named("attention-layernorm"), "ce-mean")
    compute_quietly = functools.partial(compute, model, loss_func, x, y, [BatchGrad()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compute_quietly()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)
        compute_quietly()


def test_hessian_fallback_names_the_obstacle():
    model, loss_func, x, y = build(_named("layernorm-mlp"), "ce-mean")
    from curvlab.backprop import recording

    recording._WARNED.clear()
    with pytest.warns(GenericPathWarning, match=r"LayerNorm \(module '1'\) is not linear"):
        compute(model, loss_func, x, y, [DiagHessian()])


def test_kfac_on_large_generic_parameter_names_it(monkeypatch):
    """A module without a Kronecker rule gets whole GGN blocks, within MAX_FULL_BLOCK."""
    from curvlab.backprop import recording

    model, loss_func, x, y = generic_attention("ce-mean")
    monkeypatch.setattr(recording, "MAX_FULL_BLOCK", 40)  # in_proj_weight has 48 entries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            UnsupportedModuleError,
            match=r"MultiheadAttention \(module 'attn'\).*'in_proj_weight' \(48 entries\)",
        ):
            compute(model, loss_func, x, y, [KFAC()])


def test_kfac_covers_grouped_and_transposed_convolutions():
    for problem in ("cnn1d-grouped", "conv-transpose"):
        model, loss_func, x, y = build(_named(problem), "ce-mean")
        results = compute(model, loss_func, x, y, [KFAC()])
        assert list(results["KFAC"]) == [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize("quantity", [KFRA()])
def test_kfra_names_a_shared_module(quantity):
    model, loss_func, x, y = build(_named("residual-shared"), "ce-mean")
    with pytest.raises(UnsupportedModuleError, match=r"is called more than once"):
        compute(model, loss_func, x, y, [quantity])


@pytest.mark.parametrize("quantity", [KFRA(), BL89(), HesScale()])
def test_recursions_name_unsupported_module(quantity):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match=r"LayerNorm \(module '1'\)"):
        compute(model, nn.MSELoss(), x, torch.randn(5, 2, dtype=torch.float64), [quantity])


class GradNormHistogram(Quantity):
    """A user-defined quantity: per-sample gradient norms binned, without storing BatchGrad."""

    def sources(self):
        return ("grad",)

    def evaluate(self, view, ctx):
        return torch.histc(view.sq_norm("grad")[0].sqrt(), bins=3, min=0.0, max=10.0)


def test_custom_quantity_extends_the_engine():
    model, loss_func, x, y = build(PROBLEMS[0], "ce-mean")
    results = compute(model, loss_func, x, y, [GradNormHistogram(), BatchGrad()])
    norms = results["BatchGrad"]["0.weight"].flatten(1).norm(dim=1)
    expected = torch.histc(norms, bins=3, min=0.0, max=10.0)
    assert torch.equal(results["GradNormHistogram"]["0.weight"], expected)


def test_kfac_covers_layernorm_with_exact_block():
    model, loss_func, x, y = build(_named("layernorm-mlp"), "mse-mean")
    block = compute(model, loss_func, x, y, [KFLR()])["KFLR"]["1.weight"]
    assert isinstance(block, DenseBlock)
    ggn = reference.ggn(model, loss_func, x, y)
    start = sum(p.numel() for p in list(model.parameters())[:2])
    torch.testing.assert_close(block.dense(), ggn[start : start + 4, start : start + 4])


@pytest.mark.parametrize("loss", ["mse-sum", "ce-mean"])
def test_subsampling_diag_hessian(loss):
    model, loss_func, x, y = build(_named("mlp-activations"), loss)
    full = compute(model, loss_func, x, y, [BatchDiagHessian()])["BatchDiagHessian"]
    sub = compute(model, loss_func, x, y, [DiagHessian()], subsampling=[3, 1])["DiagHessian"]
    r = 1.0 / x.shape[0] if loss_func.reduction == "mean" else 1.0
    assert all(torch.allclose(sub[k], r * full[k][[3, 1]].sum(0)) for k in full)


def test_batchnorm_in_training_mode_is_rejected():
    model, loss_func, x, y = build(PROBLEMS[8], "ce-mean")
    model.train()
    with pytest.raises(UnsupportedModuleError, match=r"BatchNorm1d \(module 'bn'\)"):
        compute(model, loss_func, x, y, [BatchGrad()])


def test_batch_second_attention_is_rejected():
    model = AttentionNet().double().eval()
    model.attn.batch_first = False  # now attends over the batch: samples are coupled
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModuleError, match="'attn'.*samples independently"):
            compute(model, nn.CrossEntropyLoss(), x, y, [BatchGrad()])


def test_inplace_modification_is_rejected():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match=r"Linear \(module '0'\).*in place"):
        compute(model, nn.MSELoss(), x, torch.randn(5, 2, dtype=torch.float64), [BatchGrad()])


@pytest.mark.parametrize(
    "loss_func",
    [nn.NLLLoss(), nn.MSELoss(reduction="none"), nn.CrossEntropyLoss(weight=torch.ones(3))],
)
def test_unsupported_losses_are_rejected(loss_func):
    model, _, x, y = build(PROBLEMS[0], "ce-mean")
    with pytest.raises(UnsupportedLossError, match=type(loss_func).__name__):
        compute(model, loss_func, x, y, [DiagGGN()])


def test_unknown_method_is_rejected():
    model, loss_func, x, y = build(PROBLEMS[0], "ce-mean")
    with pytest.raises(ValueError, match="method"):
        compute(model, loss_func, x, y, [DiagGGN()], method="backpack")


def test_duplicate_quantity_is_rejected():
    model, loss_func, x, y = build(PROBLEMS[0], "ce-mean")
    with pytest.raises(ValueError, match="DiagGGN"):
        compute(model, loss_func, x, y, [DiagGGN(), DiagGGN()])


def test_rule_on_a_sequence_first_tensor_is_rejected():
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = self.proj(x.transpose(0, 1))  # [T, N, 3]: dim 0 is not the batch
            return self.head(h.mean(0))

    model = SequenceFirst().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with pytest.raises(
        UnsupportedModuleError, match=r"Linear \(module 'proj'\) has shape \[5, 4, 3\]"
    ):
        compute(model, nn.CrossEntropyLoss(), x, torch.randint(0, 2, (4,)), [BatchL2()])
