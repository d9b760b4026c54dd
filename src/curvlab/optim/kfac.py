r"""KFAC: Kronecker-factored natural-gradient descent (Martens & Grosse 2015).

Convolutions as in KFC (Grosse & Martens 2016), weight sharing by KFAC-expand or -reduce
(Eschenhagen et al. 2023).

Every ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` layer gets a block
:math:`C = \bigoplus_g A_g \otimes B_g` from the engine (:func:`curvlab.backprop.capture`
around the user's own closure), kept as running averages
:math:`\bar A \leftarrow \beta \bar A + (1 - \beta) A`, :math:`\bar B \leftarrow \beta \bar B +
(1 - \beta) B` (factor by factor), and the update of the layer's parameters is

.. math::

    d = (\bar C + \lambda I)^{-1} (g + \eta\theta), \qquad
    m \leftarrow \mu m + d, \qquad \theta \leftarrow \theta - \alpha m

(:math:`g` the gradient in ``param.grad``, :math:`\eta` the weight decay, :math:`\mu` the
momentum, :math:`\alpha` the learning rate). The solve is exact through the factors'
eigendecompositions, or with the heuristic factored damping :math:`(\bar A + \pi\sqrt\lambda
I)^{-1} \otimes (\bar B + \frac{\sqrt\lambda}{\pi} I)^{-1}` (``pi_damping=True``). The
factors are refreshed every ``factor_update_interval`` steps (the engine runs only then), the
eigendecompositions every ``inverse_update_interval`` steps (cached in between; the damping
enters when they are applied, so an adaptive damping takes effect at once). With
``adaptive_damping=True``, every ``damping_interval`` steps the loss is evaluated again at the
new parameters (one more call of the closure) and :math:`\lambda` follows the
Levenberg-Marquardt rule (:func:`curvlab.optim.parts.levenberg_marquardt`) with
:math:`\rho = \frac{L(\theta + \delta) - L(\theta)}{g^\top\delta + \frac12 \delta^\top(\bar C
+ \lambda I)\delta}` over the Kronecker-preconditioned parameters.

Every other parameter (normalization layers, embeddings, your own modules) is updated by a
fallback optimizer of the user's choice (Adam by default, or SGD, or a factory), built over the
same param groups. The parts are in :mod:`curvlab.optim.parts`; ``docs/optim.md`` has a worked
example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.backprop import KronFactors, Layout, capture
from curvlab.backprop.loss import LossSpec
from curvlab.optim import parts
from curvlab.optim.hooks import InverseHooks, StatisticsHooks

KRONECKER_MODULES: dict[type[nn.Module], str] = {
    nn.Linear: "rows",
    nn.Conv1d: "rows",
    nn.Conv2d: "rows",
    nn.Conv3d: "rows",
    nn.ConvTranspose1d: "transposed",
    nn.ConvTranspose2d: "transposed",
    nn.ConvTranspose3d: "transposed",
}
"""The layers KFAC preconditions, with the engine layout of their weight."""

FALLBACKS = ("adam", "sgd")
"""Built-in fallback optimizers for the parameters outside :data:`KRONECKER_MODULES`."""

FallbackFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
"""Builds the fallback optimizer from param groups ``[{"params": [...]}, ...]``."""


@dataclass
class _Unit:
    """The parameters one Kronecker block covers (a weight, a bias, or both jointly)."""

    names: tuple[str, ...]
    params: list[nn.Parameter]
    layout: Layout


def _kronecker_units(
    model: nn.Module, trainable: set[int], joint: bool
) -> tuple[list[_Unit], set[int]]:
    """The blocks of the Kronecker layers' parameters that are in ``trainable`` (by ``id``)."""
    units: list[_Unit] = []
    covered: set[int] = set()
    for prefix, module in model.named_modules():
        kind = KRONECKER_MODULES.get(type(module))
        if kind is None:
            continue
        groups = getattr(module, "groups", 1)
        local = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in trainable}
        name = (prefix + ".") if prefix else ""
        weight, bias = local.get("weight"), local.get("bias")
        if id(weight) in covered or id(bias) in covered:
            raise ValueError(
                f"KFAC: a parameter of layer {prefix!r} is shared with another layer; KFAC "
                "needs one block per parameter (share the module instead of its parameters)"
            )
        if weight is not None and bias is not None and joint:
            shapes = (tuple(weight.shape), tuple(bias.shape))
            layout = Layout(kind, shapes, groups)
            units.append(_Unit((name + "weight", name + "bias"), [weight, bias], layout))
        else:
            if weight is not None:
                layout = Layout(kind, (tuple(weight.shape),), groups)
                units.append(_Unit((name + "weight",), [weight], layout))
            if bias is not None:
                layout = Layout("bias", (tuple(bias.shape),), groups)  # as the engine
                units.append(_Unit((name + "bias",), [bias], layout))
        covered.update(id(p) for p in local.values())
    return units, covered


