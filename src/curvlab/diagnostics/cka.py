r"""Linear centered kernel alignment (CKA) between representations, and of a block over training.

Linear CKA (Kornblith et al., ICML 2019) compares two representations of the same ``N`` inputs,
:math:`X \in \mathbb{R}^{N \times D_1}` and :math:`Y \in \mathbb{R}^{N \times D_2}`, through the
Hilbert-Schmidt independence criterion (HSIC) of their linear kernels :math:`K = X X^\top`,
:math:`L = Y Y^\top`, centered by :math:`H = I - \tfrac1N \mathbf 1 \mathbf 1^\top`:

.. math::
    \operatorname{CKA}(X, Y) = \frac{\operatorname{HSIC}(K, L)}
    {\sqrt{\operatorname{HSIC}(K, K)\,\operatorname{HSIC}(L, L)}}
    = \frac{\langle H K H, H L H \rangle_F}{\|H K H\|_F\, \|H L H\|_F}
    = \frac{\|\tilde Y^\top \tilde X\|_F^2}{\|\tilde X^\top \tilde X\|_F\, \|\tilde Y^\top \tilde Y\|_F},

with :math:`\tilde X = H X`, :math:`\tilde Y = H Y` the column-centered representations (the
biased HSIC estimator; its :math:`1/(N-1)^2` cancels). It lies in :math:`[0, 1]`, is 1 for
identical inputs, and is invariant to orthogonal transforms and isotropic scaling of either
representation (not to arbitrary invertible linear maps).

:class:`RepresentationCKA` records the outputs of named modules (forward hooks) on a fixed probe
batch once, e.g. at initialization, and returns their CKA with the outputs now: the paper's
Figure 4 plots it for the first, middle and last block of a :class:`curvlab.nn.RevMLP`
(:func:`first_middle_last`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvlab.nn.reversible import RevMLP


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    r"""Linear CKA of two representations of the same inputs.

    Computed in float64 from the centered features: by the feature form
    :math:`\|\tilde Y^\top \tilde X\|_F^2 / (\|\tilde X^\top \tilde X\|_F \|\tilde Y^\top \tilde Y\|_F)`
    when the feature products (about :math:`N (D_1 + D_2)^2` flops) are cheaper than the
    ``[N, N]`` Gram matrices (about :math:`N^2 (D_1 + D_2)`), else by the Gram form; both are
    the same number.

    Args:
        x: ``[N, D1]`` representation (trailing dimensions are flattened).
        y: ``[N, D2]`` representation of the same ``N`` inputs.

    Returns:
        A 0-dim float64 tensor in :math:`[0, 1]`; ``nan`` when either representation is the same
        for every input (its centered kernel is zero).

    Raises:
        ValueError: ``x`` and ``y`` differ in the number of samples, or ``N < 2``.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka compares two representations of the same inputs, but x has "
            f"{x.shape[0]} samples and y has {y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 samples, got {x.shape[0]}")
    x = _centered(x)
    y = _centered(y)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if (d1 + d2) ** 2 <= n * (d1 + d2):
        cross = (y.T @ x).square().sum()
        return cross / ((x.T @ x).norm() * (y.T @ y).norm())
    k, l_ = x @ x.T, y @ y.T
    return (k * l_).sum() / (k.norm() * l_.norm())


def _centered(features: Tensor) -> Tensor:
    """``[N, D]`` float64 features with zero column means."""
    features = features.detach().reshape(features.shape[0], -1).double()
    return features - features.mean(dim=0, keepdim=True)


