"""The dense float64 reference loop of the Adam-style optimizers (AdaHesScale, RootFreeAdam).

Shared by ``test_adahesscale.py`` and ``test_rootfree.py``: the problem (a small MLP, seeded
batches, the standard closure) and :func:`moment_loop`, which writes an update rule out per
parameter from autograd's gradients (and, where the rule needs one, the engine's diagonal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.backprop import compute

LOSS = nn.CrossEntropyLoss()

Rule = Callable[[int, dict[str, Tensor], Tensor, Tensor, Tensor | None], Tensor]
"""``rule(t, state, g, p, h)``: the step subtracted from ``p`` at step ``t`` (from 1), with the
parameter's ``state`` (a dict it keeps its moments in), its gradient ``g`` and the engine's
diagonal ``h`` (``None`` without one)."""


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Linear(5, 4), Tanh, Linear(4, 3), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def batches(steps: int, seed: int = 0, n: int = 16) -> list[tuple[Tensor, Tensor]]:
    """``steps`` batches of ``n`` inputs ``[n, 5]`` (float64) and labels ``[n]`` in 0..2."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(steps)
    ]


def run(model: nn.Module, opt: torch.optim.Optimizer, data: list[tuple[Tensor, Tensor]]) -> None:
    """One ``opt.step(closure)`` per batch with the standard closure."""
    for x, y in data:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = LOSS(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def moment_loop(
    model: nn.Module, data: list[tuple[Tensor, Tensor]], rule: Rule, diagonal: object = None
) -> None:
    """The reference: ``p -= rule(t, state, g, p, h)`` for every parameter and batch.

    Args:
        model: Updated in place.
        data: The batches.
        rule: The update rule (:data:`Rule`).
        diagonal: An engine quantity (e.g. ``HesScale()``) whose result is ``h``; ``None``: no
            ``h``.
    """
    params = dict(model.named_parameters())
    states: dict[str, dict[str, Tensor]] = {name: {} for name in params}
    for t, (x, y) in enumerate(data, start=1):
        extra = None if diagonal is None else compute(model, LOSS, x, y, [diagonal])
        grads = torch.autograd.grad(LOSS(model(x), y), list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads, strict=True):
                h = None if extra is None else extra[diagonal.name][name]
                p -= rule(t, states[name], g, p, h)
