"""Per-layer derivative rules and their lookup.

A rule applies to a module whose class is registered here or subclasses a registered class
without overriding ``forward``; other parametric modules use the generic
:class:`~curvlab.backprop.functional.FuncRule`. Register a rule for your own module class with
``RULES[MyModule] = MyRule()`` (a :class:`Rule` needs only :meth:`Rule.jac_t`).

A subclass whose ``forward`` computes the *same function* as its parent's and only changes how
autograd gets there (what it stores, which kernels run) keeps the parent's rule when it is
declared in :data:`SAME_FORWARD`. The memory-saving layers of :mod:`curvlab.nn.memsave` are
declared there, so a model passed through :func:`curvlab.nn.memsave.convert` keeps the fast
rules. Any other subclass that overrides ``forward`` may compute something else and goes to the
generic path.
"""

from __future__ import annotations

from torch import nn

from curvlab.backprop.rules.attention import AttentionRule
from curvlab.backprop.rules.base import Call, KronSums, Rule
from curvlab.backprop.rules.conv import ConvRule
from curvlab.backprop.rules.conv_transpose import ConvTransposeRule
from curvlab.backprop.rules.linear import LinearRule
from curvlab.backprop.rules.norm import EmbeddingRule, NormRule
from curvlab.backprop.rules.same_forward import SAME_FORWARD, computes_forward_of

RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.ConvTranspose1d: ConvTransposeRule(),
    nn.ConvTranspose2d: ConvTransposeRule(),
    nn.ConvTranspose3d: ConvTransposeRule(),
    nn.BatchNorm1d: NormRule(linear_in_input=True),
    nn.BatchNorm2d: NormRule(linear_in_input=True),
    nn.BatchNorm3d: NormRule(linear_in_input=True),
    nn.LayerNorm: NormRule(linear_in_input=False),
    nn.GroupNorm: NormRule(linear_in_input=False),
    nn.Embedding: EmbeddingRule(),
    nn.MultiheadAttention: AttentionRule(),
}
"""Registered rules by module class."""


def find_rule(module: nn.Module) -> Rule | None:
    """The registered rule for ``module``, or ``None`` if it needs the generic path.

    The rule of the nearest registered class in ``type(module).__mro__`` applies if ``module``
    computes that class's ``forward``: it does not override it, or overrides it with an
    equivalent one declared in :data:`SAME_FORWARD`.
    """
    cls = type(module)
    for registered in cls.__mro__:
        if registered in RULES:
            return RULES[registered] if computes_forward_of(cls, registered) else None
    return None


__all__ = [
    "RULES",
    "SAME_FORWARD",
    "Call",
    "ConvRule",
    "ConvTransposeRule",
    "KronSums",
    "LinearRule",
    "Rule",
    "find_rule",
]
