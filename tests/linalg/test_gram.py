"""Blocked symmetric Gram products against the plain product (float64)."""

from __future__ import annotations

import pytest
import torch

from curvlab.backprop.rules import conv
from curvlab.linalg import gram


@pytest.mark.parametrize(
    "shape",
    [
        (5, 40),  # one block: few rows
        (300, 200),  # one block: too few columns per row
        (300, 1200),  # two blocks
        (700, 2900),  # four blocks, uneven edges
        (3, 450, 1900),  # batched (grouped factors)
    ],
)
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_equals_product(shape, transposed):
    torch.manual_seed(0)
    u = torch.randn(*shape, dtype=torch.float64)
    if transposed:  # e.g. x.T for X^T X: a non-contiguous operand
        u = u.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = gram(u)
    torch.testing.assert_close(out, u @ u.transpose(-1, -2), rtol=1e-12, atol=1e-10)
    d = shape[-2]
    blocks = min(4, d // 144)
    if blocks >= 2 and shape[-1] >= 4 * d:  # blocked: the off-diagonal blocks are mirrored
        edges = torch.tensor([round(i * d / blocks) for i in range(1, blocks)])
        block = torch.bucketize(torch.arange(d), edges, right=True)
        off = block[:, None] != block[None, :]
        assert torch.equal(out[..., off], out.transpose(-1, -2)[..., off])


def test_gram_rejects_vectors():
    with pytest.raises(ValueError, match=r"\[\.\.\., D, K\].*\(7,\)"):
        gram(torch.ones(7))


@pytest.mark.parametrize("shape", [(6, 8, 3), (6, 4, 50), (1, 3, 9)])
def test_channel_gram_equals_einsum(shape, monkeypatch):
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 40)  # several chunks of rows
    torch.manual_seed(1)
    f = torch.randn(*shape, dtype=torch.float64)
    expected = torch.einsum("rct,rdt->cd", f, f)
    torch.testing.assert_close(conv.channel_gram(f), expected, rtol=1e-12, atol=1e-12)
