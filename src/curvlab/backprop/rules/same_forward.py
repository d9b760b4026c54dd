"""Which class's ``forward`` a module class computes: the one check every rule lookup shares.

A rule (parametric in :mod:`curvlab.backprop.rules`, elementwise in
:mod:`curvlab.backprop.rules.activation`) registered for a class applies to a subclass only if
the subclass computes the same function. That holds when it does not override ``forward``, or
overrides it with an equivalent one declared in :data:`SAME_FORWARD` (the memory-saving layers of
:mod:`curvlab.nn.memsave` are). This module imports no rule, so every lookup can use it without
import cycles.
"""

from __future__ import annotations

from torch import nn

from curvlab.nn.memsave import MEMSAVE_CLASSES

SAME_FORWARD: dict[type[nn.Module], type[nn.Module]] = {
    memsave: stock for stock, memsave in MEMSAVE_CLASSES.items()
}
"""``SAME_FORWARD[cls] = base``: ``cls`` subclasses ``base`` and its own ``forward`` computes the
same function of the input, parameters and buffers as ``base.forward`` (only the autograd graph
differs). Holds :mod:`curvlab.nn.memsave`'s layers; add your own such subclasses."""


def _forward_owner(cls: type[nn.Module]) -> type[nn.Module]:
    """The class in ``cls.__mro__`` that defines ``cls.forward``."""
    return next((c for c in cls.__mro__ if "forward" in vars(c)), cls)


def forward_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The class whose ``forward`` defines what ``cls`` computes, following :data:`SAME_FORWARD`.

    That is the class in ``cls.__mro__`` that defines ``cls.forward``, or the declared base it is
    equivalent to (itself resolved the same way).

    Raises:
        TypeError: If a declared ``SAME_FORWARD[cls] = base`` has ``cls`` not subclassing ``base``.
    """
    seen = set()
    owner = _forward_owner(cls)
    while owner in SAME_FORWARD and owner not in seen:
        seen.add(owner)
        base = SAME_FORWARD[owner]
        if not issubclass(owner, base):
            raise TypeError(
                f"SAME_FORWARD[{owner.__name__}] = {base.__name__}: {owner.__name__} must "
                f"subclass {base.__name__}"
            )
        owner = _forward_owner(base)
    return owner


def computes_forward_of(cls: type[nn.Module], registered: type[nn.Module]) -> bool:
    """Whether ``cls`` (a subclass of ``registered``) computes ``registered.forward``.

    It does if it does not override ``forward``, or overrides it with one declared equivalent in
    :data:`SAME_FORWARD`.
    """
    return forward_class(cls).forward is registered.forward


__all__ = ["SAME_FORWARD", "computes_forward_of", "forward_class"]
