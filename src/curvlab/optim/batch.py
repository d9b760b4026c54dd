r"""Checks of the batch an optimizer step is given, with errors that name the argument.

A step that receives inputs or targets it cannot use should say which argument is wrong and what
was expected, before any arithmetic runs: a raw size mismatch from deep inside a solver, or a NaN
that silently spreads through every parameter, leaves the user guessing. Every check here costs one
pass over the batch (``isfinite``, a min/max), negligible next to a step.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _describe_non_finite(values: Tensor) -> str | None:
    r"""Where ``values`` ``[N, ...]`` holds NaN or Inf: ``None`` if nowhere, else a sentence part.

    Names the number of samples affected, the first one (its index along dimension 0) and the
    first offending entry of that sample with its value.
    """
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return None
    per_sample = finite.reshape(values.shape[0], -1).all(dim=1)
    bad = (~per_sample).nonzero().flatten()
    first = int(bad[0])
    row = values[first].reshape(-1)
    entry = int((~torch.isfinite(row)).nonzero()[0])
    kinds = []
    if bool(torch.isnan(values).any()):
        kinds.append("NaN")
    if bool(torch.isinf(values).any()):
        kinds.append("Inf")
    where = f"entry {entry} " if row.numel() > 1 else ""
    return (
        f"hold {' and '.join(kinds)} in {len(bad)} of {values.shape[0]} samples; the first is "
        f"sample {first} ({where}= {float(row[entry])})"
    )


def check_inputs(inputs: object, in_features: int, like: Tensor, where: str) -> Tensor:
    r"""Check a batch of inputs and return it flattened to ``[N, d]``.

    Args:
        inputs: The batch, ``[N, *]`` flattening to ``[N, d]``.
        in_features: :math:`d`, the model's input size.
        like: A parameter of the model: the inputs must share its dtype and device.
        where: The caller's name for the messages, e.g. ``"ExactGN.step"``.

    Raises:
        TypeError: ``inputs`` is not a floating tensor of the model's dtype and device.
        ValueError: It has no samples, the wrong number of features, or NaN / Inf entries.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{where}: inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        hint = (
            " (use curvlab.data.to_float for uint8 images)" if inputs.dtype == torch.uint8 else ""
        )
        raise TypeError(f"{where}: inputs must be floating point, got {inputs.dtype}{hint}")
    if inputs.dtype != like.dtype:
        raise TypeError(
            f"{where}: inputs are {inputs.dtype} but the model's parameters are {like.dtype}; "
            f"cast one of them (inputs.to({like.dtype}) or model.to({inputs.dtype}))"
        )
    if inputs.device != like.device:
        raise TypeError(
            f"{where}: inputs are on {inputs.device} but the model is on {like.device}; move one"
        )
    if inputs.ndim < 2:
        raise ValueError(
            f"{where}: inputs must be a batch [N, *] of samples with {in_features} features each, "
            f"got shape {tuple(inputs.shape)} (a single sample needs a batch axis: inputs[None])"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{where}: inputs hold no samples (shape {tuple(inputs.shape)})")
    flat = inputs.reshape(inputs.shape[0], -1)
    if flat.shape[1] != in_features:
        raise ValueError(
            f"{where}: inputs must have {in_features} features per sample (the model's "
            f"in_features), got shape {tuple(inputs.shape)}, i.e. {flat.shape[1]} per sample"
        )
    problem = _describe_non_finite(flat)
    if problem is not None:
        raise ValueError(f"{where}: inputs {problem}")
    return flat


def check_targets(
    targets: object, num_samples: int, num_classes: int, loss: str, where: str
) -> None:
    r"""Check targets against the batch: class labels ``[N]`` or values / probabilities ``[N, k]``.

    Args:
        targets: Integer class labels ``[N]`` in :math:`[0, k)`, or floating ``[N, k]`` regression
            targets (MSE) or class probabilities (CE: non-negative, rows summing to one).
        num_samples: :math:`N`, the number of input samples.
        num_classes: :math:`k`, the model's output size.
        loss: ``"mse"`` or ``"ce"``.
        where: The caller's name for the messages.

    Raises:
        TypeError: ``targets`` is not an integer or floating tensor.
        ValueError: Wrong length or shape, labels out of range, NaN / Inf, or (CE) rows that are
            not probabilities.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"{where}: targets must be a torch.Tensor, got {type(targets).__name__}")
    integer = targets.dtype in _INTEGER_DTYPES
    if not integer and not targets.is_floating_point():
        raise TypeError(
            f"{where}: targets must be integer class labels [N] or floating [N, {num_classes}] "
            f"values, got dtype {targets.dtype}"
        )
    length = targets.shape[0] if targets.ndim else None
    if length != num_samples:
        raise ValueError(
            f"{where}: targets must hold one entry per input sample ({num_samples}), got shape "
            f"{tuple(targets.shape)}"
        )
    if integer:
        _check_labels(targets, num_classes, where)
        return
    if targets.shape != (num_samples, num_classes):
        raise ValueError(
            f"{where}: floating targets must be [N, k] = [{num_samples}, {num_classes}] (one value "
            f"per output), got shape {tuple(targets.shape)}; pass integer class labels [N] as int64"
        )
    problem = _describe_non_finite(targets)
    if problem is not None:
        raise ValueError(f"{where}: targets {problem}")
    if loss == "ce":
        _check_probabilities(targets, where)


def _check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    if labels.ndim != 1:
        raise ValueError(
            f"{where}: integer targets are class labels and must be [N], got shape "
            f"{tuple(labels.shape)}"
        )
    outside = (labels < 0) | (labels >= num_classes)
    if bool(outside.any()):
        bad = outside.nonzero().flatten()
        first = int(bad[0])
        raise ValueError(
            f"{where}: targets: class labels must lie in [0, {num_classes}) (the model's "
            f"num_classes), got {len(bad)} outside; the first is sample {first} with label "
            f"{int(labels[first])}"
        )


def _check_probabilities(targets: Tensor, where: str) -> None:
    values = targets.double()
    tolerance = 10 * torch.finfo(targets.dtype).eps ** 0.5
    negative = (values < 0).any(dim=1)
    off_sum = (values.sum(dim=1) - 1).abs() > tolerance
    bad = (negative | off_sum).nonzero().flatten()
    if len(bad):
        first = int(bad[0])
        raise ValueError(
            f"{where}: cross-entropy targets [N, k] must be class probabilities (non-negative, "
            f"each row summing to 1); {len(bad)} rows are not, the first is sample {first} "
            f"(min {float(values[first].min()):.4g}, sum {float(values[first].sum()):.4g}); "
            f"pass integer class labels [N] as int64"
        )
