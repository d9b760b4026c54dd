r"""AdaHesScale (Elsayed & Mahmood 2022, arXiv 2210.11639): Adam with a Hessian-diagonal moment.

"HesScale: Scalable computation of Hessian diagonals" replaces Adam's squared gradient by the
square of the HesScale estimate :math:`h` of the diagonal of the Hessian (the BL89 recursion
with an exact last layer, :class:`curvlab.backprop.HesScale`). With :math:`g` the gradient (plus
the :math:`L_2` term :math:`\gamma\theta`) and step count :math:`t`:

.. math::

    m \leftarrow \beta_1 m + (1 - \beta_1)\, g, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2)\, h \odot h, \qquad
    \theta \leftarrow \theta - \alpha\,
        \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon},

:math:`m, v` starting at zero. The diagonal :math:`h` (shaped like each parameter, for the loss
as the user wrote it: a mean loss gives the mean Hessian) comes from the engine during the
closure's own backward (:func:`curvlab.backprop.capture`), on any graph the engine's diagonal
rules cover (:mod:`curvlab.backprop.diagonals`: residual connections, branches).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop import BL89, HesScale, capture
from curvlab.backprop.loss import LossSpec
from curvlab.optim import parts
from curvlab.optim.hooks import StatisticsHooks

METHODS = ("hesscale", "bl89")
"""``"hesscale"``: :class:`curvlab.backprop.HesScale` (exact last layer, the paper's choice);
``"bl89"``: :class:`curvlab.backprop.BL89` (Becker & LeCun 1989, the plain recursion)."""


def _check(condition: bool, name: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"AdaHesScale: {name} must be {requirement}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class AdaHesScale(StatisticsHooks, torch.optim.Optimizer):
    r"""AdaHesScale (module docstring's equations) for every parameter of ``model``.

    Defaults: :math:`\beta = (0.9, 0.999)` and :math:`\epsilon = 10^{-8}` are the paper's
    (Adam's, which AdaHesScale keeps). The paper tunes :math:`\alpha` per task; the default
    ``1e-5`` is the authors' code's (GitHub ``mohmdelsayed/HesScale``). The step is close to a
    diagonal Newton step :math:`\alpha\, g / |h|`, and :math:`|g| / |h|` reaches ``1e3``-``1e4``
    on 3C3D at initialization, so Adam's ``1e-3`` diverges there within a few steps.

    Args:
        model: The network; every parameter is optimized (all must be covered by the engine's
            diagonal rules).
        lr: :math:`\alpha \ge 0`.
        betas: :math:`(\beta_1, \beta_2) \in [0, 1)^2`.
        eps: :math:`\epsilon > 0`.
        weight_decay: :math:`\gamma \ge 0` (:math:`L_2`, added to the gradient, not to
            :math:`h`).
        loss_func: The loss the closure calls as ``loss_func(model(x), y)``
            (``nn.CrossEntropyLoss`` by default).
        method: One of :data:`METHODS`.

    Hooks: :meth:`register_statistics_hook` sees each step's diagonals ``{name: [*p]}`` before
    the moments (:mod:`curvlab.optim.hooks`; data parallelism averages them there).

    Raises:
        ValueError: A bad hyperparameter (the message names it).
        TypeError: ``model`` is not a module.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        loss_func: nn.Module | None = None,
        method: str = "hesscale",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"AdaHesScale: model must be a torch.nn.Module, got {type(model).__name__}"
            )
        _check(method in METHODS, "method", method, f"one of {METHODS}")
        loss_func = nn.CrossEntropyLoss() if loss_func is None else loss_func
        LossSpec(loss_func)  # raises UnsupportedLossError naming the loss
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self._check_group(defaults)
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self.model, self.loss_func, self.method = model, loss_func, method
        self.quantity = HesScale() if method == "hesscale" else BL89()
        self._names = {id(p): n for n, p in model.named_parameters()}

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        lr, betas, eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        _check(_number(lr) and lr >= 0, "lr", lr, "a number >= 0")
        _check(
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(_number(b) and 0 <= b < 1 for b in betas),
            "betas",
            betas,
            "a pair in [0, 1)",
        )
        _check(_number(eps) and eps > 0 and math.isfinite(eps), "eps", eps, "a number > 0")
        _check(_number(decay) and decay >= 0, "weight_decay", decay, ">= 0")

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One step from the standard closure (zero_grad, forward, loss, backward, return loss).

        Returns:
            The closure's loss (before the step).

        Raises:
            TypeError: No closure (the diagonal is computed during its backward).
        """
        if closure is None or not callable(closure):
            raise TypeError(
                "AdaHesScale.step needs the closure (zero_grad, forward, loss_func, backward, "
                "return loss): the engine computes the Hessian diagonal during its backward"
            )
        with capture(self.model, self.loss_func, [self.quantity]) as captured:
            with torch.enable_grad():
                loss = closure()
        diagonals = self._run_statistics_hooks(dict(captured.results[self.quantity.name]))
        with torch.no_grad():
            for group in self.param_groups:
                self._check_group(group)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    self._update(p, diagonals[self._names[id(p)]].detach(), group)
        return loss

    def _update(self, p: Tensor, diagonal: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        betas = tuple(group["betas"])
        grad = parts.with_weight_decay(p.grad, p, group["weight_decay"])
        parts.adam_moments(state["exp_avg"], state["exp_avg_sq"], grad, diagonal.to(p.dtype), betas)
        direction = parts.bias_corrected_direction(
            state["exp_avg"], state["exp_avg_sq"], state["step"], betas, group["eps"]
        )
        p.add_(direction, alpha=-group["lr"])
