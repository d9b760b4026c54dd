r"""The generic torch.func path: derivatives of *any* module call or of the whole model.

:class:`FuncRule` needs nothing but a module's ``forward``: for every sample ``n`` it re-runs
the module on that sample alone (``functional_call`` under ``vmap``) and takes the VJP w.r.t. the
parameters, :math:`J_\theta(x_n)^\top F_{mn}`, for all ``M`` factor columns at once. It is used
for parametric modules without a per-layer rule (with a one-time warning) and for every module
with ``method="func"``. Requirements, checked with errors that name the module: inputs and
outputs carry the batch dimension first, samples are processed independently (the per-sample
re-run must reproduce the batched output), and the forward is deterministic. The recurrent
layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) are the exception it knows: their sequences are
``[T, N, H]`` unless ``batch_first=True``, and their states ``h`` and ``c`` are always
``[layers * directions, N, H]`` (:func:`input_batch_dims`, :func:`output_batch_dims`); their
default zero state is made batched under ``vmap`` (:func:`explicit_initial_states`). Factors
reach the rules as ``[M, N, *rest]`` all the same, ``rest`` being the output's shape without
its batch dimension.

:class:`WholeModelFunc` differentiates the whole model twice with ``torch.func`` for Hessian
quantities whose graph contains operations without a known second derivative (e.g. attention,
layer norm, functional nonlinearities): :math:`P` Hessian-vector products, exact and slow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from curvlab.backprop.errors import UnsupportedModuleError
from curvlab.backprop.loss import LossSpec
from curvlab.backprop.rules.base import Call, Rule

CHUNK_ELEMENTS = 2**22
"""Budget (tensor elements) for Hessian-vector products evaluated at once."""


def _batch_dims(tree: Any, n: int) -> Any:
    """``0`` for tensors with a leading dimension of size ``n``, else ``None`` (a vmap in_dims)."""
    return tree_map(
        lambda a: 0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else None, tree
    )


def _unsqueeze(tree: Any, dims: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    flat_dims, _ = tree_flatten(dims)
    return tree_unflatten(
        [a if d is None else a.unsqueeze(d) for a, d in zip(leaves, flat_dims, strict=True)], spec
    )


def _recurrent_input(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """The ``input`` and ``hx`` of a call of a recurrent layer, however they were passed."""
    bound = {**dict(zip(("input", "hx"), args, strict=False)), **kwargs}
    return bound.get("input"), bound.get("hx")


def _is_batched_sequence(x: Any) -> bool:
    """Whether a recurrent layer's input is a padded ``[T, N, H]`` (or ``[N, T, H]``) batch."""
    return isinstance(x, Tensor) and not isinstance(x, PackedSequence) and x.dim() == 3


def output_batch_dims(module: nn.Module, num_outputs: int) -> tuple[int, ...]:
    r"""The batch dimension of each tensor output of a call of ``module`` (``tree_flatten`` order).

    ``0`` for every module but the recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): their
    output sequence is ``[T, N, H]`` (or ``[N, T, H]`` with ``batch_first=True``), their final
    states ``h_n`` (and the LSTM's ``c_n``) are ``[layers * directions, N, H]`` either way.

    Args:
        module: The called module.
        num_outputs: How many tensors the call returned.

    Returns:
        One dimension per output tensor.
    """
    if isinstance(module, nn.RNNBase) and num_outputs > 0:
        return (0 if module.batch_first else 1, *[1] * (num_outputs - 1))
    return (0,) * num_outputs


def input_batch_dims(module: nn.Module, args: tuple, kwargs: dict, n: int) -> tuple[Any, Any]:
    r"""Where a call's inputs carry the batch: ``vmap`` in_dims of its positional and keyword inputs.

    Tensors whose leading dimension has size ``n`` carry the batch there; other arguments are
    shared by all samples (``None``). A recurrent layer's sequence carries it at ``0``
    (``batch_first=True``) or ``1``, its initial states ``[layers * directions, N, H]`` at ``1``.

    Args:
        module: The called module.
        args: Its positional inputs.
        kwargs: Its keyword inputs.
        n: The batch size.

    Returns:
        ``(args_dims, kwargs_dims)``, shaped like ``args`` and ``kwargs``.
    """
    if isinstance(module, nn.RNNBase) and _is_batched_sequence(_recurrent_input(args, kwargs)[0]):
        sequence = 0 if module.batch_first else 1

        def dims(key: str, value: Any) -> Any:
            dim = sequence if key == "input" else 1
            return tree_map(lambda a: dim if isinstance(a, Tensor) else None, value)

        args_dims = tuple(dims(key, a) for key, a in zip(("input", "hx"), args, strict=False))
        return args_dims, {key: dims(key, v) for key, v in kwargs.items()}
    return _batch_dims(args, n), _batch_dims(kwargs, n)


