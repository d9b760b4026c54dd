r"""Bucketed collectives: flatten many tensors into a few buffers, one collective per buffer.

A list of tensors :math:`t_1, \dots, t_k` is split, in order, into buckets of at most
``bucket_bytes`` bytes (a tensor larger than a bucket gets its own), separately per dtype and
device; each bucket is flattened into one buffer, reduced by a single ``all_reduce``, and
unflattened back into tensors shaped like the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""Default bucket size (25 MiB, as :class:`torch.nn.parallel.DistributedDataParallel`)."""


def require_initialized(caller: str) -> None:
    """Raise a clear error unless the default process group is initialised.

    Args:
        caller: The function or class that needs the process group (named in the message).

    Raises:
        RuntimeError: If ``torch.distributed`` is unavailable or not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{caller}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (e.g. under torchrun) first"
        )


def make_buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Split tensor indices into buckets of at most ``bucket_bytes`` bytes each.

    Buckets keep the input order within one dtype and device; a tensor larger than
    ``bucket_bytes`` forms a bucket of its own.

    Args:
        tensors: The tensors to bucket (any shapes).
        bucket_bytes: The largest bucket size in bytes (positive).

    Returns:
        Lists of indices into ``tensors``, one list per bucket; every index appears once.

    Raises:
        ValueError: If ``bucket_bytes`` is not a positive integer.
    """
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(f"make_buckets: bucket_bytes must be a positive int, got {bucket_bytes!r}")
    open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    done: list[list[int]] = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        size = t.numel() * t.element_size()
        indices, used = open_buckets.get(key, ([], 0))
        if indices and used + size > bucket_bytes:
            done.append(indices)
            indices, used = [], 0
        open_buckets[key] = (indices + [i], used + size)
    done.extend(indices for indices, _ in open_buckets.values() if indices)
    return sorted(done, key=lambda b: b[0])


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate the tensors' flattened entries into one 1d buffer ``[sum numel]``."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(buffer: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a :func:`flatten` buffer back into tensors shaped like ``like``."""
    need = sum(t.numel() for t in like)
    if need != buffer.numel():
        raise ValueError(f"unflatten: buffer has {buffer.numel()} entries, shapes need {need}")
    out, start = [], 0
    for t in like:
        out.append(buffer[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def all_reduce_bucketed(
    tensors: Sequence[Tensor],
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> list[Tensor]:
    """All-reduce tensors with one ``all_reduce`` per bucket.

    Args:
        tensors: The tensors to reduce (left unchanged).
        group: The process group (``None``: the default one).
        bucket_bytes: The largest bucket in bytes.
        op: The reduction (sum by default).

    Returns:
        New tensors, the reductions of ``tensors`` over the ranks, in order and shape.

    Raises:
        RuntimeError: If the process group is not initialised.
    """
    require_initialized("all_reduce_bucketed")
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    for bucket in make_buckets(tensors, bucket_bytes):
        members = [tensors[i] for i in bucket]
        buffer = flatten(members).clone()
        dist.all_reduce(buffer, op=op, group=group)
        for i, t in zip(bucket, unflatten(buffer, members), strict=True):
            out[i] = t
    return out