def record_representations(
    model: nn.Module, inputs: Tensor, modules: Sequence[str]
) -> dict[str, Tensor]:
    """Outputs of the named modules on a batch, recorded by forward hooks (no gradients).

    Args:
        model: The network (in the mode it is in: call ``model.eval()`` first to switch off
            dropout and the like).
        inputs: ``[N, *]`` probe inputs.
        modules: Names from ``model.named_modules()``, e.g. ``"body.blocks.0"``.

    Returns:
        ``{name: [N, D]}``, each module's output detached and flattened per sample.

    Raises:
        ValueError: a name is not a module of ``model``, a module is called more than once in
            one forward pass, or its output is not a tensor with the batch first.
    """
    named = dict(model.named_modules())
    missing = [name for name in modules if name not in named]
    if missing:
        choices = ", ".join(list(named)[1:8])
        raise ValueError(
            f"{type(model).__name__} has no module {missing[0]!r}; its modules include "
            f"{choices}, ..."
        )
    recorded: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args, output) -> None:
            if name in recorded:
                raise ValueError(
                    f"module {name!r} ran more than once in one forward pass; record a module "
                    f"that runs once"
                )
            if not isinstance(output, Tensor) or output.shape[:1] != inputs.shape[:1]:
                raise ValueError(
                    f"module {name!r} returned {type(output).__name__} "
                    f"{tuple(getattr(output, 'shape', ()))}, not a tensor [N, ...] for the "
                    f"N = {inputs.shape[0]} inputs"
                )
            recorded[name] = output.detach().reshape(output.shape[0], -1)

        return hook

    handles = [named[name].register_forward_hook(hook_for(name)) for name in modules]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    never = [name for name in modules if name not in recorded]
    if never:
        raise ValueError(f"module {never[0]!r} did not run in the forward pass")
    return recorded


def first_middle_last(model: nn.Module) -> list[str]:
    """Names of the first, middle (index ``L // 2``) and last block of a network.

    Args:
        model: A :class:`curvlab.nn.RevMLP` (its ``L`` reversible blocks ``body.blocks.i``) or an
            ``nn.Sequential`` (its children that hold parameters).

    Returns:
        Up to three distinct module names, in network order.

    Raises:
        TypeError: another kind of model; pass the module names yourself.
    """
    if isinstance(model, RevMLP):
        names = [f"body.blocks.{i}" for i in range(len(model.body.blocks))]
    elif isinstance(model, nn.Sequential):
        names = [
            name
            for name, child in model.named_children()
            if next(child.parameters(), None) is not None
        ]
    else:
        raise TypeError(
            f"first_middle_last knows RevMLP and nn.Sequential, got {type(model).__name__}; "
            f"pass the module names (from model.named_modules()) yourself"
        )
    if not names:
        raise TypeError(f"{type(model).__name__} has no blocks with parameters")
    picked = [names[0], names[len(names) // 2], names[-1]]
    return list(dict.fromkeys(picked))


class RepresentationCKA:
    """Linear CKA of module outputs between a reference recorded now and later states.

    Args:
        model: The network; its modules' outputs on ``inputs`` are recorded at construction
            (e.g. at initialization) as the reference.
        inputs: ``[N, *]`` fixed probe inputs.
        modules: Module names (default: :func:`first_middle_last` of ``model``).

    Attributes:
        modules: The module names compared.
        reference: ``{name: [N, D]}`` the recorded reference outputs.

    Example:
        >>> tracker = RepresentationCKA(model, probe)  # at init  # doctest: +SKIP
        >>> ...train...  # doctest: +SKIP
        >>> tracker()  # {"body.blocks.0": 0.99, ...}  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, inputs: Tensor, modules: Sequence[str] | None = None):
        self.model = model
        self.inputs = inputs
        self.modules = list(first_middle_last(model) if modules is None else modules)
        self.reference = record_representations(model, inputs, self.modules)

    def __call__(self, model: nn.Module | None = None) -> dict[str, float]:
        """CKA of each module's output now (of ``model``, default the tracked one) to the reference.

        Args:
            model: The network to compare (another copy with the same module names), or ``None``.

        Returns:
            ``{name: CKA}`` in :math:`[0, 1]`, 1 where the representation has not changed up to
            rotation and scale.
        """
        now = record_representations(
            self.model if model is None else model, self.inputs, self.modules
        )
        return {name: float(linear_cka(self.reference[name], now[name])) for name in self.modules}
