r"""In-loop capture: any set of quantities during the user's own forward and backward.

.. code-block:: python

    with curvlab.backprop.capture(model, loss_func, [DiagGGN(), KFAC()]) as captured:
        loss = loss_func(model(x), y)
        loss.backward()
    captured.results["KFAC"]["0.weight"]

How it works. Entering the block hooks the model's modules (recording their calls) and the loss
function. When ``loss_func`` returns (with gradients enabled), the engine plans the pass
(:class:`~curvlab.backprop.plan.Plan`) and hooks the model output. When the backward reaches
the model output, that hook

* measures the scale :math:`c` of the incoming gradient against :math:`\partial L/\partial f`
  (``1`` for ``loss.backward()``; a gradient scaler's factor otherwise);
* on the streamed path, back-propagates the loss-Hessian square-root columns the quantities
  need (retaining the graph), then lets the gradient go on, reducing each module's
  quantities as its output gradient passes (:mod:`~curvlab.backprop.streamed`): no extra
  gradient pass;
* on the general path (:mod:`~curvlab.backprop.general`: Hessian quantities, recursions,
  subsampling, shared or rule-less modules), computes everything from the still intact graph
  first; the user's backward then runs as usual, so this path costs one gradient pass more
  than :func:`~curvlab.backprop.compute`.

``param.grad`` is exactly what the plain backward leaves: the engine never writes it
(``results.grad`` holds this backward's gradient; for a parameter whose ``grad`` was ``None``
before, it is the same tensor as ``param.grad``, not a copy). If the
block ends without a backward through the captured loss, the engine runs its own (leaving
``param.grad`` untouched): that is :func:`~curvlab.backprop.compute`.

One capture covers **one** loss evaluation and its backward. For gradient accumulation over
micro-batches, open one capture per micro-batch (``param.grad`` accumulates as usual) and
combine the results yourself (Kronecker blocks support ``+``). Forward passes under
``torch.no_grad`` (evaluation) are ignored. Terms added to the loss that bypass the model
output (a penalty on the weights) change ``results.grad`` but none of the quantities; a loss
whose gradient at the model output is not a multiple of ``loss_func``'s raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop import general
from curvlab.backprop.errors import NonFiniteError
from curvlab.backprop.loss import LossSpec
from curvlab.backprop.plan import Plan
from curvlab.backprop.quantities import Quantity
from curvlab.backprop.recording import (
    METHODS,
    Recorder,
    assign_owners,
    check_batch_first,
    check_batchnorm,
    check_quantities,
    check_versions,
    choose_rules,
)
from curvlab.backprop.results import Results
from curvlab.backprop.streamed import StreamedPass, backward_column


class CaptureError(RuntimeError):
    """A capture block that was used in a way the engine cannot follow (the message says how)."""


def check_finite(name: str, value: Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` and the first sample with NaN or Inf."""
    if not torch.is_floating_point(value) or bool(torch.isfinite(value).all()):
        return
    bad = ~torch.isfinite(value)
    sample = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0]) if value.dim() else None
    where = "" if sample is None else f" (first at sample {sample})"
    kinds = " and ".join(
        k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf)) if f(value).any()
    )
    raise NonFiniteError(
        f"{name} holds {kinds}{where}; curvature of non-finite values is undefined"
    )


def _subsample_index(subsampling: Sequence[int] | None, n: int) -> Tensor | None:
    if subsampling is None:
        return None
    index = torch.as_tensor(list(subsampling), dtype=torch.long)
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(
            f"subsampling must be a non-empty sequence of sample indices, got {subsampling!r}"
        )
    if bool(((index < 0) | (index >= n)).any()):
        bad = index[(index < 0) | (index >= n)].tolist()
        raise IndexError(f"subsampling indices {bad} are out of range for a batch of {n} samples")
    return index


