"""curvlab: second-order information for PyTorch.

Sub-packages (lower layers never import higher ones):

* :mod:`curvlab.nn` -- models and layers (reversible networks, memory-saving layers, einsum convs).
* :mod:`curvlab.backprop` -- one-pass extended backpropagation of curvature quantities.
* :mod:`curvlab.linops` -- matrix-free curvature operators (GGN, Hessian, KFAC, ...) and inverses.
* :mod:`curvlab.optim` -- optimizers, starting with exact Gauss-Newton (:class:`ExactGN`).
* :mod:`curvlab.data` -- dataset loaders (IDX, CIFAR pickle) and the bundled Fashion-MNIST subset.
* :mod:`curvlab.experiments` -- the exact-GN paper's experiments behind ``curvlab run``.
"""

from curvlab.nn.reversible import RevMLP
from curvlab.optim.exact_gn import ExactGN

__version__ = "0.1.0"

__all__ = ["ExactGN", "RevMLP", "__version__"]
