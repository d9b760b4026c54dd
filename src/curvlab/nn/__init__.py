"""Models and layers: reversible networks (C1), memory-saving layers (C8), einsum convolutions (C9).

``curvlab.nn.memsave`` and ``curvlab.nn.einconv`` are also importable as modules; their main
functions and classes are re-exported here.
"""

from curvlab.nn import einconv, memsave
from curvlab.nn.einconv import (
    conv,
    conv_hyperparameters,
    conv_input_grad,
    conv_weight_grad,
    index_pattern,
    kfac_expand_factor,
    kfac_reduce_factor,
    randomized_conv,
    unfold,
)
from curvlab.nn.memsave import (
    KEPT_STOCK,
    MEMSAVE_CLASSES,
    MemSaveBatchNorm1d,
    MemSaveBatchNorm2d,
    MemSaveBatchNorm3d,
    MemSaveConv1d,
    MemSaveConv2d,
    MemSaveConv3d,
    MemSaveDropout,
    MemSaveLayerNorm,
    MemSaveMaxPool1d,
    MemSaveMaxPool2d,
    MemSaveMaxPool3d,
    MemSaveReLU,
    PeakMemory,
    SavedTensorBytes,
    convert,
    revert,
)
from curvlab.nn.reversible import InvertedBottleneck, ReversibleBlock, ReversibleSequence, RevMLP

__all__ = [
    "KEPT_STOCK",
    "MEMSAVE_CLASSES",
    "InvertedBottleneck",
    "MemSaveBatchNorm1d",
    "MemSaveBatchNorm2d",
    "MemSaveBatchNorm3d",
    "MemSaveConv1d",
    "MemSaveConv2d",
    "MemSaveConv3d",
    "MemSaveDropout",
    "MemSaveLayerNorm",
    "MemSaveMaxPool1d",
    "MemSaveMaxPool2d",
    "MemSaveMaxPool3d",
    "MemSaveReLU",
    "PeakMemory",
    "RevMLP",
    "ReversibleBlock",
    "ReversibleSequence",
    "SavedTensorBytes",
    "conv",
    "conv_hyperparameters",
    "conv_input_grad",
    "conv_weight_grad",
    "convert",
    "einconv",
    "index_pattern",
    "kfac_expand_factor",
    "kfac_reduce_factor",
    "memsave",
    "randomized_conv",
    "revert",
    "unfold",
]
