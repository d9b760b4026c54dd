r"""Operators of a model over a data set: parameters, the loop over batches, normalisation.

:class:`ModelOperator` is the base of every operator built as ``Op(model, loss_func, params,
data)``. It resolves the parameters, counts the data, checks that two passes over the data agree
(on by default) and runs the model functionally (:func:`torch.func.functional_call`), so that
any ``forward`` works. A subclass implements one batch's product with ``K`` columns at once.

**Normalisation over a loader.** The curvature is that of the loss over the *union* of the
batches, :math:`L = r \sum_{n=1}^{N} \ell_n` with :math:`r = 1/N` (``reduction="mean"``,
:math:`N` the total number of samples) or :math:`r = 1` (``"sum"``); :math:`\ell_n` is the
per-sample loss of ``docs/backprop.md`` ("Conventions"). A batch of :math:`N_b` samples whose own
loss is :math:`L_b = r_b \sum_{n \in b} \ell_n` therefore enters with the weight :math:`r / r_b`
(:math:`N_b / N` for a mean), whatever the batch sizes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.backprop.functional import explicit_initial_states
from curvlab.backprop.loss import LossSpec
from curvlab.linops.base import CurvatureOperator

Params = Mapping[str, Tensor] | Iterable[Tensor] | None
"""Which parameters span the operator: ``None`` (every trainable parameter), a dict by
``named_parameters()`` name (the values are the point of evaluation), or an iterable of the
model's parameters."""

Data = Iterable[tuple[object, Tensor]]
"""A re-iterable collection of ``(inputs, targets)`` batches (a list, a ``DataLoader``)."""


class NondeterminismError(ValueError):
    """Two passes over the data disagree (shuffling, augmentation, dropout in training mode)."""


def resolve_params(model: nn.Module, params: Params) -> dict[str, Tensor]:
    """The parameters by name, detached, in the order given (``named_parameters()`` for ``None``).

    Raises:
        KeyError: A name the model does not have, or a tensor that is not one of its parameters.
    """
    named = dict(model.named_parameters())
    if params is None:
        return {k: p.detach() for k, p in named.items() if p.requires_grad}
    if isinstance(params, Mapping):
        unknown = [k for k in params if k not in named]
        if unknown:
            raise KeyError(f"parameters {unknown} are not in the model; known: {list(named)}")
        return {k: torch.as_tensor(v).detach() for k, v in params.items()}
    by_id = {id(p): k for k, p in named.items()}
    out = {}
    for i, p in enumerate(params):
        if id(p) not in by_id:
            raise KeyError(
                f"params[{i}] (shape {list(p.shape)}) is not a parameter of the model; "
                "pass a dict by name to evaluate at other values"
            )
        out[by_id[id(p)]] = p.detach()
    return out


