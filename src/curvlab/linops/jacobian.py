r"""The Jacobian of the model outputs over the data, and its transpose, as operators.

:class:`Jacobian` maps parameter space ``[P]`` to output space: one tensor ``[N_b, *out]`` per
batch, in the order of the batches, so that the flat output ``[Q]`` (``Q = N * prod(out)``)
stacks the batches' flattened outputs, row ``n * D + d`` for sample ``n`` of the concatenated
data. No loss is involved (the targets of ``data`` are ignored). :class:`JacobianT` is its
adjoint (output space to parameter space).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from curvlab.linops.base import CurvatureOperator
from curvlab.linops.empirical_risk import Data, ModelOperator, Params, functional_friendly


class Jacobian(ModelOperator):
    r"""The Jacobian :math:`J = \partial f / \partial \theta` ``[Q, P]`` over the data.

    Args:
        model: Any module.
        params: The parameters (``None``: all trainable ones).
        data: Re-iterable ``(inputs, targets)`` batches (targets unused).
        check_deterministic: Check at construction that two passes over the data agree.
    """

    self_adjoint = False

    def __init__(
        self, model: nn.Module, params: Params, data: Data, check_deterministic: bool = True
    ) -> None:
        super().__init__(model, None, params, data, check_deterministic)

    def _init_spaces(self) -> None:
        shapes = [tuple(p.shape) for p in self.params.values()]
        CurvatureOperator.__init__(
            self, shapes, self.output_shapes, self._dtype, self._device, list(self.params), None
        )

    def _matmat(self, matrix: Tensor) -> Tensor:
        columns = self._split(matrix)
        parts = []
        with functional_friendly(self.model):
            for _, inputs, _targets in self.batches():

                def f(p, inputs=inputs):
                    return self.model_output(p, inputs)

                out = vmap(lambda v: jvp(f, (self.params,), (v,))[1], randomness="same")(columns)
                parts.append(out.reshape(out.shape[0], -1))
        return torch.cat(parts, dim=1).T

    def _adjoint(self) -> CurvatureOperator:
        return JacobianT._of(self)


class JacobianT(CurvatureOperator):
    r"""The transposed Jacobian :math:`J^\top` ``[P, Q]`` over the data (see :class:`Jacobian`).

    Args:
        model: Any module.
        params: The parameters (``None``: all trainable ones).
        data: Re-iterable ``(inputs, targets)`` batches (targets unused).
        check_deterministic: Check at construction that two passes over the data agree.
    """

    def __init__(
        self, model: nn.Module, params: Params, data: Data, check_deterministic: bool = True
    ) -> None:
        self._set(Jacobian(model, params, data, check_deterministic))

    @classmethod
    def _of(cls, jacobian: Jacobian) -> JacobianT:
        new = cls.__new__(cls)
        new._set(jacobian)
        return new

    def _set(self, jacobian: Jacobian) -> None:
        self.jacobian = jacobian
        super().__init__(
            jacobian.out_shapes,
            jacobian.in_shapes,
            jacobian.dtype,
            jacobian.device,
            None,
            jacobian.in_names,
        )

    def _matmat(self, matrix: Tensor) -> Tensor:
        jac = self.jacobian
        total, start = None, 0
        with functional_friendly(jac.model):
            for (_, inputs, _targets), shape in zip(jac.batches(), jac.output_shapes, strict=True):
                size = math.prod(shape)
                block = matrix[start : start + size].T.reshape(matrix.shape[1], *shape)
                start += size
                _, pullback = vjp(lambda p, inputs=inputs: jac.model_output(p, inputs), jac.params)
                part = vmap(pullback)(block)[0]
                total = part if total is None else {k: total[k] + part[k] for k in total}
        return jac._join(total)

    def _adjoint(self) -> CurvatureOperator:
        return self.jacobian
