"""curvlab.optim.parts pieces that the optimizer tests do not reach on their own."""

from __future__ import annotations

import torch

from curvlab.optim import parts


def test_symmetric_eigh_retries_in_float64(monkeypatch):
    torch.manual_seed(0)
    a = torch.randn(2, 5, 5)
    matrix = a @ a.transpose(-2, -1)
    eigh, calls = torch.linalg.eigh, []

    def failing_in_float32(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    values, vectors = parts.symmetric_eigh(matrix)
    assert calls == [torch.float32, torch.float64]
    assert values.dtype == vectors.dtype == torch.float32
    rebuilt = vectors @ torch.diag_embed(values) @ vectors.transpose(-2, -1)
    torch.testing.assert_close(rebuilt, matrix, rtol=1e-4, atol=1e-4)


def test_adam_parts_match_torch_adam():
    torch.manual_seed(0)
    p, g = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    reference = p.clone().requires_grad_(True)
    adam = torch.optim.Adam([reference], lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in (1, 2, 3):
        reference.grad = g.clone()
        adam.step()
        parts.adam_moments(m, v, g, g, (0.8, 0.9))  # h = g: Adam itself
        p -= 0.1 * parts.bias_corrected_direction(m, v, step, (0.8, 0.9), 1e-6)
    torch.testing.assert_close(p, reference.detach())
