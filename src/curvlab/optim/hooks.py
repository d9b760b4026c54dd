r"""Public hooks of the curvature optimizers: where the statistics can be changed before use.

A *statistics hook* sees an optimizer's fresh curvature statistics of one step (KFAC's and
SINGD's Kronecker blocks ``{name: KronFactors}``, AdaHesScale's diagonals ``{name: Tensor}``)
before they enter the running averages or the factors' update, and may return replacements:
``hook(optimizer, statistics) -> statistics or None``. Data parallelism
(:class:`curvlab.distributed.DataParallelPreconditioner`) all-reduces them here.

An *inverse hook* (KFAC) may take over the eigendecompositions of the averaged blocks:
``hook(optimizer, blocks) -> {name: KronInverse} or None``; returning ``None`` leaves them to
the optimizer. Data parallelism computes each block on one rank and broadcasts it.

Both follow ``torch.optim``'s hooks: ``register_*`` returns a
:class:`torch.utils.hooks.RemovableHandle`, hooks run in registration order and are not part
of the ``state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch.utils.hooks import RemovableHandle

StatisticsHook = Callable[[Any, dict[str, Any]], "dict[str, Any] | None"]
"""``hook(optimizer, statistics) -> statistics or None`` (``None``: unchanged)."""

InverseHook = Callable[[Any, dict[str, Any]], "dict[str, Any] | None"]
"""``hook(optimizer, blocks) -> {name: KronInverse} or None`` (``None``: the optimizer's own)."""


def _registry(owner: Any, attribute: str) -> OrderedDict[int, Callable[..., Any]]:
    registry = owner.__dict__.get(attribute)
    if registry is None:
        registry = owner.__dict__[attribute] = OrderedDict()
    return registry


class StatisticsHooks:
    """Mixin of the curvature optimizers: :meth:`register_statistics_hook` and its runner."""

    def register_statistics_hook(self, hook: StatisticsHook) -> RemovableHandle:
        """Call ``hook(optimizer, statistics)`` on every fresh set of curvature statistics.

        Args:
            hook: Receives this optimizer and the step's statistics by parameter name (before
                any running average); returns replacements of the same kind, or ``None``.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        registry = _registry(self, "_statistics_hooks")
        handle = RemovableHandle(registry)
        registry[handle.id] = hook
        return handle

    def _run_statistics_hooks(self, statistics: dict[str, Any]) -> dict[str, Any]:
        """The statistics after every registered hook, in registration order."""
        for hook in _registry(self, "_statistics_hooks").values():
            changed = hook(self, statistics)
            if changed is not None:
                statistics = changed
        return statistics


class InverseHooks:
    """Mixin of KFAC: :meth:`register_inverse_hook` and its runner."""

    def register_inverse_hook(self, hook: InverseHook) -> RemovableHandle:
        """Let ``hook(optimizer, blocks)`` compute the eigendecompositions of the blocks.

        Args:
            hook: Receives this optimizer and its averaged blocks ``{name: KronFactors}`` (one
                name per block); returns ``{name: KronInverse}`` for every block, or ``None``
                to leave them to the optimizer. The last hook that returns them wins.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        registry = _registry(self, "_inverse_hooks")
        handle = RemovableHandle(registry)
        registry[handle.id] = hook
        return handle

    def _run_inverse_hooks(self, blocks: dict[str, Any]) -> dict[str, Any] | None:
        """The inverses of the last hook that returned them, or ``None``."""
        inverses = None
        for hook in _registry(self, "_inverse_hooks").values():
            computed = hook(self, blocks)
            if computed is not None:
                inverses = computed
        return inverses
