r"""The Hessian of the loss over the data, :math:`\nabla^2_\theta L`, as an operator.

A product is a second derivative of the loss, :math:`H v = \nabla_\theta \langle \nabla_\theta
L, v \rangle`. With kept passes (the default for a list of one batch) a batch's first product
records the gradient :math:`\nabla_\theta L_b` with its graph and runs the second backward
through it (reverse over reverse). Once the batch's products have taken ``linearize_after``
seconds (default 2 s, about what tracing costs), the next one records the *linearised gradient*,
:func:`torch.func.linearize` of :math:`\theta \mapsto \nabla_\theta L_b` (forward over reverse,
the tangent map traced once, without the primal forward and backward), checks it against the
kept graph on a random vector, and from then on every product is a tangent pass through it.
Tracing is a fixed cost (1-4 s on one CPU thread, whatever the model's size), so the rule of
renting before buying bounds what it adds: at most about the time already spent, never more
than twice the graph route's total, and a few products on a small model never pay it.
The tangent pass computes only the tangents the product needs: a reverse-over-reverse product
also differentiates the first layer's backward w.r.t. the (constant) input and adds the bias
unfused, and allocates zeros at every ReLU and max-pool (3C3D-CIFAR-10, batch 128: 1.1x a
gradient per column instead of 1.7x; see ``docs/linops.md``, "Cost").

Why the check: forward over reverse is wrong for some operators in torch (LayerNorm in torch
2.13: off by 0.11 on ``tests/linops/cases.py``'s residual LayerNorm network), so the
linearisation is used only where it reproduces the reverse-over-reverse product; otherwise the
operator keeps the gradient graph (:attr:`Hessian.linearized` says which).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, linearize, vmap

from curvlab.linops.empirical_risk import Data, ModelOperator, Params

_PROBE_SEED = 20_171
"""Seed of the random vector on which a linearisation is checked against the kept graph."""

_PROBE_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 1e-1, torch.bfloat16: 1e-1}
"""Relative tolerance of that check by dtype (rounding differs between the two routes)."""


class Hessian(ModelOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of :math:`L = r \sum_{n=1}^N \ell_n` over the data.

    Each batch contributes the Hessian of its own loss times :math:`r / r_b`. Without kept
    passes a product is a double backward :math:`\nabla_\theta \langle \nabla_\theta L_b, v
    \rangle`. With ``keep_graph`` the batch's first product records the gradient with its
    graph and later products run only the second backward; once they have taken
    ``linearize_after`` seconds, the next product records the linearised gradient
    (:func:`torch.func.linearize`) and checks it on a random vector against the graph, which
    it then frees; later products are tangent passes through the linearisation,
    column by column on CPU with convolutions and batched by ``vmap`` elsewhere (see
    :attr:`column_by_column`). A model that cannot be traced, or whose linearisation fails the
    check, keeps the graph (:attr:`linearized` is then ``False``). Kept passes are recorded
    again when the parameters or the batch's tensors change in place (their version counters)
    or the batch is another object. Symmetric; scales like the loss.

    Args:
        model: Any module (twice differentiable).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        params: The parameters (``None``: all trainable ones).
        data: Re-iterable ``(inputs, targets)`` batches.
        check_deterministic: Check at construction that two passes over the data agree.
        keep_graph: Keep each batch's passes between products (memory: about one forward and
            backward pass's saved tensors per batch). ``None``: keep them when ``data`` is a
            list or tuple of one batch (the same tensors at every pass); ``True``: for every
            batch of a list or tuple; ``False``: never (a data loader yields new tensors at
            every pass and never keeps them).
        linearize_after: Seconds of a batch's products on the kept graph after which the
            next one linearises the gradient (``0``: at the second product; ``None``: never,
            always the kept graph). The route changes the products only by rounding.

    Attributes:
        linearized: ``None`` before any batch was linearised, then whether the kept products
            run through the linearised gradient (``True``) or the kept graph (``False``: the
            model could not be traced or its linearisation failed the check).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        params: Params,
        data: Data,
        check_deterministic: bool = True,
        keep_graph: bool | None = None,
        linearize_after: float | None = 2.0,
    ) -> None:
        if linearize_after is not None and not linearize_after >= 0:
            raise ValueError(
                f"linearize_after must be None (never) or seconds >= 0, got {linearize_after!r}"
            )
        super().__init__(model, loss_func, params, data, check_deterministic)
        self._init_keep(keep_graph)
        self.linearize_after = linearize_after
        self.linearized: bool | None = None

    # ------------------------------------------------------------------ recorded passes
    def _gradient_graph(
        self, inputs: object, targets: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """``(leaves, gradient)``: the batch's gradient with its graph."""
        leaves = {k: p.detach().requires_grad_() for k, p in self.params.items()}
        with torch.enable_grad():
            loss = self.spec.value(self.model_output(leaves, inputs), targets)
            gradient = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=True, allow_unused=True
            )
        return tuple(leaves.values()), gradient

    def _linearize(self, inputs: object, targets: Tensor) -> Callable | None:
        r"""The tangent map :math:`v \mapsto H_b v` of the batch's gradient, or ``None``.

        ``None`` if the model cannot be traced by :func:`torch.func.linearize`.
        """

        def gradient(p: dict[str, Tensor]) -> dict[str, Tensor]:
            return grad(lambda q: self.spec.value(self.model_output(q, inputs), targets))(p)

        try:
            with warnings.catch_warnings():  # const folding's get_attr notes
                warnings.simplefilter("ignore", UserWarning)
                return linearize(gradient, self.params)[1]
        except (RuntimeError, NotImplementedError, TypeError):
            return None

    def _record(self, index: int, inputs: object, targets: Tensor) -> tuple[str, object]:
        """The batch's kept passes, recorded if need be: ``(kind, payload)``.

        ``("graph", (leaves, gradient))`` from the first product on; once the batch's products
        have taken :attr:`linearize_after` seconds, ``("linear", tangent_map)`` when the
        linearisation passes :meth:`_agrees` (the graph is then freed). A batch's entry is
        ``(kind, payload, seconds)``, the seconds spent on the graph (``inf`` once tried).
        """
        kept = self._kept(index, inputs, targets)
        if kept is None:  # the first product: the graph
            graph = self._gradient_graph(inputs, targets)
            self._keep(index, inputs, targets, ("graph", graph, 0.0))
            return "graph", graph
        kind, payload, spent = kept
        if kind == "linear" or self.linearized is False or self.linearize_after is None:
            return kind, payload
        if spent < self.linearize_after:
            return kind, payload
        self._keep(index, inputs, targets, ("graph", payload, math.inf))
        tangent = self._linearize(inputs, targets)
        if tangent is None or not self._agrees(tangent, payload):
            self.linearized = False
            return "graph", payload
        self.linearized = True
        self._keep(index, inputs, targets, ("linear", tangent, math.inf))
        return "linear", tangent

    def _spend(self, index: int, inputs: object, targets: Tensor, seconds: float) -> None:
        """Add ``seconds`` to the time the batch's products have taken on the kept graph."""
        kept = self._kept(index, inputs, targets)
        if kept is not None and kept[0] == "graph":
            self._keep(index, inputs, targets, ("graph", kept[1], kept[2] + seconds))

    def _agrees(self, tangent: Callable, graph: tuple) -> bool:
        r"""Whether the linearisation's :math:`H v` is the kept graph's on a random :math:`v`.

        Per parameter: :math:`\|a_k - b_k\| \le \tau (\|b_k\| + 10^{-3} \|b\|)`, with
        :math:`\tau` by dtype (:data:`_PROBE_TOL`).
        """
        generator = torch.Generator(device=self._device).manual_seed(_PROBE_SEED)
        probe = {
            k: torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)[None]
            for k, p in self.params.items()
        }
        ours = tangent({k: c[0] for k, c in probe.items()})
        theirs = self._graph_matmat(graph, probe, retain=True)
        norms = torch.stack([theirs[k][0].norm() for k in self.params])
        total = norms.norm()
        tol = _PROBE_TOL.get(self._dtype, 1e-3)
        return all(
            float((ours[k] - theirs[k][0]).norm()) <= tol * float(norms[i] + 1e-3 * total)
            for i, k in enumerate(self.params)
        )

    # ------------------------------------------------------------------ products
    def _linear_matmat(self, tangent: Callable, columns: dict[str, Tensor]) -> dict[str, Tensor]:
        """:math:`H_b` times the columns ``[K, *p]`` by the linearised gradient."""
        count = next(iter(columns.values())).shape[0]
        if count > 1 and not self.column_by_column:
            return vmap(tangent)(columns)
        products = [tangent({k: c[j] for k, c in columns.items()}) for j in range(count)]
        return {k: torch.stack([p[k] for p in products]) for k in self.params}

    def _graph_matmat(
        self, graph: tuple, columns: dict[str, Tensor], retain: bool
    ) -> dict[str, Tensor]:
        """:math:`H_b` times the columns ``[K, *p]`` by second backwards through ``graph``."""
        leaves, gradient = graph
        names = list(self.params)
        live = [i for i, g in enumerate(gradient) if g is not None and g.requires_grad]
        count = next(iter(columns.values())).shape[0]
        if not live:  # the loss is at most linear in the parameters
            return {k: torch.zeros_like(columns[k]) for k in names}
        outputs = [gradient[i] for i in live]
        if count > 1 and not self.column_by_column:  # one batched second backward
            with torch.enable_grad():
                product = torch.autograd.grad(
                    outputs,
                    leaves,
                    grad_outputs=[columns[names[i]] for i in live],
                    retain_graph=retain,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            return {
                k: torch.zeros_like(columns[k]) if v is None else v
                for k, v in zip(names, product, strict=True)
            }
        # one second backward per column: with convolutions on CPU faster than vmap over the
        # backward (is_grads_batched), whose batching rules copy (3C3D: 2.7x vs 1.5x each)
        out = {k: torch.zeros_like(columns[k]) for k in names}
        for j in range(count):
            with torch.enable_grad():
                product = torch.autograd.grad(
                    outputs,
                    leaves,
                    grad_outputs=[columns[names[i]][j] for i in live],
                    retain_graph=retain or j < count - 1,
                    allow_unused=True,
                )
            for name, value in zip(names, product, strict=True):
                if value is not None:
                    out[name][j] = value
        return out

    def _batch_matmat(self, index, inputs, targets, columns):
        weight = self.batch_weight(targets.shape[0])
        if not self.keep_graph:
            graph = self._gradient_graph(inputs, targets)
            product = self._graph_matmat(graph, columns, retain=False)
            return product if weight == 1 else {k: v * weight for k, v in product.items()}
        start = time.perf_counter()
        kind, record = self._record(index, inputs, targets)
        if kind == "linear":
            product = self._linear_matmat(record, columns)
        else:
            product = self._graph_matmat(record, columns, retain=True)
            self._spend(index, inputs, targets, time.perf_counter() - start)
        return product if weight == 1 else {k: v * weight for k, v in product.items()}