class Capture:
    """The context manager that :func:`capture` returns (see the module docstring).

    Its :attr:`results` are ready once the ``with`` block has ended.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        quantities: Iterable[Quantity | str],
        method: str,
        subsampling: Sequence[int] | None,
        generator: torch.Generator | None,
        params: Iterable[str | Tensor] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.loss_func = model, loss_func
        self.spec = LossSpec(loss_func)
        self.quantities = check_quantities(quantities)
        self.method, self.subsampling, self.generator = method, subsampling, generator
        self.named = _selected(model, params)
        if not self.named:
            raise ValueError(
                f"model ({type(model).__name__}) has no trainable parameters "
                "(every parameter has requires_grad=False)"
            )
        self._results: Results | None = None
        self._plan: Plan | None = None
        self._streamed: StreamedPass | None = None
        self._handles: list[Any] = []
        self._recorder: Recorder | None = None
        self._backward_seen = False
        self._cancelled = False
        self._param_grads: dict[str, Tensor] = {}

    # -------------------------------------------------------------------------- the block
    def __enter__(self) -> Capture:
        if self.quantities:
            check_batchnorm(self.model)
            probe = Plan.needs(self.quantities)
            self._recorder = Recorder(self.model, every_module=probe)
        loss_func = self.loss_func
        self._handles.append(
            loss_func.register_forward_pre_hook(self._check_loss_inputs, with_kwargs=True)
        )
        self._handles.append(loss_func.register_forward_hook(self._on_loss, with_kwargs=True))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self._cancelled:
                self._finish()
        finally:
            self._remove_hooks()

    def cancel(self) -> None:
        """Drop the capture: remove its hooks now; the block's end computes nothing."""
        self._cancelled = True
        self._remove_hooks()

    @property
    def results(self) -> Results:
        """The :class:`~curvlab.backprop.results.Results` (once the ``with`` block has ended)."""
        if self._results is None:
            raise CaptureError("capture results are ready when the `with` block has ended")
        return self._results

    # -------------------------------------------------------------------------- the hooks
    @staticmethod
    def _loss_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
        output = args[0] if args else kwargs.get("input")
        targets = args[1] if len(args) > 1 else kwargs.get("target")
        return output, targets

    def _check_loss_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the loss runs: its inputs, and that it runs once (evaluations excepted)."""
        if not torch.is_grad_enabled():
            return  # an evaluation
        if self._plan is not None:
            raise CaptureError(
                "the loss function was called twice inside one capture; a capture covers one "
                "loss evaluation and its backward: open one capture per (micro-)batch"
            )
        output, targets = self._loss_inputs(args, kwargs)
        if not isinstance(output, Tensor) or not isinstance(targets, Tensor):
            raise CaptureError(
                "the captured loss function must be called as loss_func(output, targets)"
            )
        self.spec.check(output, targets)
        if output.shape[0] == 0:
            raise ValueError("inputs: the batch is empty (N = 0)")
        check_finite("the model output", output.detach())

    def _on_loss(self, module: nn.Module, args: tuple, kwargs: dict, loss: Any) -> None:
        if not torch.is_grad_enabled():
            return  # an evaluation
        output, targets = self._loss_inputs(args, kwargs)
        self._plan = self._make_plan(output, targets, loss)

    def _make_plan(self, output: Tensor, targets: Tensor, loss: Tensor) -> Plan:
        check_finite("the loss", loss.detach())
        records = {}
        if self._recorder is not None:  # the forward is over: later calls are the engine's own
            self._recorder.remove()
            records = self._recorder.records
        root = records.get("", [])
        owners, uses = (
            assign_owners(self.model, records, self.named) if self.quantities else ([], {})
        )
        choose_rules(owners, self.method, self.quantities)
        check_batch_first(owners, output.shape[0])
        check_versions(records, dict(self.model.named_modules()))
        plan = Plan(
            model=self.model,
            spec=self.spec,
            quantities=self.quantities,
            method=self.method,
            named=self.named,
            records=records,
            owners=owners,
            uses=uses,
            inputs=root[0].args if root else (),
            output=output,
            targets=targets,
            loss=loss,
            index=_subsample_index(self.subsampling, output.shape[0]),
            generator=self.generator,
        )
        if loss.requires_grad and output.requires_grad:
            # before the module hooks: the model output may be a module's output too, and the
            # columns must go back before that module sees the gradient
            self._handles.append(output.register_hook(self._on_output_grad))
        if plan.streamable():
            self._streamed = StreamedPass(plan)
            self._streamed.install()
            for name, p in self.named:
                # a parameter without a gradient yet gets this backward's in param.grad; a
                # hook there would keep a reference that makes autograd copy the gradient
                if p.grad is not None:
                    self._handles.append(p.register_hook(self._param_hook(name)))
        return plan

    def _param_hook(self, name: str):
        def hook(g: Tensor) -> None:
            self._param_grads[name] = g.detach()

        return hook

    def _gradient_of_loss(self, name: str, param: nn.Parameter) -> Tensor | None:
        """This backward's gradient of ``param`` (its hook's, or the fresh ``param.grad``)."""
        if name in self._param_grads:
            return self._param_grads[name]
        return None if param.grad is None else param.grad.detach()

    def _loss_scale(self, grad: Tensor) -> float:
        r"""The factor ``c`` with ``grad = c * dL/df`` (raises if there is none).

        Also keeps :math:`\partial L/\partial f` for the general path's gradient pass.
        """
        plan = self._plan
        expected = self.spec.output_gradient(plan.output, plan.targets)
        plan.output_grad = expected
        norm = expected.square().sum()
        if norm == 0:
            return 1.0
        c = float((grad * expected).sum() / norm)
        residual = (grad - c * expected).norm()
        if residual > 1e-4 * grad.norm() + torch.finfo(grad.dtype).tiny:
            raise CaptureError(
                "the gradient reaching the model output is not a multiple of the captured "
                "loss's: back-propagate the loss_func result (optionally scaled), not a loss "
                "that adds terms depending on the model output"
            )
        return c

    def _on_output_grad(self, grad: Tensor) -> None:
        if self._backward_seen:
            return  # a re-entrant column pass, or a second backward of a retained graph
        self._backward_seen = True
        scale = self._loss_scale(grad)
        if self._streamed is not None:
            self._streamed.run_columns(retain_last=True)
            self._streamed.start_gradient(scale)
            torch.autograd.Variable._execution_engine.queue_callback(self._streamed.finish_gradient)
        else:
            self._results = self._general()

    # -------------------------------------------------------------------------- finishing
    def _general(self) -> Results:
        plan = self._plan
        if self.quantities:
            return general.run(plan)
        params = [p for _, p in self.named]
        if plan.output_grad is None:
            grads = torch.autograd.grad(plan.loss, params, allow_unused=True, retain_graph=True)
        else:
            grads = backward_column(plan.output, params, plan.output_grad, retain_graph=True)
        return Results(plan.loss.detach(), _filled(self.named, grads), plan.output.detach(), {})

    def _finish(self) -> None:
        plan = self._plan
        if plan is None:
            raise CaptureError(
                f"the loss function ({type(self.loss_func).__name__}) was not called with "
                "gradients enabled inside the capture block: compute the loss with the "
                "loss_func passed to capture()"
            )
        if not self._backward_seen:  # no backward of the user's: run the engine's own
            if not plan.loss.requires_grad:
                raise CaptureError(
                    "the captured loss does not require gradients (no trainable path)"
                )
            if self._streamed is None:
                self._backward_seen = True
                self._results = self._general()
                return
            # the columns first, outside any backward (not nested in the gradient's), then the
            # gradient, which the module hooks reduce as it passes and which frees the graph
            self._backward_seen = True
            self._streamed.run_columns(retain_last=True)
            self._streamed.start_gradient(1.0)
            grads = torch.autograd.grad(plan.loss, [p for _, p in self.named], allow_unused=True)
            self._streamed.finish_gradient()
            self._param_grads = {
                n: g for (n, _), g in zip(self.named, grads, strict=True) if g is not None
            }
        if self._streamed is not None:
            scale = self._streamed.grad_scale
            grads = [self._gradient_of_loss(n, p) for n, p in self.named]
            grads = [g if g is None or scale == 1.0 else g / scale for g in grads]
            self._results = self._streamed.results(_filled(self.named, grads))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._recorder is not None:
            self._recorder.remove()
        if self._streamed is not None:
            self._streamed.remove()


def _filled(
    named: list[tuple[str, nn.Parameter]], grads: Sequence[Tensor | None]
) -> dict[str, Tensor]:
    """Gradients by name, zeros for parameters the loss does not depend on."""
    return {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(named, grads, strict=True)
    }


def _selected(model: nn.Module, params: Iterable[str | Tensor] | None) -> list[tuple[str, Tensor]]:
    """The trainable ``(name, parameter)`` pairs to compute quantities for, in model order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    names = {n for n, _ in named}
    by_tensor = {p: n for n, p in named}
    keep = set()
    for item in params:
        name = item if isinstance(item, str) else by_tensor.get(item)
        if name not in names:
            shown = item if isinstance(item, str) else f"a tensor of shape {list(item.shape)}"
            raise ValueError(
                f"params: {shown!r} is not a trainable parameter of the model; trainable: "
                f"{sorted(names)}"
            )
        keep.add(name)
    return [(n, p) for n, p in named if n in keep]


