r"""KFAC over the data as an operator, from the engine's typed blocks, and its damped inverse.

:class:`KFACOperator` runs :func:`curvlab.backprop.compute` with ``KFAC`` (MC) or ``KFLR``
(exact loss Hessian, "type-2") on every batch and accumulates each parameter's block over the
data: the Kronecker factors' *statistics* add (not the per-batch products), so that over a
loader of unequal batches

.. math::
    A = \frac{\sum_b \sum_{n \in b, t} u u^\top}{\sum_b N_b T}, \qquad
    B = r \sum_b \sum_{m, n \in b, t} s s^\top,

exactly the factors of one batch holding all the data (:math:`r` of the loss over all ``N``
samples). The operator is block-diagonal over the blocks, each
:class:`~curvlab.backprop.KronFactors` (:math:`A \otimes B` in the column-major
:math:`\mathrm{vec}`, see ``docs/backprop.md``) or :class:`~curvlab.backprop.DenseBlock`
(normalisation layers, attention and modules without a Kronecker rule: the whole GGN block).
:meth:`KFACOperator.inverse` gives :math:`(A \otimes B + \lambda I)^{-1}` per block, exactly or
with Martens & Grosse's heuristic :math:`\pi`-damping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvlab.backprop import KFAC, KFLR, DenseBlock, KFACEmpirical, KronFactors, compute, pool
from curvlab.backprop.loss import LossSpec
from curvlab.linops.base import CurvatureOperator
from curvlab.linops.empirical_risk import Data, ModelOperator, Params, generator_for

Block = KronFactors | DenseBlock

#: The Fisher approximations :class:`KFACOperator` knows: ``"mc"`` (KFAC, sampled labels),
#: ``"type-2"`` (KFLR, the exact loss Hessian) and ``"empirical"`` (output gradients at the true
#: labels: the Kronecker approximation of the empirical Fisher).
FISHER_TYPES = ("mc", "type-2", "empirical")


class KFACOperator(ModelOperator):
    r"""The block-diagonal KFAC approximation of the GGN over the data (see the module docstring).

    Args:
        model: A module; layers with Kronecker rules (Linear, Conv, ConvTranspose, Embedding)
            get :class:`~curvlab.backprop.KronFactors`, the others whole blocks.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        params: The parameters (``None``: all trainable ones); a joint weight-and-bias block
            needs both. The engine works on the model's own parameter values.
        data: Re-iterable ``(inputs, targets)`` batches.
        fisher_type: ``"mc"`` (KFAC, ``mc_samples`` sampled labels), ``"type-2"`` (KFLR) or
            ``"empirical"`` (:math:`B` from the output gradients at the true labels).
        mc_samples: Sampled labels per input for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weights shared over positions.
        separate_weight_and_bias: ``False`` for one joint block per layer.
        seed: Seed of the MC samples.
        check_deterministic: Check at construction that two passes over the data agree.
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
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if fisher_type == "mc":
            self.quantity = KFAC(mc_samples, kfac_approx, separate_weight_and_bias)
        elif fisher_type == "type-2":
            self.quantity = KFLR(kfac_approx, separate_weight_and_bias)
        else:
            self.quantity = KFACEmpirical(kfac_approx, separate_weight_and_bias)
        self.fisher_type, self.seed = fisher_type, seed
        super().__init__(model, loss_func, params, data, check_deterministic)
        self.blocks = self._compute_blocks()

    def _compute_blocks(self) -> list[Block]:
        per_block: dict[tuple[str, ...], list[Block]] = {}
        for index, inputs, targets in self.batches():
            generator = generator_for(self.seed, index, self.device)
            results = compute(
                self.model, self.loss_func, inputs, targets, [self.quantity], generator=generator
            )[self.quantity.name]
            for name in self.params:
                if name not in results:
                    raise KeyError(
                        f"the engine returned no {self.quantity.name} block for "
                        f"{name!r} (frozen parameter?)"
                    )
                block = results[name]
                missing = [n for n in block.names if n not in self.params]
                if missing:
                    raise ValueError(
                        f"{name!r} shares a joint block with {missing}: include "
                        "them in params or use separate_weight_and_bias=True"
                    )
                per_block.setdefault(block.names, [])
                if name == block.names[0]:
                    per_block[block.names].append(block)
        r = LossSpec(self.loss_func).batch_factor(self.num_data)
        return [pool(blocks, r) for blocks in per_block.values()]

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self._apply(matrix, lambda block, value: block.matvec(value))

    def _apply(self, matrix: Tensor, fn) -> Tensor:
        columns = self._split(matrix)
        out: dict[str, Tensor] = {}
        for block in self.blocks:
            if not all(n in self.params for n in block.names):
                continue
            value = [columns[n] for n in block.names]
            result = fn(block, value[0] if len(value) == 1 else value)
            result = [result] if isinstance(result, Tensor) else result
            out.update(zip(block.names, result, strict=True))
        return self._join(out)

    def restrict(self, names: Sequence[str]) -> CurvatureOperator:
        """The blocks of the named parameters (joint blocks need all their names)."""
        new = super().restrict(names)
        for block in self.blocks:
            inside = [n in new.params for n in block.names]
            if any(inside) and not all(inside):
                raise ValueError(f"cannot split the joint block of {block.names}")
        return new

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> KFACInverse:
        r"""The damped inverse :math:`(A \otimes B + \lambda I)^{-1}` per block.

        Args:
            damping: :math:`\lambda \ge 0`.
            pi_damping: Use :math:`(A + \pi\sqrt\lambda I)^{-1} \otimes (B +
                \frac{\sqrt\lambda}{\pi} I)^{-1}` (Martens & Grosse, 2015) for Kronecker
                blocks; whole blocks get :math:`(G + \lambda I)^{-1}`.

        Returns:
            The inverse as a (self-adjoint) operator.
        """
        return KFACInverse(self, damping, pi_damping)

    def trace(self) -> Tensor:
        r""":math:`\mathrm{tr}` of the operator: :math:`\sum \mathrm{tr}(A)\,\mathrm{tr}(B)` per block."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for block in self.blocks:
            if all(n in self.params for n in block.names):
                if isinstance(block, DenseBlock):
                    total = total + block.matrix.diagonal().sum()
                else:
                    ta = block.input_factor.diagonal(dim1=-2, dim2=-1).sum(-1)
                    tb = block.output_factor.diagonal(dim1=-2, dim2=-1).sum(-1)
                    total = total + (ta * tb).sum()
        return total


class KFACInverse(CurvatureOperator):
    r"""The damped inverse of a :class:`KFACOperator`, block by block (the blocks' ``solve``).

    Args:
        kfac: The operator.
        damping: :math:`\lambda \ge 0`.
        pi_damping: Heuristic factored damping (see :meth:`KFACOperator.inverse`).
    """

    self_adjoint = True

    def __init__(self, kfac: KFACOperator, damping: float = 0.0, pi_damping: bool = False) -> None:
        if damping < 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be finite and >= 0, got {damping}")
        super().__init__(
            kfac.in_shapes, kfac.out_shapes, kfac.dtype, kfac.device, kfac.in_names, kfac.out_names
        )
        self.kfac, self.damping, self.pi_damping = kfac, damping, pi_damping

    def _matmat(self, matrix: Tensor) -> Tensor:
        def solve(block, value):
            return block.solve(value, damping=self.damping, pi_damping=self.pi_damping)

        return self.kfac._apply(matrix, solve)
