r"""Eigenvalue-corrected KFAC (George et al., 2018) over the data, and its damped inverse.

:class:`EKFACOperator` keeps KFAC's eigenbasis and refits the diagonal in it. For a block
:math:`A \otimes B` (per group, see :mod:`curvlab.backprop.kron`) with :math:`A = Q_A
\Lambda_A Q_A^\top` and :math:`B = Q_B \Lambda_B Q_B^\top` (:meth:`~curvlab.backprop.
KronFactors.eigh`), the parameter matrix :math:`M` ``[b, a]`` is rotated to :math:`Q_B^\top M
Q_A` and the block is

.. math::
    \mathrm{EKFAC}(M) = Q_B \bigl( S \odot (Q_B^\top M Q_A) \bigr) Q_A^\top, \qquad
    S = r \sum_{n} \sum_m \bigl( Q_B^\top G_{mn} Q_A \bigr)^{\odot 2},

with :math:`G_{mn}` ``[b, a]`` the per-sample "gradient" of sample :math:`n` in the matrix view
of the layer's parameter: :math:`J_n^\top s_{mn}` for the back-propagated loss-Hessian square
root (``"type-2"``: exact; ``"mc"``: sampled labels) and :math:`\nabla \ell_n` for
``"empirical"``; for a ``Linear`` layer :math:`G_{mn} = s_{mn} x_n^\top`, so that :math:`(Q_B^\top
s_{mn})(Q_A^\top x_n)^\top` is what is squared. Over the whole data :math:`r` is that of the
loss over all samples (batches of unequal size weigh right). :math:`S` is the diagonal of
:math:`Q^\top G Q` with :math:`Q = Q_B \otimes Q_A` and :math:`G` the exact (or MC, or
empirical) block: among all matrices with KFAC's eigenbasis, EKFAC is the closest to :math:`G`
in the Frobenius norm. Blocks without Kronecker structure (:class:`~curvlab.backprop.
DenseBlock`: normalisation layers, attention) stay the whole block (its own eigenbasis gives
it exactly).

The per-sample gradients come from the engine (:class:`~curvlab.backprop.SqrtGGN` or
:class:`~curvlab.backprop.BatchGrad`, ``[M, N, *p]`` per parameter and batch), one extra pass
over the data after KFAC's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab.backprop import BatchGrad, DenseBlock, KronFactors, Layout, SqrtGGN, compute
from curvlab.backprop.kron import ParamValue, _as_tensors, _lead
from curvlab.linops.empirical_risk import Data, Params, generator_for
from curvlab.linops.kfac import KFACInverse, KFACOperator


@dataclass
class EigenCorrectedBlock:
    r"""One EKFAC block: KFAC's eigenbasis with refitted eigenvalues (module docstring).

    Attributes:
        input_vectors: :math:`Q_A` ``[G, a, a]``.
        output_vectors: :math:`Q_B` ``[G, b, b]``.
        corrections: :math:`S` ``[G, b, a]``, the eigenvalues in the basis
            :math:`Q_B \otimes Q_A`.
        layout: How the covered parameters map to the matrices ``[G, b, a]``.
        names: The covered parameters' names.
    """

    input_vectors: Tensor
    output_vectors: Tensor
    corrections: Tensor
    layout: Layout
    names: tuple[str, ...]

    def _rotate(self, value: ParamValue, scale: Tensor) -> ParamValue:
        tensors, bare = _as_tensors(value, len(self.names), f"block of {self.names}")
        lead = _lead(tensors, self.layout.shapes, f"block of {self.names}")
        qa, qb = self.input_vectors, self.output_vectors
        m = self.layout.to_matrix(tensors, lead)
        rotated = (qb.transpose(-2, -1) @ m @ qa) * scale
        out = self.layout.from_matrix(qb @ rotated @ qa.transpose(-2, -1), lead)
        return out[0] if bare else out

    def matvec(self, value: ParamValue) -> ParamValue:
        """The block times parameter-shaped ``value`` (optionally with a leading ``K``)."""
        return self._rotate(value, self.corrections)

    def solve(
        self, value: ParamValue, damping: float = 0.0, pi_damping: bool = False
    ) -> ParamValue:
        r"""Apply :math:`(\mathrm{EKFAC} + \lambda I)^{-1}`: divide by :math:`S + \lambda`.

        Raises:
            ValueError: For ``pi_damping`` (EKFAC has no factors to split the damping over).
        """
        if pi_damping:
            raise ValueError("EKFAC has no Kronecker factors to split the damping over")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        return self._rotate(value, 1.0 / (self.corrections + damping))

    def dense(self) -> Tensor:
        """The block ``[P, P]`` in the covered parameters' concatenated row-major flattening."""
        qa, qb, s = self.input_vectors, self.output_vectors, self.corrections
        g, na, nb = qa.shape[0], qa.shape[-1], qb.shape[-1]
        q = torch.einsum("gij,gkl->gikjl", qb, qa).reshape(g, nb * na, nb * na)
        blocks = (q * s.reshape(g, 1, -1)) @ q.transpose(-2, -1)
        index = self.layout.index_matrix(qa.device).reshape(g, -1)
        out = qa.new_zeros(self.layout.numel, self.layout.numel)
        out[index[:, :, None], index[:, None, :]] = blocks
        return out


