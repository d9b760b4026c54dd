"""Dense float64 references for the ViViT tests: the GGN, its eigenpairs, the MC factor."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.backprop import SqrtGGN, compute
from tests import reference
from tests.backprop.problems import PROBLEMS, build

PROBLEM_NAMES = ["mlp", "cnn2d", "residual-shared", "residual-conv-batchnorm"]
BY_NAME = {p.name: p for p in PROBLEMS}


def problem(name: str, loss: str, seed: int = 0):
    """``(model, loss_func, inputs, targets)`` of a test problem."""
    return build(BY_NAME[name], loss, seed)


def dense_ggn(model, loss_func, inputs: Tensor, targets: Tensor, subsampling=None) -> Tensor:
    """The exact GGN ``[P, P]`` of the samples used, as a batch of their own."""
    if subsampling is not None:
        inputs, targets = inputs[subsampling], targets[subsampling]
    return reference.ggn(model, loss_func, inputs, targets)


def mc_factor(model, loss_func, inputs, targets, seed: int, subsampling=None) -> Tensor:
    """The engine's ``SqrtGGN(mc_samples=1)`` factor flat, ``[M N, P]``, rescaled to r_S."""
    results = compute(
        model,
        loss_func,
        inputs,
        targets,
        [SqrtGGN(mc_samples=1)],
        subsampling=subsampling,
        generator=torch.Generator().manual_seed(seed),
    )
    factor = torch.cat([v.flatten(start_dim=2) for v in results["SqrtGGNMC"].values()], dim=2)
    if subsampling is not None and loss_func.reduction == "mean":
        factor = factor * (inputs.shape[0] / len(subsampling)) ** 0.5
    return factor.flatten(end_dim=1)


def top_eigh(matrix: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``'s top-``k`` eigenpairs, descending."""
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def rank(matrix: Tensor) -> int:
    """The numerical rank of a symmetric PSD matrix."""
    values = torch.linalg.eigvalsh(matrix)
    return int((values > 1e-9 * values.abs().max()).sum())


def separated(values: Tensor, gap: float = 1e-4) -> Tensor:
    """Mask of eigenvalues whose relative distance to their neighbours exceeds ``gap``."""
    scale = values.abs().max()
    diffs = (values[1:] - values[:-1]).abs() / scale
    left = torch.cat([diffs.new_ones(1), diffs])
    right = torch.cat([diffs, diffs.new_ones(1)])
    return (left > gap) & (right > gap)


def assert_eigenpairs(values: Tensor, vectors: Tensor, matrix: Tensor) -> None:
    """Eigenvalues equal the dense top ones; eigenvectors up to sign (well-separated ones)."""
    k = values.shape[0]
    ref_values, ref_vectors = top_eigh(matrix, k)
    scale = ref_values.abs().max()
    torch.testing.assert_close(values, ref_values, rtol=1e-9, atol=1e-10 * scale)
    mask = separated(ref_values)
    assert mask.any()
    signs = torch.sign((vectors * ref_vectors).sum(0))
    torch.testing.assert_close(
        (vectors * signs)[:, mask], ref_vectors[:, mask], rtol=1e-6, atol=1e-7
    )
