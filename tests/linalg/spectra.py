"""Explicit float64 test matrices Q diag(lambda) Q^T with known spectra."""

from __future__ import annotations

import torch

P = 100


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix ``[size, size]`` from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * r.diagonal().sign()


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The symmetric matrix ``[P, P]`` with these eigenvalues in a random orthonormal basis."""
    q = random_orthogonal(eigenvalues.numel(), seed)
    matrix = (q * eigenvalues) @ q.T
    return (matrix + matrix.T) / 2


def spectrum(name: str, size: int = P) -> torch.Tensor:
    """Named eigenvalue sequences ``[size]``, in ascending order."""
    i = torch.arange(1, size + 1, dtype=torch.float64)
    if name == "psd":  # polynomially decaying, like a curvature matrix
        values = 10.0 / i**1.5
    elif name == "indefinite":  # both signs, distinct, a few outliers
        values = torch.linspace(-1.0, 1.0, size, dtype=torch.float64) ** 3 * 4.0
        values[-3:] += torch.tensor([3.0, 5.0, 8.0], dtype=torch.float64)
        values[:2] -= torch.tensor([6.0, 3.0], dtype=torch.float64)
    elif name == "low_rank":  # PSD of rank 10, like a GGN with N C < P
        values = torch.zeros(size, dtype=torch.float64)
        values[:10] = torch.linspace(1.0, 5.0, 10, dtype=torch.float64)
    else:
        raise ValueError(name)
    return values.sort().values


def matrix(name: str, size: int = P, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, eigenvalues)`` for a named spectrum."""
    values = spectrum(name, size)
    return with_spectrum(values, seed), values
