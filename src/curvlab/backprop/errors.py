"""Errors and warnings raised by :mod:`curvlab.backprop`; each message names the culprit."""

from __future__ import annotations


class UnsupportedModuleError(RuntimeError):
    """A module that neither a per-layer rule nor the generic torch.func path can handle.

    The message names the module's class, its name in ``model.named_modules()``, the quantity
    that was asked for, and what remains available.
    """


class UnsupportedLossError(ValueError):
    """A loss function (type, reduction or option) that the engine cannot differentiate twice."""


class GenericPathWarning(UserWarning):
    """Some parametric modules have no per-layer rule and use the slower generic torch.func path."""


class NonFiniteError(ValueError):
    """NaN or Inf in an input, the model output or the loss; the message names where."""
