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
from curvlab.nn.memsave import MEMSAVE_CLASSES

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

SAME_FORWARD: dict[type[nn.Module], type[nn.Module]] = {
    memsave: stock for stock, memsave in MEMSAVE_CLASSES.items()
}
"""``SAME_FORWARD[cls] = base``: ``cls`` subclasses ``base`` and its own ``forward`` computes the
same function of the input, parameters and buffers as ``base.forward`` (only the autograd graph
differs). Holds :mod:`curvlab.nn.memsave`'s layers; add your own such subclasses."""


def _forward_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The class whose ``forward`` defines what ``cls`` computes, following :data:`SAME_FORWARD`.

    That is the class in ``cls.__mro__`` that defines ``cls.forward``, or the declared base it is
    equivalent to (itself resolved the same way).
    """
    seen = set()
    owner = next((c for c in cls.__mro__ if "forward" in vars(c)), cls)
    while owner in SAME_FORWARD and owner not in seen:
        seen.add(owner)
        base = SAME_FORWARD[owner]
        if not issubclass(owner, base):
            raise TypeError(
                f"SAME_FORWARD[{owner.__name__}] = {base.__name__}: {owner.__name__} must "
                f"subclass {base.__name__}"
            )
        owner = next((c for c in base.__mro__ if "forward" in vars(c)), base)
    return owner


def find_rule(module: nn.Module) -> Rule | None:
    """The registered rule for ``module``, or ``None`` if it needs the generic path.

    The rule of the nearest registered class in ``type(module).__mro__`` applies if ``module``
    computes that class's ``forward``: it does not override it, or overrides it with an
    equivalent one declared in :data:`SAME_FORWARD`.
    """
    cls = type(module)
    for registered in cls.__mro__:
        if registered in RULES:
            same = _forward_class(cls).forward is registered.forward
            return RULES[registered] if same else None
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
