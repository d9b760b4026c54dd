r"""The generic torch.func path: derivatives of *any* module call or of the whole model.

:class:`FuncRule` needs nothing but a module's ``forward``: for every sample ``n`` it re-runs
the module on that sample alone (``functional_call`` under ``vmap``) and takes the VJP w.r.t. the
parameters, :math:`J_\theta(x_n)^\top F_{mn}`, for all ``M`` factor columns at once. It is used
for parametric modules without a per-layer rule (with a one-time warning) and for every module
with ``method="func"``. Requirements, checked with errors that name the module: inputs and
outputs carry the batch dimension first, samples are processed independently (the per-sample
re-run must reproduce the batched output), and the forward is deterministic.

:class:`WholeModelFunc` differentiates the whole model twice with ``torch.func`` for Hessian
quantities whose graph contains operations without a known second derivative (e.g. attention,
layer norm, functional nonlinearities): :math:`P` Hessian-vector products, exact and slow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
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
        [a.unsqueeze(0) if d == 0 else a for a, d in zip(leaves, flat_dims, strict=True)], spec
    )


class FuncRule(Rule):
    """Per-sample parameter VJPs of any module via ``torch.func`` (see the module docstring).

    Args:
        module_name: The module's name in the model, for error messages.
    """

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name

    def _culprit(self, module: nn.Module) -> str:
        return f"{type(module).__name__} (module '{self.module_name}')"

    def jac_t(  # noqa: D102
        self, module: nn.Module, call: Call, factors: tuple[Tensor, ...], names: list[str]
    ) -> dict[str, Tensor]:
        n = factors[0].shape[1]
        all_params = dict(module.named_parameters(remove_duplicate=False))
        params = {k: all_params[k].detach() for k in names}
        for out in call.values:
            if out.dim() == 0 or out.shape[0] != n:
                raise UnsupportedModuleError(
                    f"{self._culprit(module)} returns a tensor of shape {list(out.shape)} without "
                    f"a leading batch dimension of size {n}; the generic path needs batch-first "
                    "inputs and outputs (e.g. batch_first=True)"
                )
        args_dims = _batch_dims(call.args, n)
        kwargs_dims = _batch_dims(call.kwargs, n)

        def sample_output(p: dict[str, Tensor], args: Any, kwargs: Any) -> tuple[Tensor, ...]:
            out = functional_call(
                module,
                p,
                _unsqueeze(args, args_dims),
                _unsqueeze(kwargs, kwargs_dims),
                strict=False,
            )
            leaves, _ = tree_flatten(out)
            return tuple(o.squeeze(0) for o in leaves if isinstance(o, Tensor))

        def per_sample(args: Any, kwargs: Any, sample_factors: tuple[Tensor, ...]) -> Any:
            outputs, vjp_fn = vjp(lambda p: sample_output(p, args, kwargs), params)
            return outputs, vmap(lambda *cot: vjp_fn(tuple(cot))[0])(*sample_factors)

        try:
            outputs, vjps = vmap(
                per_sample,
                in_dims=(args_dims, kwargs_dims, 1),
                out_dims=(0, 1),
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
        with sdpa_kernel([SDPBackend.MATH]):
            out = functional_call(self.model, {**params, **self.fixed}, (inputs,))
        return self.spec.per_sample_loss(out, targets).sum()

    def _hessian_diagonal(self, loss: Callable[[Tensor], Tensor], theta: Tensor, rows: int):
        gradient = grad(loss)
        size = theta.numel()
        step = max(1, CHUNK_ELEMENTS // max(1, rows * size))
        parts = []
        for start in range(0, size, step):
            stop = min(size, start + step)
            basis = torch.eye(size, dtype=theta.dtype, device=theta.device)[start:stop]
            cols = vmap(lambda e: jvp(gradient, (theta,), (e,))[1])(basis)
            parts.append(cols[torch.arange(stop - start), torch.arange(start, stop)])
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
