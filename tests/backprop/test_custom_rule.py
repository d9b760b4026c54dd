"""The worked example of docs/backprop.md ("Adding a rule for your own module") against dense
references: a custom module with its own rule gets every quantity, the recursions included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from curvlab.backprop import RULES, compute
from tests import reference
from tests.test_docs_snippets import extract_blocks

DOC = Path(__file__).resolve().parents[2] / "docs" / "backprop.md"


@pytest.fixture(scope="module")
def example() -> dict:
    """The namespace of the docs' custom-rule block (its own asserts run too)."""
    block = next(b for b in extract_blocks(DOC) if "class ScaleRule(Rule)" in b.code)
    namespace: dict = {}
    exec(compile(block.code, block.name, "exec"), namespace)  # noqa: S102
    yield namespace
    RULES.pop(namespace["Scale"], None)


def _case(example: dict, loss: str):
    torch.manual_seed(1)
    scale = example["Scale"](5)
    with torch.no_grad():
        scale.weight.copy_(torch.linspace(0.5, 2.0, 5))
    model = nn.Sequential(nn.Linear(4, 5), scale, nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    loss_func = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    y = torch.randint(0, 3, (6,)) if loss == "ce" else torch.randn(6, 3, dtype=torch.float64)
    return model, loss_func, x, y


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_custom_rule_matches_dense_references(example, loss):
    model, loss_func, x, y = _case(example, loss)
    q = [example[n]() for n in ("BatchGrad", "DiagGGN", "DiagHessian", "HesScale", "BL89", "KFAC")]
    results = compute(model, loss_func, x, y, q)
    flat = {
        k: torch.cat([v.flatten(1 if k == "BatchGrad" else 0) for v in results[k].values()], -1)
        for k in ("BatchGrad", "DiagGGN", "DiagHessian", "HesScale", "BL89")
    }
    torch.testing.assert_close(
        flat["BatchGrad"], reference.per_sample_gradients(model, loss_func, x, y)
    )
    torch.testing.assert_close(flat["DiagGGN"], reference.ggn(model, loss_func, x, y).diagonal())
    torch.testing.assert_close(
        flat["DiagHessian"], reference.hessian_diagonal(model, loss_func, x, y)
    )
    for name, exact in (("HesScale", True), ("BL89", False)):
        expected = reference.diagonal_recursion(model, loss_func, x, y, exact_last_layer=exact)
        torch.testing.assert_close(flat[name], expected, msg=name)
    ggn = reference.ggn(model, loss_func, x, y)
    start = sum(p.numel() for p in model[0].parameters())
    block = results["KFAC"]["1.weight"]
    exact_block = ggn[start : start + 5, start : start + 5]
    assert block.dense().shape == exact_block.shape