@contextmanager
def functional_friendly(model: nn.Module) -> Iterator[None]:
    """Run a model so that forward- and reverse-mode ``torch.func`` transforms work through it.

    Attention uses the math kernel (the fused CPU kernels have no forward-mode derivative),
    ``nn.MultiheadAttention``'s fused fast path is off for the block, and recurrent layers get
    explicit initial states (:func:`curvlab.backprop.functional.explicit_initial_states`).
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]), explicit_initial_states(model):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _fingerprint(x: object) -> Tensor | None:
    """Three numbers that change when a tensor changes (for the determinism check)."""
    if not isinstance(x, Tensor):
        return None
    flat = x.detach().reshape(-1).to(torch.float64)
    weights = torch.linspace(0.5, 1.5, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), flat.square().sum(), (flat * weights).sum()]).cpu()


class ModelOperator(CurvatureOperator):
    r"""Base of the operators of a model over data (see the module docstring).

    Subclasses implement :meth:`_batch_matmat`: one batch's contribution for ``K`` columns
    given per parameter ``[K, *p]``, already weighted; the base sums over the batches.

    Args:
        model: Any module (samples processed independently: BatchNorm in eval mode).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction ``"mean"`` or ``"sum"``, or ``None`` (operators of the model alone).
        params: See :data:`Params`.
        data: See :data:`Data`.
        check_deterministic: Run two passes over the data at construction and raise
            :class:`NondeterminismError` if batches, targets or model outputs differ.
    """

    self_adjoint = True

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module | None,
        params: Params,
        data: Data,
        check_deterministic: bool = True,
    ) -> None:
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of batches or a DataLoader), not a "
                "one-shot iterator: every product passes over it again"
            )
        self.model = model
        self.loss_func = loss_func
        self.spec = None if loss_func is None else LossSpec(loss_func)
        self.params = resolve_params(model, params)
        if not self.params:
            raise ValueError("the operator needs at least one parameter")
        self.data = data
        first = next(iter(self.params.values()))
        self._dtype, self._device = first.dtype, first.device
        self.batch_sizes, self.output_shapes = self._scan(check_deterministic)
        self.num_data = sum(self.batch_sizes)
        if self.num_data == 0:
            raise ValueError("data holds no samples")
        self._init_spaces()
        self._init_keep(False)

    # ------------------------------------------------------------------ spaces
    def _init_spaces(self) -> None:
        shapes = [tuple(p.shape) for p in self.params.values()]
        names = list(self.params)
        CurvatureOperator.__init__(self, shapes, shapes, self._dtype, self._device, names, names)

    @property
    def batch_factor(self) -> float:
        r""":math:`r` of the loss over all the data: ``1/N`` (mean) or ``1`` (sum)."""
        return self.spec.batch_factor(self.num_data) if self.spec is not None else 1.0

    def batch_weight(self, batch_size: int) -> float:
        r"""The weight :math:`r / r_b` of a batch's own loss in the loss over all the data."""
        return self.batch_factor / self.spec.batch_factor(batch_size)

    # ------------------------------------------------------------------ data
    def batches(self) -> Iterator[tuple[int, object, Tensor]]:
        """``(index, inputs, targets)`` for every batch, moved to the operator's device."""
        for index, (inputs, targets) in enumerate(self.data):
            if isinstance(inputs, Tensor):
                inputs = inputs.to(self._device)
                if inputs.is_floating_point():
                    inputs = inputs.to(self._dtype)
            targets = targets.to(self._device)
            if targets.is_floating_point():
                targets = targets.to(self._dtype)
            yield index, inputs, targets

    def model_output(self, params: Mapping[str, Tensor], inputs: object) -> Tensor:
        """The model output ``[N, *out]`` at ``params`` (others at their values), functionally."""
        fixed = {k: p.detach() for k, p in self.model.named_parameters() if k not in params}
        return functional_call(self.model, {**fixed, **params}, (inputs,))

    def _scan(self, check: bool) -> tuple[list[int], list[tuple[int, ...]]]:
        """Batch sizes and output shapes; with ``check`` two passes that must agree."""
        passes = []
        for _ in range(2 if check else 1):
            record = []
            with torch.no_grad(), functional_friendly(self.model):
                for index, inputs, targets in self.batches():
                    output = self.model_output(self.params, inputs)
                    if self.spec is not None:
                        self.spec.check(output, targets)
                    prints = (_fingerprint(inputs), _fingerprint(targets), _fingerprint(output))
                    record.append((index, targets.shape[0], tuple(output.shape), prints))
            passes.append(record)
        if check:
            self._compare(*passes)
        return [r[1] for r in passes[0]], [r[2] for r in passes[0]]

    def _compare(self, first: list, second: list) -> None:
        hint = (
            "; pass check_deterministic=False to skip this check (the operator is then not "
            "a fixed matrix)"
        )
        if len(first) != len(second):
            raise NondeterminismError(
                f"two passes over the data gave {len(first)} and {len(second)} batches{hint}"
            )
        tol = 1e-5 if self._dtype == torch.float32 else 1e-10
        for a, b in zip(first, second, strict=True):
            for what, x, y in zip(("inputs", "targets", "model outputs"), a[3], b[3], strict=True):
                if a[1:3] != b[1:3] or (
                    x is not None and not torch.allclose(x, y, rtol=tol, atol=tol)
                ):
                    raise NondeterminismError(
                        f"batch {a[0]}: the {what} differ between two passes over the data{hint}"
                    )

    # ------------------------------------------------------------------ products
    def _split(self, matrix: Tensor) -> dict[str, Tensor]:
        """Flat columns ``[P, K]`` as parameter-shaped columns ``[K, *p]``, contiguous.

        Contiguous: batched products (``vmap``, ``is_grads_batched``) on the strided view copy
        inside every operation (MLP, 16 Hessian columns: 57x a gradient instead of 26x).
        """
        out, start = {}, 0
        for name, p in self.params.items():
            size = p.numel()
            block = matrix[start : start + size].T.contiguous()
            out[name] = block.reshape(matrix.shape[1], *p.shape)
            start += size
        return out

    def _join(self, columns: Mapping[str, Tensor]) -> Tensor:
        """Parameter-shaped columns ``[K, *p]`` as flat columns ``[P, K]``."""
        return torch.cat([columns[k].reshape(columns[k].shape[0], -1) for k in self.params], 1).T

    def _batch_matmat(
        self, index: int, inputs: object, targets: Tensor, columns: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """One batch's weighted contribution, ``[K, *p]`` per parameter."""
        raise NotImplementedError

    def _matmat(self, matrix: Tensor) -> Tensor:
        columns = self._split(matrix)
        total = None
        with functional_friendly(self.model):
            for index, inputs, targets in self.batches():
                part = self._batch_matmat(index, inputs, targets, columns)
                total = part if total is None else {k: total[k] + part[k] for k in total}
        return self._join(total)

    def restrict(self, names: Sequence[str]) -> CurvatureOperator:
        """The same operator on the named parameters only (differentiates only those)."""
        unknown = [n for n in names if n not in self.params]
        if unknown or not names:
            raise KeyError(
                f"cannot restrict to {list(names)}: unknown {unknown}; known: {list(self.params)}"
            )
        new = copy.copy(self)
        new.params = {n: self.params[n] for n in names}
        new._kept_passes = {}
        new._init_spaces()
        return new

    # ------------------------------------------------------------------ kept passes
    def _init_keep(self, keep_graph: bool | None) -> None:
        """Whether products keep per-batch work between calls (see :meth:`_kept`).

        ``None``: when :attr:`data` is a list or tuple of one batch; ``True``: for every batch
        of a list or tuple; ``False`` (and any other data, whose batches are new tensors at
        every pass): never.
        """
        sequence = isinstance(self.data, (list, tuple))
        self.keep_graph = sequence and (len(self.data) == 1 if keep_graph is None else keep_graph)
        self._kept_passes: dict[int, tuple[object, Tensor, tuple[int, ...], object]] = {}

    @property
    def column_by_column(self) -> bool:
        """Whether a product with kept passes runs its columns one by one instead of batched.

        On CPU for models with convolutions: ``vmap``'s convolution rules copy their operands
        (3C3D-CIFAR-10, batch 128, 16 columns: 13x a gradient one by one, 22x batched); an MLP
        is the other way round (35x batched, 73x one by one). Elsewhere batched.
        """
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        return self._device.type == "cpu" and convolutional

    def _versions(self, inputs: object, targets: Tensor) -> tuple[int, ...]:
        """In-place version counters of the parameters and the batch (change on ``x.mul_()``)."""
        tensors = [*self.params.values(), inputs, targets]
        return tuple(t._version if isinstance(t, Tensor) else -1 for t in tensors)

    def _kept(self, index: int, inputs: object, targets: Tensor) -> object | None:
        """What :meth:`_keep` stored for batch ``index``, if still valid, else ``None``.

        Valid while the batch is the same objects and neither they nor the parameters have
        been modified in place; a stale entry is dropped (its memory freed) at once.
        """
        entry = self._kept_passes.get(index)
        if entry is None:
            return None
        if (
            entry[0] is inputs
            and entry[1] is targets
            and entry[2] == self._versions(inputs, targets)
        ):
            return entry[3]
        del self._kept_passes[index]
        return None

    def _keep(self, index: int, inputs: object, targets: Tensor, payload: object) -> None:
        """Store ``payload`` for batch ``index`` if :attr:`keep_graph`."""
        if self.keep_graph:
            self._kept_passes[index] = (inputs, targets, self._versions(inputs, targets), payload)


def generator_for(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A random number generator for batch ``index``, the same at every product."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
    return generator


def flat_size(shape: Sequence[int]) -> int:
    """Number of entries of a shape."""
    return math.prod(shape)
