r"""Per-sample first- and second-order directional derivatives along the GGN's eigenvectors.

For the top-``k`` eigenvectors :math:`e_k` of the GGN of the samples ``S``
(:func:`~curvlab.vivit.eigh.ggn_eigh`) and every :math:`n \in S`:

* :math:`\gamma_{nk} = g_n^\top e_k`, the per-sample gradient :math:`g_n = \nabla_\theta \ell_n`
  (no :math:`1/N`) projected onto :math:`e_k`;
* :math:`\lambda_{nk} = e_k^\top G_n e_k` with :math:`G_n = J_n^\top H_n J_n` the per-sample
  GGN (MC: with the same sampled labels as the eigenvectors), so that
  :math:`r_S \sum_n \lambda_{nk} = \lambda_k`.

Both come from the Gram matrices of the same pass, with no further backward: since
:math:`V^\top e_k = \sqrt{\lambda_k}\, u_k`, :math:`\lambda_{nk} = \lambda_k \sum_m u_{mn,k}^2 /
r_S`, and :math:`\gamma_{nk} = \sum_{m'n'} \langle g_n, V_{m'n'} \rangle u_{m'n',k} /
\sqrt{\lambda_k}` with the gradient-factor Gram matrix from the rules'
:meth:`~curvlab.backprop.Rule.gram`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from curvlab.vivit.eigh import Blocks, Eigenspace, block_result, decompose


class DirectionalDerivatives(NamedTuple):
    """What :func:`directional_derivatives` returns (tensors, or dicts over the blocks)."""

    gammas: Tensor | dict
    r""":math:`\gamma_{nk} = g_n^\top e_k`, ``[|S|, k]``."""
    lambdas: Tensor | dict
    r""":math:`\lambda_{nk} = e_k^\top G_n e_k`, ``[|S|, k]``."""
    eigenvalues: Tensor | dict
    r""":math:`\lambda_k`, descending, ``[k]``."""
    eigenvectors: Tensor | dict
    r""":math:`e_k`, ``[P, k]`` (see :func:`~curvlab.vivit.eigh.ggn_eigh`)."""


def gammas_of(space: Eigenspace) -> Tensor:
    r""":math:`\gamma_{nk}` of one block, ``[N, k]``."""
    return space.gradient_gram @ space.coefficients


def lambdas_of(space: Eigenspace) -> Tensor:
    r""":math:`\lambda_{nk}` of one block, ``[N, k]``."""
    k = space.eigenvalues.shape[0]
    u = space.gram_vectors.reshape(space.columns, space.samples, k)
    return u.square().sum(0) * (space.eigenvalues / space.sample_scale)


def directional_derivatives(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    k: int,
    mc_samples: int | None = None,
    subsampling: Sequence[int] | None = None,
    per_parameter: Blocks = False,
    generator: torch.Generator | None = None,
) -> DirectionalDerivatives:
    r"""Per-sample :math:`\gamma_{nk}`, :math:`\lambda_{nk}` and the eigenpairs, in one pass.

    The arguments are those of :func:`~curvlab.vivit.eigh.ggn_eigh`; the samples ``n`` are
    those of ``subsampling`` (all if ``None``), in its order. With blocks, each block's
    derivatives use its own eigenvectors and the block's part of :math:`g_n` and :math:`G_n`.

    Returns:
        :class:`DirectionalDerivatives` ``(gammas, lambdas, eigenvalues, eigenvectors)``, each
        a tensor, or a dict over the blocks keyed as in :func:`~curvlab.vivit.eigh.ggn_eigh`.
    """
    _, spaces = decompose(
        model,
        loss_func,
        inputs,
        targets,
        k,
        mc_samples,
        subsampling,
        per_parameter,
        generator,
        gradients=True,
    )
    return DirectionalDerivatives(
        block_result(spaces, per_parameter, gammas_of),
        block_result(spaces, per_parameter, lambdas_of),
        block_result(spaces, per_parameter, lambda s: s.eigenvalues),
        block_result(spaces, per_parameter, lambda s: s.eigenvectors),
    )


def gradient_projections(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    k: int,
    **options,
) -> Tensor | dict:
    r"""First-order directional derivatives :math:`\gamma_{nk} = g_n^\top e_k`, ``[|S|, k]``.

    ``options`` as for :func:`directional_derivatives` (``mc_samples``, ``subsampling``,
    ``per_parameter``, ``generator``).
    """
    return directional_derivatives(model, loss_func, inputs, targets, k, **options).gammas


def curvature_projections(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    k: int,
    **options,
) -> Tensor | dict:
    r"""Second-order directional derivatives :math:`\lambda_{nk} = e_k^\top G_n e_k`, ``[|S|, k]``.

    ``options`` as for :func:`directional_derivatives`.
    """
    return directional_derivatives(model, loss_func, inputs, targets, k, **options).lambdas
