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

The per-sample gradients come from the engine, one extra pass over the data after KFAC's: an
engine quantity reduces them parameter by parameter (at most one parameter's per-sample VJPs
``[M, N, *p]`` at a time), and a ``Linear`` layer called once on ``[N, in]`` never forms them
(the squared rotated outer product is the outer product of the squared rotated factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab.backprop import (
    EXACT,
    GRAD,
    Context,
    DenseBlock,
    KronEigen,
    KronFactors,
    Layout,
    MonteCarloSqrt,
    ParamDerivatives,
    Quantity,
    Source,
    compute,
)
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


class _EigenCorrection(Quantity):
    r"""Engine quantity: :math:`\sum_{m,n} (Q_B^\top G_{mn} Q_A)^{\odot 2}` ``[G, b, a]`` per block.

    Reduced parameter by parameter inside the engine, so that at most one parameter's
    per-sample VJPs ``[M, N, *p]`` exist at a time; a ``Linear`` layer called once without
    shared positions never forms them: :math:`G_{mn} = s_{mn} x_n^\top`, so the square of the
    rotated matrix is the outer product :math:`(Q_B^\top s_{mn})^{\odot 2} ((Q_A^\top
    x_n)^{\odot 2})^\top`. A joint weight-and-bias block returns both VJPs, reduced by
    :meth:`reduce` afterwards.

    Args:
        source: The back-propagated factor (exact, MC, or the per-sample gradient).
        layouts: Each block's layout, by its names.
        bases: Each block's eigendecompositions, by its names.
    """

    def __init__(
        self,
        source: Source,
        layouts: dict[tuple[str, ...], Layout],
        bases: dict[tuple[str, ...], KronEigen],
    ) -> None:
        self.source, self.layouts, self.bases = source, layouts, bases
        self.block_of = {n: names for names in layouts for n in names}

    def sources(self) -> tuple[Source, ...]:  # noqa: D102
        return (self.source,)

    def reduce(self, names: tuple[str, ...], matrices: Tensor) -> Tensor:
        """``[G, b, a]`` from the per-sample matrices ``[R, G, b, a]`` of block ``names``."""
        basis = self.bases[names]
        rotated = basis.output_vectors.transpose(-2, -1) @ matrices @ basis.input_vectors
        return rotated.square().sum(0)

    def _linear(self, view: ParamDerivatives, names: tuple[str, ...]) -> Tensor | None:
        """The factored form for a ``Linear`` layer called once on ``[N, in]`` (else ``None``)."""
        if len(view.uses) != 1 or len(view.uses[0][0].calls) != 1:
            return None
        owner, local = view.uses[0]
        if not isinstance(owner.module, nn.Linear) or local not in ("weight", "bias"):
            return None
        call = owner.calls[0]
        x, factor = call.args[0], view.factors[self.source][call][0]
        if x.dim() != 2 or factor.dim() != 3:
            return None
        basis = self.bases[names]
        output = (factor @ basis.output_vectors[0]).square_().sum(0)  # [N, b]
        if local == "bias":
            out = output.sum(0)[None, :, None]
        else:
            inputs = (x @ basis.input_vectors[0]).square_()  # [N, a]
            out = (output.T @ inputs)[None]
        return out * view.scale**2

    def evaluate(self, view: ParamDerivatives, ctx: Context) -> Tensor:  # noqa: D102
        names = self.block_of[view.name]
        if len(names) > 1:
            return view.jac_t(self.source)
        factored = self._linear(view, names)
        if factored is not None:
            return factored
        vjps = view.jac_t(self.source).flatten(end_dim=1)  # [M * N, *p]
        return self.reduce(names, self.layouts[names].to_matrix([vjps], 1))


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

    def _source(self) -> Source:
        if self.fisher_type == "empirical":
            return GRAD
        return EXACT if self.fisher_type == "type-2" else MonteCarloSqrt(self.mc_samples)

    def _correct(self, blocks: list) -> list:
        """Replace every Kronecker block by its eigenvalue-corrected form (one data pass)."""
        kron = [b for b in blocks if isinstance(b, KronFactors)]
        if not kron:
            return blocks
        bases = {b.names: b.eigh() for b in kron}
        quantity = _EigenCorrection(self._source(), {b.names: b.layout for b in kron}, bases)
        sums = {
            b.names: b.input_factor.new_zeros(
                b.groups, b.output_factor.shape[-1], b.input_factor.shape[-1]
            )
            for b in kron
        }
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
            for block in kron:
                if len(block.names) == 1:
                    part = results[block.names[0]]
                else:  # a joint block: the weight's and the bias's VJPs side by side
                    tensors = [results[n].flatten(end_dim=1) for n in block.names]
                    part = quantity.reduce(block.names, block.layout.to_matrix(tensors, 1))
                sums[block.names] += self.batch_factor * part
        corrected = {
            id(b): EigenCorrectedBlock(
                bases[b.names].input_vectors,
                bases[b.names].output_vectors,
                sums[b.names],
                b.layout,
                b.names,
            )
            for b in kron
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
