r"""Reversible MLPs with inverted-bottleneck coupling blocks (Buffelli et al., NeurIPS 2024).

The input :math:`x \in \mathbb{R}^d` is flattened and split into halves
:math:`x_1, x_2 \in \mathbb{R}^{m}`, :math:`m = d/2`. Each of the ``depth`` blocks is a RevNet
coupling

.. math::
    y_1 = x_1 + F(x_2), \qquad y_2 = x_2 + G(y_1),

with the exact inverse :math:`x_2 = y_2 - G(y_1)`, :math:`x_1 = y_1 - F(x_2)`. Each branch is an
*inverted bottleneck* :math:`\phi(z) = \sigma(\operatorname{norm}(z)\, C)\, W^\top + b`: a fixed
random expansion :math:`C \in \mathbb{R}^{m \times h}` (entries :math:`\mathcal{N}(0, 1/h)`) and a
trained projection ``proj`` (:class:`torch.nn.Linear`, weight :math:`W \in \mathbb{R}^{m \times h}`).
The branch is linear in its trained parameters, which is what makes exact Gauss-Newton tractable
(see :class:`curvlab.optim.ExactGN`). The first block sees the raw input and uses no nonlinearity
and no norm, as in the authors' code.

The network output is :math:`f = z_L U` with a fixed projection :math:`U \in \mathbb{R}^{d \times k}`
with orthonormal columns (QR of a Gaussian matrix).

``inverted_bottleneck=False`` gives the variant of the paper's Figure 5: no expansion,
:math:`\phi(z) = \sigma(\operatorname{norm}(z))\, W^\top + b` with a square :math:`W`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

_NONLINEARITIES = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}


class InvertedBottleneck(nn.Module):
    r"""One coupling branch :math:`\phi(z) = \sigma(\operatorname{norm}(z) C) W^\top + b`.

    Args:
        features: Width :math:`m` of the input and output, ``[N, m]``.
        hidden: Width :math:`h` of the fixed expansion; ``None`` for no expansion (Figure 5).
        bias: Whether ``proj`` has a bias.
        norm: Whether to apply a parameter-free LayerNorm before the expansion.
        nonlinearity: One of ``"relu"``, ``"tanh"``, ``"gelu"``, ``"identity"``.
    """

    def __init__(
        self,
        features: int,
        hidden: int | None,
        bias: bool = True,
        norm: bool = False,
        nonlinearity: str = "relu",
    ) -> None:
        super().__init__()
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(
                f"unknown nonlinearity {nonlinearity!r}; choose one of {sorted(_NONLINEARITIES)}"
            )
        width = features if hidden is None else hidden
        self.norm = (
            nn.LayerNorm(features, eps=1e-6, elementwise_affine=False) if norm else nn.Identity()
        )
        if hidden is None:
            self.register_buffer("expansion", None)
        else:
            self.register_buffer("expansion", torch.randn(features, hidden) / math.sqrt(hidden))
        self.activation = _NONLINEARITIES[nonlinearity]()
        self.proj = nn.Linear(width, features, bias=bias)
        gain = nn.init.calculate_gain("relu")
        nn.init.xavier_normal_(self.proj.weight, gain=gain)
        if bias:
            nn.init.zeros_(self.proj.bias)

    def pre_activation(self, z: Tensor) -> Tensor:
        r"""Pre-activation :math:`\operatorname{norm}(z) C`, ``[N, m] -> [N, h]``."""
        z = self.norm(z)
        return z if self.expansion is None else z @ self.expansion

    def features(self, z: Tensor) -> Tensor:
        r"""Features :math:`a = \sigma(\operatorname{norm}(z) C)`, ``[N, m] -> [N, h]``."""
        return self.activation(self.pre_activation(z))

    def forward(self, z: Tensor) -> Tensor:
        """Branch output ``[N, m]``."""
        return self.proj(self.features(z))


class ReversibleBlock(nn.Module):
    r"""RevNet coupling :math:`y_1 = x_1 + F(x_2)`, :math:`y_2 = x_2 + G(y_1)` on ``[N, 2m]``."""

    def __init__(self, f: InvertedBottleneck, g: InvertedBottleneck) -> None:
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, x: Tensor) -> Tensor:
        """Block output ``[N, 2m]``."""
        return self.couple(x, self.f, self.g)

    @staticmethod
    def couple(x: Tensor, f: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor]) -> Tensor:
        r"""The coupling :math:`y_1 = x_1 + f(x_2)`, :math:`y_2 = x_2 + g(y_1)`, ``[N, 2m] -> [N, 2m]``.

        :meth:`forward` with the branches ``f`` and ``g`` passed in, e.g. functions that compute
        the block's own branches and keep what they computed (as :class:`curvlab.optim.ExactGN`
        does for its linearization).
        """
        x1, x2 = x.chunk(2, dim=-1)
        y1 = x1 + f(x2)
        y2 = x2 + g(y1)
        return torch.cat([y1, y2], dim=-1)

    def inverse(self, y: Tensor) -> Tensor:
        """Exact inverse of :meth:`forward`, ``[N, 2m] -> [N, 2m]``."""
        y1, y2 = y.chunk(2, dim=-1)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=-1)


class ReversibleSequence(nn.Module):
    """A stack of :class:`ReversibleBlock` with an exact :meth:`inverse`."""

    def __init__(self, blocks: list[ReversibleBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Apply every block in order, ``[N, d] -> [N, d]``."""
        for block in self.blocks:
            x = block(x)
        return x

    def inverse(self, z: Tensor) -> Tensor:
        """Recover the input from the output, ``[N, d] -> [N, d]``."""
        for block in reversed(self.blocks):
            z = block.inverse(z)
        return z