class EKFACOperator(KFACOperator):
    r"""Eigenvalue-corrected KFAC of the GGN over the data (see the module docstring).

    Same arguments as :class:`~curvlab.linops.KFACOperator`: the eigenbasis is that of its
    blocks, and ``fisher_type`` also chooses the per-sample gradients that refit the
    eigenvalues (``"type-2"``: the exact loss-Hessian square root, ``"mc"``: ``mc_samples``
    sampled labels with the same seed, ``"empirical"``: the per-sample gradients).

    Attributes:
        blocks: :class:`EigenCorrectedBlock` per Kronecker block, the others
            :class:`~curvlab.backprop.DenseBlock` as in KFAC.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        params: Params,
        data: Data,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = True,
        seed: int = 0,
        check_deterministic: bool = True,
    ) -> None:
        super().__init__(
            model,
            loss_func,
            params,
            data,
            fisher_type,
            mc_samples,
            kfac_approx,
            separate_weight_and_bias,
            seed,
            check_deterministic,
        )
        self.mc_samples = mc_samples
        self.blocks = self._correct(self.blocks)

    def _per_sample_quantity(self):
        if self.fisher_type == "empirical":
            return BatchGrad()
        return SqrtGGN(None if self.fisher_type == "type-2" else self.mc_samples)

    def _correct(self, blocks: list) -> list:
        """Replace every Kronecker block by its eigenvalue-corrected form (one data pass)."""
        kron = [b for b in blocks if isinstance(b, KronFactors)]
        if not kron:
            return blocks
        bases = [b.eigh() for b in kron]
        sums = [
            b.input_factor.new_zeros(b.groups, b.output_factor.shape[-1], b.input_factor.shape[-1])
            for b in kron
        ]
        quantity = self._per_sample_quantity()
        names = [n for b in kron for n in b.names]
        for index, inputs, targets in self.batches():
            generator = generator_for(self.seed, index, self.device)
            results = compute(
                self.model,
                self.loss_func,
                inputs,
                targets,
                [quantity],
                generator=generator,
                params=names,
            )[quantity.name]
            if self.fisher_type == "empirical":  # g_n: weight r over all the data
                weight, values = self.batch_factor, {n: results[n][None] for n in names}
            else:  # SqrtGGN carries sqrt(r_b): reweight to the loss over all the data
                weight, values = self.batch_weight(targets.shape[0]), results
            for k, (block, (_, qa, _, qb)) in enumerate(zip(kron, bases, strict=True)):
                tensors = [values[n].flatten(end_dim=1) for n in block.names]  # [M*N, *p]
                m = block.layout.to_matrix(tensors, 1)  # [M*N, G, b, a]
                rotated = qb.transpose(-2, -1) @ m @ qa
                sums[k] += weight * rotated.square().sum(0)
        corrected = {
            id(b): EigenCorrectedBlock(qa, qb, s, b.layout, b.names)
            for b, (_, qa, _, qb), s in zip(kron, bases, sums, strict=True)
        }
        return [corrected.get(id(b), b) for b in blocks]

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> KFACInverse:
        r"""The damped inverse :math:`(\mathrm{EKFAC} + \lambda I)^{-1}` per block.

        Args:
            damping: :math:`\lambda \ge 0`.
            pi_damping: Not available: EKFAC's eigenvalues are not a Kronecker product.

        Returns:
            The inverse as a (self-adjoint) operator.

        Raises:
            ValueError: For ``pi_damping=True``.
        """
        if pi_damping:
            raise ValueError(
                "EKFACOperator.inverse has no pi_damping (the corrected eigenvalues are not a "
                "Kronecker product); use damping alone, or KFACOperator for pi-damping"
            )
        if damping < 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be finite and >= 0, got {damping}")
        return KFACInverse(self, damping)

    def trace(self) -> Tensor:
        r""":math:`\mathrm{tr}` of the operator: the sum of the corrected eigenvalues."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for block in self.blocks:
            if all(n in self.params for n in block.names):
                if isinstance(block, DenseBlock):
                    total = total + block.matrix.diagonal().sum()
                else:
                    total = total + block.corrections.sum()
        return total
