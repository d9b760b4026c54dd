r"""What the estimators need of a matrix :math:`A` ``[P, P]``: ``A @ V`` and ``A.shape``.

Every estimator of :mod:`curvlab.linalg` takes ``A`` as anything with a product ``A @ V`` for a
flat tensor ``V`` ``[P, K]`` (returning ``[P, K]``) and a ``shape`` ``(P, P)``: a square dense
tensor, a curvature operator, or a Python function wrapped in :class:`MatmatOperator`. The
estimators only ever multiply ``[P, K]`` blocks, so an operator whose product is one batched pass
over ``K`` columns pays for it once. Random vectors are drawn in ``A.dtype`` on ``A.device`` when
``A`` has them, else in the default dtype on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

DISTRIBUTIONS = ("rademacher", "normal")
r"""The distributions of random test vectors: entries :math:`\pm 1`, or standard normal."""


class MatmatOperator:
    r"""A square matrix :math:`A` ``[P, P]`` known only by its product with a block of vectors.

    Args:
        matmat: ``V`` ``[P, K]`` :math:`\mapsto A V` ``[P, K]``.
        size: :math:`P`.
        dtype: The dtype of the vectors ``matmat`` takes.
        device: The device of the vectors ``matmat`` takes.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 4.0))
        >>> op = MatmatOperator(lambda V: A @ V, 3, dtype=A.dtype)
        >>> (op @ torch.ones(3)).tolist()
        [1.0, 2.0, 3.0]
    """

    def __init__(
        self,
        matmat: Callable[[Tensor], Tensor],
        size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if size < 1:
            raise ValueError(f"MatmatOperator needs a positive size, got {size}")
        self.matmat = matmat
        self.shape = (int(size), int(size))
        self.dtype = torch.get_default_dtype() if dtype is None else dtype
        self.device = torch.device(device)

    def __matmul__(self, v: Tensor) -> Tensor:
        r""":math:`A v` for ``v`` ``[P]`` or ``[P, K]``, of the same shape."""
        if v.dim() == 1:
            return self.matmat(v.unsqueeze(1)).squeeze(1)
        return self.matmat(v)

    def __repr__(self) -> str:
        return f"MatmatOperator(size={self.shape[0]}, dtype={self.dtype}, device={self.device})"


def operator_size(A: Any) -> int:
    """:math:`P` of a square ``A`` ``[P, P]``; raises a ``ValueError`` naming its shape otherwise.

    Args:
        A: Anything with a ``shape`` ``(P, P)``.

    Returns:
        :math:`P`.
    """
    shape = getattr(A, "shape", None)
    if shape is None:
        raise TypeError(
            f"curvlab.linalg needs a square operator with `A @ V` and `A.shape`, got "
            f"{type(A).__name__} without a shape; wrap a function in MatmatOperator(matmat, size)"
        )
    shape = tuple(shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"curvlab.linalg needs a square operator [P, P], got shape {shape}")
    return int(shape[0])


def operator_dtype_device(A: Any) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the vectors ``A`` multiplies (default dtype on the CPU if unknown).

    Args:
        A: The operator.

    Returns:
        ``(dtype, device)``.
    """
    dtype = getattr(A, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.get_default_dtype()
    device = getattr(A, "device", None)
    return dtype, torch.device("cpu") if device is None else torch.device(device)


def apply(A: Any, V: Tensor) -> Tensor:
    r""":math:`A V` for ``V`` ``[P, K]``: one call of ``A @ V``, checked to be ``[P, K]``.

    Args:
        A: The operator ``[P, P]``.
        V: ``[P, K]``.

    Returns:
        ``[P, K]``.
    """
    out = A @ V
    if tuple(out.shape) != tuple(V.shape):
        raise ValueError(
            f"A @ V returned shape {tuple(out.shape)} for V of shape {tuple(V.shape)}; "
            f"curvlab.linalg needs a square operator whose product keeps the shape"
        )
    return out


def random_vectors(
    size: int,
    num: int,
    distribution: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""``num`` independent test vectors ``[size, num]`` with :math:`\mathbb{E}[z z^\top] = I`.

    Args:
        size: :math:`P`.
        num: The number of vectors :math:`K`.
        distribution: ``"rademacher"`` (entries :math:`\pm 1` with probability 1/2 each) or
            ``"normal"`` (standard normal entries).
        dtype: Their dtype.
        device: Their device.
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        ``[P, K]``.
    """
    if distribution == "rademacher":
        signs = torch.randint(0, 2, (size, num), generator=generator, device=device)
        return (2 * signs - 1).to(dtype)
    if distribution == "normal":
        return torch.randn(size, num, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")


def probe_vectors(
    A: Any, num: int, distribution: str, generator: torch.Generator | None = None
) -> Tensor:
    """``num`` test vectors ``[P, num]`` for ``A`` ``[P, P]``, in its dtype on its device.

    Args:
        A: The operator.
        num: The number of vectors.
        distribution: ``"rademacher"`` or ``"normal"`` (see :func:`random_vectors`).
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        ``[P, num]``.
    """
    dtype, device = operator_dtype_device(A)
    return random_vectors(
        operator_size(A), num, distribution, dtype=dtype, device=device, generator=generator
    )


def check_count(name: str, value: int, minimum: int) -> int:
    """``value`` as an ``int`` if it is at least ``minimum``; a ``ValueError`` naming ``name`` else.

    Args:
        name: The argument's name, for the message.
        value: Its value.
        minimum: The smallest value allowed.

    Returns:
        ``int(value)``.
    """
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
