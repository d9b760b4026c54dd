"""Conversions between stored images and the tensors models consume."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_tensors", "to_float"]


def as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn loader arrays into tensors: images keep uint8, labels become int64.

    Args:
        images: uint8 array ``[N, C, H, W]``.
        labels: integer array ``[N]``.

    Returns:
        ``(images, labels)`` as uint8 ``[N, C, H, W]`` and int64 ``[N]`` tensors that own their
        memory.
    """
    image_tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    label_tensor = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return image_tensor, label_tensor


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Scale uint8 images to floats in :math:`[0, 1]`: :math:`x \mapsto x / 255`.

    Args:
        images: uint8 tensor of any shape, e.g. ``[N, C, H, W]``.
        dtype: Floating dtype of the result.

    Returns:
        Tensor of the same shape and ``dtype`` with values in ``[0, 1]``.

    Raises:
        TypeError: ``images`` is not uint8 (scaling floats again would be a silent bug) or
            ``dtype`` is not floating.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"to_float needs a floating dtype, got {dtype}")
    return images.to(dtype).div_(255)