def _check(condition: bool, name: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"KFAC: {name} must be {requirement}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _LayerwiseOptimizer(StatisticsHooks, torch.optim.Optimizer):
    """What KFAC and SINGD share: their Kronecker units per param group, the fallback, the hook.

    Subclasses call :meth:`_setup_layers` in their ``__init__`` and define
    ``_check_group_values(momentum, weight_decay)``; messages carry the subclass's name. On the
    steps that refresh the curvature, the engine's blocks ``{name: KronFactors}`` of the
    optimizer's own layers (a joint block under both names; not the fallback's) pass through
    the hooks of :meth:`register_statistics_hook`
    (:mod:`curvlab.optim.hooks`) before they enter the running averages or the factors'
    update: data parallelism all-reduces them there.
    """

    def _setup_layers(
        self,
        model: nn.Module,
        params: Iterable[Any] | None,
        defaults: dict[str, Any],
        separate_weight_and_bias: bool,
        fallback: str | FallbackFactory,
        seed: int | None,
    ) -> None:
        """Param groups, the Kronecker units of each, the fallback and the MC generator."""
        who = type(self).__name__
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._initialized = False
        super().__init__(params, defaults)
        self._initialized = True

        in_model = {id(p) for p in model.parameters()}
        names = {id(p): n for n, p in model.named_parameters()}
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        if not mine <= in_model:
            raise ValueError(f"{who}: params must all be parameters of model")
        for group in self.param_groups:
            self._check_group_values(group["momentum"], group["weight_decay"])
        units, covered = _kronecker_units(model, mine, not separate_weight_and_bias)
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._units: list[list[_Unit]] = [[] for _ in self.param_groups]
        for unit in units:
            where = {group_of[id(p)] for p in unit.params}
            if len(where) > 1:
                raise ValueError(
                    f"{who}: {' and '.join(unit.names)} share one block but are in different "
                    "param groups; put them in one group or pass separate_weight_and_bias=True"
                )
            self._units[where.pop()].append(unit)
        # the parameters the fallback optimizer updates, by name
        self.fallback_names = [
            names[id(p)] for g in self.param_groups for p in g["params"] if id(p) not in covered
        ]
        self._fallback, self._fallback_groups = self._make_fallback(fallback, covered)

        device = next(iter(model.parameters())).device
        self._generator = torch.Generator(device=device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._generator.manual_seed(seed)
        self._steps = 0

    def _hooked_statistics(self, results: dict[str, Any]) -> dict[str, Any]:
        """The engine's blocks of this optimizer's units (by name), after the hooks."""
        mine = {n: results[n] for units in self._units for u in units for n in u.names}
        return self._run_statistics_hooks(mine)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Param groups are fixed at construction (the blocks and the fallback depend on them)."""
        if getattr(self, "_initialized", False):
            raise NotImplementedError(
                f"{type(self).__name__}: param groups are fixed at construction; pass them as "
                "params=[...]"
            )
        super().add_param_group(param_group)

    def _make_fallback(
        self, fallback: str | FallbackFactory, covered: set[int]
    ) -> tuple[torch.optim.Optimizer | None, list[int]]:
        """The fallback optimizer over the parameters outside the blocks, and its groups' sources."""
        groups, sources = [], []
        for i, group in enumerate(self.param_groups):
            rest = [p for p in group["params"] if id(p) not in covered]
            if rest:
                groups.append({"params": rest})
                sources.append(i)
        if not groups:
            return None, []
        if callable(fallback):
            optimizer = fallback(groups)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"{type(self).__name__}: the fallback factory must return a "
                    f"torch.optim.Optimizer, got {type(optimizer).__name__}"
                )
            return optimizer, sources
        for fb_group, i in zip(groups, sources, strict=True):
            fb_group.update(self._fallback_options(self.param_groups[i]))
        cls = torch.optim.Adam if fallback == "adam" else torch.optim.SGD
        return cls(groups), sources

    def _fallback_options(self, group: dict[str, Any]) -> dict[str, Any]:
        lr = group["lr"] if self.fallback_lr is None else self.fallback_lr
        options = {"lr": lr, "weight_decay": group["weight_decay"]}
        if self._fallback_kind == "sgd":
            options["momentum"] = group["momentum"]
        return options

    def _fallback_step(self) -> None:
        if self._fallback is None:
            return
        if self._fallback_kind != "factory":
            for fb_group, i in zip(self._fallback.param_groups, self._fallback_groups, strict=True):
                fb_group.update(self._fallback_options(self.param_groups[i]))
        self._fallback.step()


class KFAC(InverseHooks, _LayerwiseOptimizer):
    r"""KFAC with running averages, damping (fixed, :math:`\pi`, Levenberg-Marquardt) and intervals.

    ``step(closure)`` takes the standard closure (``zero_grad``, forward, loss, backward,
    return the loss) and opens :func:`curvlab.backprop.capture` around it on the steps that
    refresh the factors, so the loss inside the closure **must** be computed with
    ``loss_func`` (otherwise the engine raises :class:`~curvlab.backprop.CaptureError`).

    Args:
        model: The network; its ``Linear``/``Conv``/``ConvTranspose`` layers get Kronecker
            blocks (:data:`KRONECKER_MODULES`), every other parameter the fallback.
        lr: Learning rate :math:`\alpha` (per param group).
        loss_func: The loss module the closure uses (``nn.CrossEntropyLoss``, ``nn.MSELoss``,
            ``nn.BCEWithLogitsLoss``; reduction ``"mean"`` or ``"sum"``). Required.
        params: Parameters or param groups (dicts with ``"params"`` and optionally ``"lr"``,
            ``"momentum"``, ``"weight_decay"``), all of them ``model``'s; default: every
            trainable parameter of ``model``.
        momentum: Heavy-ball momentum :math:`\mu \in [0, 1)` on the preconditioned direction.
        weight_decay: :math:`L_2` decay :math:`\eta` added to the gradient before the solve.
        damping: :math:`\lambda \ge 0` (the initial value with ``adaptive_damping``).
        pi_damping: Heuristic factored damping instead of the exact :math:`\bar C + \lambda I`.
        adaptive_damping: Adapt :math:`\lambda` by the Levenberg-Marquardt rule every
            ``damping_interval`` steps (each such step calls the closure once more).
        damping_interval: Steps between damping adaptations.
        damping_factor: :math:`\omega_1` per step; each adaptation multiplies or divides
            :math:`\lambda` by ``damping_factor ** damping_interval`` (Martens & Grosse: 19/20).
        min_damping: Lower bound for the adaptive damping.
        max_damping: Upper bound for the adaptive damping.
        ema: :math:`\beta \in [0, 1)`, the weight of the old running average (0: no average).
        factor_update_interval: Steps between factor refreshes (engine calls).
        inverse_update_interval: Steps between eigendecompositions of the averaged factors.
        fisher_type: ``"mc"`` (sampled labels, ``KFAC``), ``"type-2"`` (exact loss Hessian,
            ``KFLR``) or ``"empirical"`` (the labels' gradients, ``KFACEmpirical``).
        mc_samples: Sampled labels per input for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weights shared over positions.
        separate_weight_and_bias: ``False`` (default): one joint block per layer for weight and
            bias (inputs with a trailing one), as Martens & Grosse; ``True``: one block each.
        fallback: ``"adam"`` (default), ``"sgd"``, or a factory that receives the fallback
            param groups ``[{"params": [...]}, ...]`` (one per group that has any) and returns
            a ``torch.optim.Optimizer``. Built-in fallbacks take each group's ``lr`` (unless
            ``fallback_lr``) and ``weight_decay``, SGD its ``momentum`` too, at every step, so
            LR schedulers act on both.
        fallback_lr: A fixed learning rate for the built-in fallback (default: the group's).
        seed: Seed of the generator for MC sampling (default: drawn from torch's global RNG);
            its state is part of ``state_dict``.

    Hooks (:mod:`curvlab.optim.hooks`): ``register_statistics_hook(hook)`` sees the engine's
    fresh blocks ``{name: KronFactors}`` before the running average (``hook(optimizer,
    blocks)`` returns replacements or ``None``); ``register_inverse_hook(hook)`` may compute the
    eigendecompositions of the averaged blocks instead (``{name: KronInverse}``, one name per
    block: :meth:`inverse_blocks`). :class:`curvlab.distributed.DataParallelPreconditioner`
    uses both: it all-reduces the statistics and spreads the decompositions over the ranks.

    Raises:
        ValueError: A bad hyperparameter (the message names it), parameters not in ``model``,
            or a joint block whose weight and bias are in different param groups.
        UnsupportedLossError: ``loss_func`` is not a loss the engine supports.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        *,
        loss_func: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        damping: float = 0.1,
        pi_damping: bool = False,
        adaptive_damping: bool = False,
        damping_interval: int = 5,
        damping_factor: float = 0.95,
        min_damping: float = 1e-8,
        max_damping: float = 1e4,
        ema: float = 0.95,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = False,
        fallback: str | FallbackFactory = "adam",
        fallback_lr: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"KFAC: model must be a torch.nn.Module, got {type(model).__name__}")
        LossSpec(loss_func)  # raises UnsupportedLossError naming the loss
        _check(isinstance(lr, (int, float)) and lr >= 0, "lr", lr, "a number >= 0")
        self._check_group_values(momentum, weight_decay)
        _check(isinstance(damping, (int, float)) and damping >= 0, "damping", damping, ">= 0")
        _check(not adaptive_damping or damping > 0, "damping", damping, "> 0 with adaptive_damping")
        for flag, value in (
            ("pi_damping", pi_damping),
            ("adaptive_damping", adaptive_damping),
            ("separate_weight_and_bias", separate_weight_and_bias),
        ):
            _check(isinstance(value, bool), flag, value, "a bool")
        for interval, value in (
            ("damping_interval", damping_interval),
            ("factor_update_interval", factor_update_interval),
            ("inverse_update_interval", inverse_update_interval),
        ):
            _check(_is_int(value) and value >= 1, interval, value, "a positive int")
        _check(0 < damping_factor < 1, "damping_factor", damping_factor, "in (0, 1)")
        _check(
            0 <= min_damping <= max_damping,
            "min_damping, max_damping",
            (min_damping, max_damping),
            "0 <= min_damping <= max_damping",
        )
        _check(isinstance(ema, (int, float)) and 0 <= ema < 1, "ema", ema, "in [0, 1)")
        _check(
            callable(fallback) or fallback in FALLBACKS,
            "fallback",
            fallback,
            f"one of {FALLBACKS} or a factory of param groups",
        )
        _check(fallback_lr is None or fallback_lr >= 0, "fallback_lr", fallback_lr, "None or >= 0")
        self.quantity = parts.kronecker_quantity(
            fisher_type, mc_samples, kfac_approx, separate_weight_and_bias
        )
        self.model, self.loss_func = model, loss_func
        self.damping, self.pi_damping = float(damping), pi_damping
        self.adaptive_damping, self.damping_interval = adaptive_damping, damping_interval
        self.damping_factor, self.min_damping, self.max_damping = (
            damping_factor,
            min_damping,
            max_damping,
        )
        self.ema = float(ema)
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.fallback_lr = fallback_lr
        self._fallback_kind = fallback if isinstance(fallback, str) else "factory"

        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._setup_layers(model, params, defaults, separate_weight_and_bias, fallback, seed)

    # ------------------------------------------------------------------------ construction
    @staticmethod
    def _check_group_values(momentum: Any, weight_decay: Any) -> None:
        _check(
            isinstance(momentum, (int, float)) and 0 <= momentum < 1,
            "momentum",
            momentum,
            "in [0, 1)",
        )
        _check(
            isinstance(weight_decay, (int, float)) and weight_decay >= 0,
            "weight_decay",
            weight_decay,
            ">= 0",
        )

    # ----------------------------------------------------------------------------- blocks
    def _block(self, unit: _Unit) -> KronFactors | None:
        state = self.state[unit.params[0]]
        if "input_factor" not in state:
            return None
        return KronFactors(
            state["input_factor"],
            state["output_factor"],
            unit.layout,
            unit.names,
            state["num_samples"],
            state["input_count"],
            state["batch_factor"],
        )

    def blocks(self) -> dict[str, KronFactors]:
        """The running averages of the blocks by parameter name (a joint block under both names).

        Returns:
            ``{name: KronFactors}``; empty before the first step.
        """
        out = {}
        for unit in (u for units in self._units for u in units):
            block = self._block(unit)
            if block is not None:
                out.update(dict.fromkeys(unit.names, block))
        return out

    def _update_factors(self, results: dict[str, Any]) -> None:
        results = self._hooked_statistics(results)
        for unit in (u for units in self._units for u in units):
            new = results[unit.names[0]]
            if not isinstance(new, KronFactors) or new.layout != unit.layout:
                raise RuntimeError(
                    f"KFAC: the engine's block of {unit.names[0]} ({new!r}) does not have the "
                    f"expected layout {unit.layout}"
                )
            average = parts.running_average(self._block(unit), new, self.ema)
            self.state[unit.params[0]].update(
                input_factor=average.input_factor.detach(),
                output_factor=average.output_factor.detach(),
                num_samples=average.num_samples,
                input_count=average.input_count,
                batch_factor=average.batch_factor,
            )

    def inverse_blocks(self) -> dict[str, KronFactors]:
        """The averaged blocks whose eigendecompositions KFAC keeps, one name per block.

        Returns:
            ``{first parameter name of the block: KronFactors}`` in the blocks' order; empty
            before the first factor update.
        """
        out = {}
        for unit in (u for units in self._units for u in units):
            block = self._block(unit)
            if block is not None:
                out[unit.names[0]] = block
        return out

    def _update_inverses(self) -> None:
        blocks = self.inverse_blocks()
        inverses = self._run_inverse_hooks(blocks)
        for unit in (u for units in self._units for u in units):
            if inverses is None:
                block = blocks[unit.names[0]]
                inverse = parts.KronInverse.from_factors(block.input_factor, block.output_factor)
            else:
                inverse = inverses[unit.names[0]]
            self.state[unit.params[0]].update(inverse.as_tensors())

    def _inverse(self, unit: _Unit) -> parts.KronInverse:
        state = self.state[unit.params[0]]
        return parts.KronInverse(
            state["input_values"],
            state["input_vectors"],
            state["output_values"],
            state["output_vectors"],
        )

    # ------------------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One KFAC step (and the fallback's) from the standard closure.

        Args:
            closure: ``zero_grad``, forward, ``loss_func``, ``backward``, return the loss.

        Returns:
            The closure's loss (before the step).
        """
        if closure is None or not callable(closure):
            raise TypeError(
                "KFAC.step needs the closure (zero_grad, forward, loss_func, backward, return "
                "loss): the engine computes the curvature during its backward"
            )
        k = self._steps
        if k % self.factor_update_interval == 0:
            with capture(
                self.model, self.loss_func, [self.quantity], generator=self._generator
            ) as captured:
                with torch.enable_grad():
                    loss = closure()
            self._update_factors(captured.results[self.quantity.name])
        else:
            with torch.enable_grad():
                loss = closure()
        adapt = self.adaptive_damping and (k + 1) % self.damping_interval == 0
        with torch.no_grad():
            if k % self.inverse_update_interval == 0 or not self._has_inverses():
                self._update_inverses()
            grads, deltas = self._kfac_update(keep=adapt)
            self._fallback_step()
            if adapt:
                self._adapt_damping(closure, loss, grads, deltas)
        self._steps += 1
        return loss

    def _has_inverses(self) -> bool:
        return all(
            "input_values" in self.state[u.params[0]] for units in self._units for u in units
        )

    def _kfac_update(self, keep: bool) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """Update the blocks' parameters; the gradients and steps per block if ``keep``."""
        grads_kept, deltas_kept = [], []
        for group, units in zip(self.param_groups, self._units, strict=True):
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for unit in units:
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in unit.params]
                decayed = [
                    parts.with_weight_decay(g, p, decay)
                    for g, p in zip(grads, unit.params, strict=True)
                ]
                directions = parts.precondition(
                    unit.layout, self._inverse(unit), decayed, self.damping, self.pi_damping
                )
                deltas = []
                for p, d in zip(unit.params, directions, strict=True):
                    state = self.state[p]
                    buffer = parts.momentum_direction(state.get("momentum_buffer"), d, momentum)
                    if momentum != 0:
                        state["momentum_buffer"] = buffer
                    if keep:
                        deltas.append(-lr * buffer)
                    p.add_(buffer, alpha=-lr)
                if keep:
                    grads_kept.append([g.clone() for g in grads])
                    deltas_kept.append(deltas)
        return grads_kept, deltas_kept

    # ------------------------------------------------------------------- adaptive damping
    def _predicted_change(self, grads: list[list[Tensor]], deltas: list[list[Tensor]]) -> float:
        r""":math:`g^\top\delta + \frac12 \delta^\top (\bar C + \lambda I) \delta` over the blocks."""
        total = 0.0
        units = [u for group_units in self._units for u in group_units]
        for unit, g, delta in zip(units, grads, deltas, strict=True):
            state = self.state[unit.params[0]]
            m = unit.layout.to_matrix(delta, 0)
            cm = parts.kron_matvec(state["input_factor"], state["output_factor"], m)
            linear = sum(float((gi * di).sum()) for gi, di in zip(g, delta, strict=True))
            quadratic = float((m * cm).sum()) + self.damping * float(m.square().sum())
            total += linear + 0.5 * quadratic
        return total

    def _adapt_damping(
        self,
        closure: Callable[[], Tensor],
        loss: Tensor,
        grads: list[list[Tensor]],
        deltas: list[list[Tensor]],
    ) -> None:
        """Evaluate the loss at the new parameters and apply the Levenberg-Marquardt rule."""
        predicted = self._predicted_change(grads, deltas)
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [p.grad for p in params]
        with torch.enable_grad():
            after = float(closure().detach())
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        ratio = parts.reduction_ratio(after - float(loss.detach()), predicted)
        factor = self.damping_factor**self.damping_interval
        self.damping = parts.levenberg_marquardt(
            self.damping, ratio, factor, self.min_damping, self.max_damping
        )
        self.last_ratio = ratio  # rho of the last adaptation

    # ------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict plus ``"kfac"``: steps, damping, MC generator, fallback state."""
        state = super().state_dict()
        state["kfac"] = {
            "steps": self._steps,
            "damping": self.damping,
            "generator": self._generator.get_state(),
            "fallback": None if self._fallback is None else self._fallback.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (resumes bit for bit)."""
        state_dict = dict(state_dict)
        if "kfac" not in state_dict:
            raise ValueError("KFAC.load_state_dict: not a KFAC state dict (no 'kfac' entry)")
        extra = state_dict.pop("kfac")
        super().load_state_dict(state_dict)
        self._steps = int(extra["steps"])
        self.damping = float(extra["damping"])
        self._generator.set_state(extra["generator"].cpu())
        if (extra["fallback"] is None) != (self._fallback is None):
            raise ValueError("KFAC.load_state_dict: the fallback parameters do not match")
        if self._fallback is not None:
            self._fallback.load_state_dict(extra["fallback"])

    @property
    def steps(self) -> int:
        """Steps taken so far."""
        return self._steps
