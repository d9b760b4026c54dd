r"""GGN eigenpairs from the Gram matrix of its square-root factor (ViViT, Dangel et al., 2022).

With :math:`G = V V^\top`, :math:`V \in \mathbb{R}^{P \times MN}` (:mod:`~curvlab.vivit.factors`),
the non-zero eigenvalues of :math:`G` are those of the Gram matrix
:math:`\tilde G = V^\top V \in \mathbb{R}^{MN \times MN}`, and if :math:`\tilde G u_k = \lambda_k
u_k` then :math:`e_k = V u_k / \sqrt{\lambda_k}` is a unit eigenvector of :math:`G`. One
extended backward pass (:func:`curvlab.backprop.compute`) gives the factors, the Gram matrix is
summed over parameters from the rules' :meth:`~curvlab.backprop.Rule.gram` (factored for
``Linear`` layers with one position: :math:`(x_n \cdot x_{n'})(g_{mn} \cdot g_{m'n'})`; other
layers form their ``[M, N, *p]`` VJPs one parameter at a time), and the factors are dropped once
the eigenvectors are formed.

Conventions: the GGN is that of the samples used as a batch of their own,
:math:`G = r_S \sum_{n \in S} J_n^\top H_n J_n` with :math:`r_S = 1/|S|` for
``reduction="mean"`` (``1`` for ``"sum"``), ``S`` the subsample (``subsampling``) or the whole
batch; MC (``mc_samples=k``) replaces :math:`H_n` by :math:`\frac1k \sum_i s_{ni} s_{ni}^\top`.
Eigenvectors are flat in the order of ``model.named_parameters()`` (each parameter flattened
row-major, as ``torch.cat([p.flatten() for p in params])``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.backprop import compute
from curvlab.backprop.results import Results
from curvlab.vivit.factors import FactorQuantity, GradientFactor, ParamFactor

Blocks = bool | Sequence[Sequence[str]]
"""``per_parameter``: ``False`` (the whole network), ``True`` (one block per parameter), or
groups of parameter names (one block per group)."""


@dataclass
class Eigenspace:
    r"""The top-``k`` eigenpairs of one GGN block and what the directional derivatives need.

    Attributes:
        names: The block's parameters, in ``named_parameters()`` order.
        eigenvalues: :math:`\lambda_k`, descending, ``[k]``.
        eigenvectors: :math:`e_k` as columns, flat over the block's parameters, ``[P_b, k]``.
        gram_vectors: :math:`u_k` of the Gram matrix, ``[M N, k]`` (index ``m N + n``).
        coefficients: :math:`u_k / \sqrt{\lambda_k}` (zero where :math:`\lambda_k` is zero),
            ``[M N, k]``: :math:`e_k = V` ``coefficients[:, k]``.
        valid: ``[k]``, where :math:`\lambda_k` is numerically non-zero (else :math:`e_k = 0`).
        columns: ``M``.
        samples: ``N`` (the subsample's size).
        sample_scale: :math:`r_S`.
        gradient_gram: :math:`\langle g_n, V_{m'n'} \rangle`, ``[N, M N]``, if asked for.
    """

    names: list[str]
    eigenvalues: Tensor
    eigenvectors: Tensor
    gram_vectors: Tensor
    coefficients: Tensor
    valid: Tensor
    columns: int
    samples: int
    sample_scale: float
    gradient_gram: Tensor | None = field(default=None, repr=False)


def block_names(names: list[str], per_parameter: Blocks) -> list[list[str]]:
    """The blocks of parameter names that ``per_parameter`` asks for.

    Raises:
        ValueError: A group names an unknown or frozen parameter, or one twice.
    """
    if per_parameter is False:
        return [list(names)]
    if per_parameter is True:
        return [[name] for name in names]
    groups = [list(group) for group in per_parameter]
    flat = [name for group in groups for name in group]
    unknown = sorted(set(flat) - set(names))
    if unknown or len(flat) != len(set(flat)) or any(not g for g in groups):
        raise ValueError(
            f"per_parameter groups must be non-empty, disjoint lists of trainable parameter "
            f"names; unknown: {unknown}, trainable: {names}"
        )
    return [[name for name in names if name in group] for group in groups]


def _block_key(names: list[str], per_parameter: Blocks) -> str | tuple[str, ...]:
    return names[0] if per_parameter is True else tuple(names)


def decompose(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    k: int,
    mc_samples: int | None = None,
    subsampling: Sequence[int] | None = None,
    per_parameter: Blocks = False,
    generator: torch.Generator | None = None,
    gradients: bool = False,
) -> tuple[Results, list[Eigenspace]]:
    r"""One pass, the Gram matrices and the top-``k`` eigenpairs of every block.

    Args:
        model: The model (see :func:`curvlab.backprop.compute`).
        loss_func: Its loss function.
        inputs: ``[N, ...]``.
        targets: The targets.
        k: Eigenpairs per block, at most ``M · |S|``.
        mc_samples: ``None`` (exact loss Hessian) or MC samples per input.
        subsampling: Indices of the samples whose GGN is decomposed (``None``: all).
        per_parameter: The blocks (:data:`Blocks`).
        generator: Random number generator for MC sampling.
        gradients: Also form :math:`\langle g_n, V_{m'n'} \rangle` (directional derivatives).

    Returns:
        The engine's results (loss, gradient) and one :class:`Eigenspace` per block.

    Raises:
        ValueError: ``k`` is not a positive int or exceeds ``M · |S|``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    reduction = getattr(loss_func, "reduction", "mean")
    factor_quantity = FactorQuantity(mc_samples, reduction)
    quantities = [factor_quantity] + ([GradientFactor()] if gradients else [])
    results = compute(
        model, loss_func, inputs, targets, quantities, subsampling=subsampling, generator=generator
    )
    factors: dict[str, ParamFactor] = results[factor_quantity.name]
    grad_factors: dict[str, ParamFactor] = results[GradientFactor().name] if gradients else {}
    names = list(factors)
    spaces = []
    cache: dict = {}
    for block in block_names(names, per_parameter):
        spaces.append(_eigenspace(block, factors, grad_factors, k, cache, reduction))
    cache.clear()
    for factor in [*factors.values(), *grad_factors.values()]:
        factor.release()
    return results, spaces


def _eigenspace(
    block: list[str],
    factors: dict[str, ParamFactor],
    grad_factors: dict[str, ParamFactor],
    k: int,
    cache: dict,
    reduction: str,
) -> Eigenspace:
    first = factors[block[0]]
    columns = max(factors[name].columns for name in block)
    samples = max(factors[name].samples for name in block)
    size = columns * samples
    sample_scale = 1.0 / samples if reduction == "mean" and samples else 1.0
    if k > size:
        raise ValueError(
            f"k = {k} exceeds the rank bound M · N = {columns} · {samples} = {size} of the GGN "
            f"block {block}"
        )
    gram = first.param.new_zeros(size, size)
    for name in block:
        value = factors[name].gram(cache=cache)
        if value is not None:
            gram += value.reshape(size, size)
    values, vectors = torch.linalg.eigh(gram)
    del gram
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    tol = values[0].clamp_min(0) * size * torch.finfo(values.dtype).eps
    valid = values > tol
    values = torch.where(valid, values, values.new_zeros(()))
    coefficients = torch.where(valid, vectors / values.sqrt(), vectors.new_zeros(()))
    c = coefficients.T.reshape(k, columns, samples)
    eigenvectors = torch.cat([factors[name].contract(c).reshape(k, -1) for name in block], dim=1).T
    gradient_gram = None
    if grad_factors:
        gradient_gram = first.param.new_zeros(samples, size)
        for name in block:
            value = grad_factors[name].gram(factors[name], cache=cache)
            if value is not None:
                gradient_gram += value.reshape(samples, size)
    return Eigenspace(
        block,
        values,
        eigenvectors,
        vectors,
        coefficients,
        valid,
        columns,
        samples,
        sample_scale,
        gradient_gram,
    )


def block_result(spaces: list[Eigenspace], per_parameter: Blocks, attribute) -> object:
    """``attribute(space)`` of the one block, or a dict over the blocks (see :func:`ggn_eigh`)."""
    if per_parameter is False:
        return attribute(spaces[0])
    return {_block_key(space.names, per_parameter): attribute(space) for space in spaces}


def ggn_eigh(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    k: int,
    mc_samples: int | None = None,
    subsampling: Sequence[int] | None = None,
    per_parameter: Blocks = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor] | tuple[dict, dict]:
    r"""The top-``k`` eigenpairs of the GGN, from the Gram matrix :math:`V^\top V`.

    :math:`G = r_S \sum_{n \in S} J_n^\top H_n J_n = V V^\top` (module docstring); the Gram
    matrix is ``[M |S|, M |S|]`` with ``M`` the loss Hessian's square-root columns (``C`` for
    classification) or ``mc_samples``. Cost: one extended backward pass, the Gram matrix and one
    ``eigh`` of it; no Lanczos iterations.

    Args:
        model: Any model :func:`curvlab.backprop.compute` handles.
        loss_func: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: The batch ``[N, ...]``.
        targets: Its targets.
        k: How many eigenpairs (per block), at most ``M |S|``.
        mc_samples: ``None`` for the exact GGN, ``k`` for the MC GGN with ``k`` sampled labels
            per input (``1`` is ViViT's cheap variant).
        subsampling: Indices of the samples ``S`` whose GGN is decomposed (``None``: all).
        per_parameter: ``False``: the whole network's GGN. ``True``: each parameter's diagonal
            block. A list of lists of parameter names: each group's block (block-diagonal).
        generator: Random number generator for MC sampling.

    Returns:
        ``(eigenvalues, eigenvectors)``: eigenvalues descending ``[k]``, eigenvectors as
        orthonormal columns ``[P, k]`` flat over ``named_parameters()`` (trainable ones, each
        flattened row-major). With blocks, two dicts keyed by the parameter name (``True``) or
        by the group as a tuple of names, holding ``[k]`` and ``[P_b, k]`` (flat over the
        block's parameters, in ``named_parameters()`` order). Where the GGN has rank below
        ``k`` the trailing eigenvalues are ``0`` and their eigenvectors zero.

    Raises:
        ValueError: ``k`` out of range, or unknown parameter groups.
    """
    _, spaces = decompose(
        model, loss_func, inputs, targets, k, mc_samples, subsampling, per_parameter, generator
    )
    return (
        block_result(spaces, per_parameter, lambda s: s.eigenvalues),
        block_result(spaces, per_parameter, lambda s: s.eigenvectors),
    )