def capture(
    model: nn.Module,
    loss_func: nn.Module,
    quantities: Iterable[Quantity | str] = (),
    *,
    method: str = "auto",
    subsampling: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    params: Iterable[str | Tensor] | None = None,
) -> Capture:
    r"""Compute ``quantities`` during the forward and backward inside the ``with`` block.

    Args:
        model: Any module; samples must be processed independently (BatchNorm in eval mode).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``,
            reduction ``"mean"`` or ``"sum"``, called as ``loss_func(model(inputs), targets)``
            inside the block.
        quantities: Quantity objects (:mod:`curvlab.backprop.quantities`) or their names
            (``"DiagGGN"``, ``"KFAC"``), distinct.
        method: ``"auto"``: per-layer rules where they exist, the generic torch.func path for
            other parametric modules (warned once). ``"func"``: the generic path everywhere
            (Kronecker quantities and recursions still use their layer rules).
        subsampling: Indices of the samples that per-sample and curvature quantities use
            (scaling :math:`r` stays that of the full batch).
        generator: Random number generator for MC sampling.
        params: The parameters (names or the tensors) to compute quantities and ``grad`` for
            (default: every trainable one); the others cost nothing extra.

    Returns:
        A :class:`Capture`; its ``results`` are ready when the block ends.

    Raises:
        CaptureError: The loss function was not called in the block, or called twice.
        UnsupportedModuleError: A module that no path can handle, naming it and the reason.
        UnsupportedLossError: An unsupported loss, reduction or target.
        NonFiniteError: NaN or Inf in the model output or the loss.
    """
    return Capture(model, loss_func, quantities, method, subsampling, generator, params)