def _initial_state(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: a recurrent call without ``hx`` gets its zeros from the input."""
    x, hx = _recurrent_input(args, kwargs)
    if hx is not None or not _is_batched_sequence(x):
        return None
    # zeros_like of the input stays batched under vmap, where torch.zeros would not
    base = torch.zeros_like(x.select(1 if module.batch_first else 0, 0)[..., :1]).unsqueeze(0)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    h0 = base.expand(layers, -1, module.proj_size or module.hidden_size).contiguous()
    if isinstance(module, nn.LSTM):
        hx = (h0, base.expand(layers, -1, module.hidden_size).contiguous())
    else:
        hx = h0
    return (x, hx), {}


@contextlib.contextmanager
def explicit_initial_states(model: nn.Module) -> Iterator[None]:
    """Recurrent layers in ``model`` called without ``hx`` get their zero state from the input.

    ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` create the default initial state with
    ``torch.zeros``, which is not batched under ``torch.func.vmap``, and then fail to write
    the batched state into it. Inside this block the same zeros are derived from the input
    (``torch.zeros_like``), so per-sample re-runs under ``vmap`` work; values are unchanged.
    """
    handles = [
        module.register_forward_pre_hook(_initial_state, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, nn.RNNBase)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class FuncRule(Rule):
    """Per-sample parameter VJPs of any module via ``torch.func`` (see the module docstring).

    Args:
        module_name: The module's name in the model, for error messages.
    """

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name

    def _culprit(self, module: nn.Module) -> str:
        return f"{type(module).__name__} (module '{self.module_name}')"

    def _check_recurrent(self, module: nn.Module, call: Call) -> None:
        """A recurrent layer needs a padded, batched sequence (no packed or unbatched one)."""
        if not isinstance(module, nn.RNNBase):
            return
        x, _ = _recurrent_input(call.args, call.kwargs)
        if isinstance(x, PackedSequence):
            raise UnsupportedModuleError(
                f"{self._culprit(module)} is given a PackedSequence, whose data interleaves the "
                "samples' time steps; the generic path re-runs it per sample. Pass the padded "
                "batch ([T, N, H], or [N, T, H] with batch_first=True) instead"
            )
        if not _is_batched_sequence(x):
            raise UnsupportedModuleError(
                f"{self._culprit(module)} is given an unbatched sequence (no batch dimension); "
                "pass [T, N, H] (or [N, T, H] with batch_first=True)"
            )

    def jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        n = factors[0].shape[1]
        all_params = dict(module.named_parameters(remove_duplicate=False))
        params = {k: all_params[k].detach() for k in names}
        self._check_recurrent(module, call)
        out_dims = output_batch_dims(module, len(call.values))
        for out, dim in zip(call.values, out_dims, strict=True):
            if out.dim() <= dim or out.shape[dim] != n:
                raise UnsupportedModuleError(
                    f"{self._culprit(module)} returns a tensor of shape {list(out.shape)} without "
                    f"a batch dimension of size {n} at dimension {dim}; the generic path needs "
                    "batch-first inputs and outputs (e.g. batch_first=True; nn.RNN, nn.LSTM and "
                    "nn.GRU may also be sequence-first)"
                )
        args_dims, kwargs_dims = input_batch_dims(module, call.args, call.kwargs, n)

        def sample_output(p: dict[str, Tensor], args: Any, kwargs: Any) -> tuple[Tensor, ...]:
            with explicit_initial_states(module):
                out = functional_call(
                    module,
                    p,
                    _unsqueeze(args, args_dims),
                    _unsqueeze(kwargs, kwargs_dims),
                    strict=False,
                )
            leaves, _ = tree_flatten(out)
            outputs = [o for o in leaves if isinstance(o, Tensor)]
            return tuple(o.squeeze(dim) for o, dim in zip(outputs, out_dims, strict=True))

        def per_sample(args: Any, kwargs: Any, sample_factors: tuple[Tensor, ...]) -> Any:
            outputs, vjp_fn = vjp(lambda p: sample_output(p, args, kwargs), params)
            return outputs, vmap(lambda *cot: vjp_fn(tuple(cot))[0])(*sample_factors)

        try:
            outputs, vjps = vmap(
                per_sample,
                in_dims=(args_dims, kwargs_dims, 1),
                out_dims=(out_dims, 1),
                randomness="error",
            )(call.args, call.kwargs, tuple(factors))
        except RuntimeError as err:
            if "randomness" in str(err):
                raise UnsupportedModuleError(
                    f"{self._culprit(module)} is random in its forward (dropout in training "
                    "mode?); the generic path re-runs it per sample. Call model.eval() or move "
                    "the randomness into its own module"
                ) from err
            raise
        for per_sample_out, batched_out in zip(outputs, call.values, strict=True):
            scale = batched_out.abs().max().clamp_min(1.0)
            if not torch.allclose(per_sample_out, batched_out, rtol=1e-4, atol=1e-5 * scale):
                raise UnsupportedModuleError(
                    f"{self._culprit(module)} does not process samples independently: re-run on "
                    "one sample at a time it gives a different output (does it mix the batch "
                    "dimension, e.g. batch_first=False or BatchNorm in training mode?)"
                )
        return vjps

    def jvp(self, module: nn.Module, call: Call, name: str, vectors: Tensor) -> tuple[Tensor, ...]:
        """Like :meth:`Rule.jvp`, ``[K, N, *rest]`` per output: the batch moved to dimension 1."""
        tangents = super().jvp(module, call, name, vectors)
        dims = output_batch_dims(module, len(tangents))
        return tuple(t.movedim(1 + d, 1) for t, d in zip(tangents, dims, strict=True))


class WholeModelFunc:
    r"""Hessian quantities of the whole model by ``torch.func`` (exact, :math:`P` HVPs).

    Args:
        model: The model (samples processed independently).
        spec: The loss.
        inputs: The batch (already restricted to the subsample) ``[N, ...]``.
        targets: Its targets.
        r: Batch factor of the full batch.
        names: Trainable parameter names.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: LossSpec,
        inputs: Tensor,
        targets: Tensor,
        r: float,
        names: list[str],
    ) -> None:
        self.model = model
        self.spec = spec
        self.inputs = inputs
        self.targets = targets
        self.r = r
        named = dict(model.named_parameters())
        self.params = {k: named[k].detach() for k in names}
        self.fixed = {
            **{k: p.detach() for k, p in model.named_parameters() if k not in self.params},
            **dict(model.named_buffers()),
        }
        self._batch_diag: dict[str, Tensor] | None = None
        self._diag: dict[str, Tensor] | None = None

    def _flat(self) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        shapes = [(k, p.shape, p.numel()) for k, p in self.params.items()]
        theta = torch.cat([p.reshape(-1) for p in self.params.values()])

        def unflatten(vec: Tensor) -> dict[str, Tensor]:
            out, i = {}, 0
            for k, shape, size in shapes:
                out[k] = vec[i : i + size].reshape(shape)
                i += size
            return out

        return theta, unflatten

    def _split(self, flat: Tensor, lead: int) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, p in self.params.items():
            out[k] = flat[..., i : i + p.numel()].reshape(*flat.shape[:lead], *p.shape)
            i += p.numel()
        return out

    def _loss(self, params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
        # the math attention kernel supports forward-mode AD, the fused CPU kernels do not
        with sdpa_kernel([SDPBackend.MATH]), explicit_initial_states(self.model):
            out = functional_call(self.model, {**params, **self.fixed}, (inputs,))
        return self.spec.per_sample_loss(out, targets).sum()

    def _hessian_diagonal(self, loss: Callable[[Tensor], Tensor], theta: Tensor, rows: int):
        gradient = grad(loss)
        size = theta.numel()
        step = max(1, CHUNK_ELEMENTS // max(1, rows * size))
        parts = []
        for start in range(0, size, step):
            stop = min(size, start + step)
            rows_here = torch.arange(stop - start, device=theta.device)
            basis = torch.zeros(stop - start, size, dtype=theta.dtype, device=theta.device)
            basis[rows_here, rows_here + start] = 1  # rows start..stop of the identity, alone
            cols = vmap(lambda e: jvp(gradient, (theta,), (e,))[1])(basis)
            parts.append(cols[rows_here, rows_here + start])
        return torch.cat(parts)

    def batch_diag_hessian(self) -> dict[str, Tensor]:
        r"""Per-sample :math:`\mathrm{diag}(\nabla^2_\theta \ell_n)` by name, ``[N, *p]``."""
        if self._batch_diag is None:
            theta, unflatten = self._flat()
            n = self.inputs.shape[0]

            def single(x: Tensor, y: Tensor) -> Tensor:
                def loss(t: Tensor) -> Tensor:
                    return self._loss(unflatten(t), x.unsqueeze(0), y.unsqueeze(0))

                return self._hessian_diagonal(loss, theta, n)

            diag = vmap(single, randomness="error")(self.inputs, self.targets)
            self._batch_diag = self._split(diag, 1)
        return self._batch_diag

    def diag_hessian(self) -> dict[str, Tensor]:
        r""":math:`\mathrm{diag}(\nabla^2_\theta L)` by name (over the subsample), ``[*p]``."""
        if self._diag is None:
            if self._batch_diag is not None:
                self._diag = {k: self.r * v.sum(0) for k, v in self._batch_diag.items()}
            else:
                theta, unflatten = self._flat()

                def loss(t: Tensor) -> Tensor:
                    return self.r * self._loss(unflatten(t), self.inputs, self.targets)

                diag = self._hessian_diagonal(loss, theta, self.inputs.shape[0])
                self._diag = self._split(diag, 0)
        return self._diag

    def block_hvp(self, name: str) -> Callable[[Tensor], Tensor]:
        r"""``v -> H_{\theta\theta} v`` for the parameter ``name``; ``v`` is ``[*p]`` or ``[K, *p]``."""
        value = self.params[name]
        others = {k: p for k, p in self.params.items() if k != name}

        def loss(p: Tensor) -> Tensor:
            return self.r * self._loss({**others, name: p}, self.inputs, self.targets)

        gradient = grad(loss)

        def product(v: Tensor) -> Tensor:
            single = v.shape == value.shape
            batch = v.unsqueeze(0) if single else v
            out = vmap(lambda u: jvp(gradient, (value,), (u,))[1])(batch.to(value))
            return out[0] if single else out

        return product