class RevMLP(nn.Module):
    r"""Reversible MLP of the exact Gauss-Newton paper.

    Args:
        in_features: Input size :math:`d` after flattening (must be even).
        num_classes: Output size :math:`k \le d`.
        hidden: Expansion width :math:`h` of every branch (ignored without inverted bottleneck).
        depth: Number :math:`L` of reversible blocks (each with two branches F and G).
        bias: Whether the trained projections have biases.
        norm: Whether each branch (after the first block) applies a parameter-free LayerNorm.
        nonlinearity: Nonlinearity of every branch after the first block.
        inverted_bottleneck: ``False`` gives the paper's Figure 5 variant (square :math:`W`).

    Shapes:
        input ``[N, *]`` flattening to ``[N, d]``; output ``[N, k]``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int,
        depth: int,
        bias: bool = True,
        norm: bool = False,
        nonlinearity: str = "relu",
        inverted_bottleneck: bool = True,
    ) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(
                f"RevMLP needs an even in_features to split in halves, got {in_features}"
            )
        if not 0 < num_classes <= in_features:
            raise ValueError(
                f"num_classes must be in [1, in_features={in_features}], got {num_classes}"
            )
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(
                f"unknown nonlinearity {nonlinearity!r}; choose one of {sorted(_NONLINEARITIES)}"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = hidden if inverted_bottleneck else None
        self.inverted_bottleneck = inverted_bottleneck
        half = in_features // 2
        blocks = []
        for index in range(depth):
            first = index == 0
            kwargs = {
                "features": half,
                "hidden": self.hidden,
                "bias": bias,
                "norm": norm and not first,
                "nonlinearity": "identity" if first else nonlinearity,
            }
            blocks.append(
                ReversibleBlock(InvertedBottleneck(**kwargs), InvertedBottleneck(**kwargs))
            )
        self.body = ReversibleSequence(blocks)
        gaussian = torch.randn(in_features, num_classes, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        self.register_buffer("projection", q.to(torch.get_default_dtype()))

    def flatten_input(self, x: Tensor) -> Tensor:
        """Flatten ``[N, *]`` to ``[N, d]`` and check ``d``."""
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"RevMLP expects {self.in_features} input features per sample, "
                f"got input flattening to {tuple(x.shape)}"
            )
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Logits / regression outputs ``[N, k]``."""
        return self.body(self.flatten_input(x)) @ self.projection
