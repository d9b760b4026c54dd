r"""The spectral density of a symmetric matrix by stochastic Lanczos quadrature, and its plot.

The spectral density of :math:`A` ``[P, P]`` with eigenvalues :math:`\lambda_1, \dots,
\lambda_P` is :math:`\phi(t) = \frac{1}{P} \sum_i \delta(t - \lambda_i)`; it integrates to 1,
and its moments are the normalized trace moments :math:`\int t^k \phi(t)\,dt =
\operatorname{tr}(A^k) / P`. For a unit vector :math:`v = z / \|z\|`, :math:`m` Lanczos steps
from :math:`v` give the Gauss quadrature :math:`v^\top f(A) v \approx \sum_{l=1}^m \tau_l
f(\theta_l)`, exact for polynomials of degree :math:`< 2m`, with nodes :math:`\theta_l` the
eigenvalues of :math:`T_m` and weights :math:`\tau_l` the squared first entries of its
eigenvectors (they sum to 1). Averaging over probes and widening each node to a Gaussian of
width :math:`\sigma` gives a smooth estimate of :math:`\phi`.

References:
    Ubaru, Chen & Saad, *Fast estimation of tr(f(A)) via stochastic Lanczos quadrature* (SIMAX
    2017). Ghorbani, Krishnan & Xiao, *An investigation into neural net optimization via
    Hessian eigenvalue density* (ICML 2019).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvlab.linalg.lanczos import LanczosProcess
from curvlab.linalg.operator import check_count, operator_size, probe_vectors

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_GRID_POINTS = 1024
"""Points of the grid :func:`slq_density` evaluates the density on when none is given."""
DEFAULT_RELATIVE_SIGMA = 0.01
"""The default kernel width :math:`\\sigma`, as a fraction of the spread of the Ritz values."""
GRID_MARGIN = 5.0
"""The default grid reaches this many :math:`\\sigma` beyond the extreme Ritz values."""


def slq_quadrature(
    A: Any,
    num_probes: int,
    num_steps: int,
    *,
    distribution: str = "rademacher",
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The Lanczos quadrature nodes and weights of ``num_probes`` random unit probes.

    For each probe :math:`v_p = z_p / \|z_p\|`, :math:`\sum_l \tau_{pl} f(\theta_{pl})
    \approx v_p^\top f(A) v_p`, exact for polynomials :math:`f` of degree :math:`< 2m`;
    :math:`\frac{P}{n} \sum_p \sum_l \tau_{pl} f(\theta_{pl})` estimates
    :math:`\operatorname{tr} f(A)`. The probes run as one batched process: each of the
    :math:`m` steps is one call of ``A @ V`` with ``V`` ``[P, n]``.

    Args:
        A: The symmetric square operator ``[P, P]`` (``A @ V`` and ``A.shape``).
        num_probes: :math:`n \ge 1`.
        num_steps: :math:`m \ge 1` Lanczos steps per probe (at most :math:`P` are taken).
        distribution: ``"rademacher"`` or ``"normal"`` probes.
        reorthogonalize: Full reorthogonalisation (stores ``[m, P, n]``); without it the
            memory is ``[3, P, n]`` but nodes may repeat.
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        ``(nodes, weights)``, each ``[n, m]``; the weights of each probe sum to 1.
    """
    n = check_count("num_probes", num_probes, 1)
    m = min(check_count("num_steps", num_steps, 1), operator_size(A))
    probes = probe_vectors(A, n, distribution, generator)
    process = LanczosProcess(A, probes, reorthogonalize=reorthogonalize, generator=generator)
    for _ in range(m):
        process.step()
    nodes, vectors = torch.linalg.eigh(process.tridiagonal())
    return nodes, vectors[:, 0, :].square()


def slq_density(
    A: Any,
    num_probes: int,
    num_steps: int,
    grid: int | Tensor = DEFAULT_GRID_POINTS,
    sigma: float | None = None,
    *,
    distribution: str = "rademacher",
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The spectral density of a symmetric :math:`A` by stochastic Lanczos quadrature.

    .. math::
        \phi(t) \approx \frac{1}{n} \sum_{p=1}^n \sum_{l=1}^m \tau_{pl}\,
        \frac{1}{\sigma \sqrt{2 \pi}} \exp\Bigl(-\frac{(t - \theta_{pl})^2}{2 \sigma^2}\Bigr),

    with the nodes and weights of :func:`slq_quadrature`. It integrates to 1 (on the default
    grid up to the Gaussian tails beyond :math:`5 \sigma`, below :math:`6 \cdot 10^{-7}`;
    multiply by :math:`P` for a density of eigenvalue counts); its mean is that of the
    quadrature, an unbiased estimate of :math:`\operatorname{tr}(A) / P`, and its :math:`k`-th
    moment that of the quadrature convolved with :math:`\mathcal{N}(0, \sigma^2)` (the second is
    :math:`\operatorname{tr}(A^2) / P + \sigma^2` in expectation, for :math:`m \ge 2`).

    Args:
        A: The symmetric square operator ``[P, P]`` (``A @ V`` and ``A.shape``).
        num_probes: :math:`n \ge 1` random probes.
        num_steps: :math:`m \ge 1` Lanczos steps per probe.
        grid: The points ``[G]`` to evaluate :math:`\phi` at, or their number: that many evenly
            spaced points from :math:`5 \sigma` below the smallest to :math:`5 \sigma` above the
            largest node.
        sigma: The kernel width; if ``None``, 1 % of the spread of the nodes (or of their
            magnitude, when all nodes coincide).
        distribution: ``"rademacher"`` or ``"normal"`` probes.
        reorthogonalize: Full reorthogonalisation (see :func:`slq_quadrature`).
        generator: The random number generator (torch's global one if ``None``).

    Returns:
        ``(grid, density)``, each ``[G]``.
    """
    nodes, weights = slq_quadrature(
        A,
        num_probes,
        num_steps,
        distribution=distribution,
        reorthogonalize=reorthogonalize,
        generator=generator,
    )
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = high - low
        if spread <= 1e3 * torch.finfo(nodes.dtype).eps * max(abs(low), abs(high)):
            spread = max(abs(low), abs(high), 1.0)
        sigma = DEFAULT_RELATIVE_SIGMA * spread
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if isinstance(grid, Tensor):
        if grid.dim() != 1:
            raise ValueError(f"grid must be 1-D [G], got shape {tuple(grid.shape)}")
        points = grid.to(dtype=nodes.dtype, device=nodes.device)
    else:
        count = check_count("grid", grid, 2)
        points = torch.linspace(
            low - GRID_MARGIN * sigma,
            high + GRID_MARGIN * sigma,
            count,
            dtype=nodes.dtype,
            device=nodes.device,
        )
    density = torch.zeros_like(points)
    for probe_nodes, probe_weights in zip(nodes, weights):  # [m] each: memory [G, m], not [G, n m]
        offsets = (points[:, None] - probe_nodes[None, :]) / sigma
        density += torch.exp(-0.5 * offsets.square()) @ probe_weights
    density /= nodes.shape[0] * sigma * math.sqrt(2 * math.pi)
    return points, density


def plot_spectral_density(
    grid: Tensor,
    density: Tensor,
    path: str | Path,
    *,
    log_scale: bool = False,
    title: str | None = None,
) -> Figure:
    r"""Write a PNG of a spectral density (e.g. from :func:`slq_density`) and return its figure.

    The x-axis is labelled "eigenvalue" and the y-axis "spectral density"; with ``log_scale``
    the y-axis is logarithmic and shows the ten decades below the peak (the tails of a
    Gaussian-smoothed density fall to zero). The figure is drawn without ``pyplot``, so no
    window opens and no global state changes.

    Args:
        grid: The points ``[G]``.
        density: The density at them ``[G]``.
        path: Where the PNG goes (parent folders are created).
        log_scale: A logarithmic y-axis.
        title: The title, if any.

    Returns:
        The matplotlib figure (one axes).
    """
    from matplotlib.figure import Figure

    x = grid.detach().cpu().double().numpy()
    y = density.detach().cpu().double().numpy()
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"grid and density must both be [G], got {x.shape} and {y.shape}")
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(x, y, color="tab:blue", linewidth=1.2)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("spectral density")
    if log_scale:
        peak = float(y.max()) if y.size and y.max() > 0 else 1.0
        axes.set_yscale("log")
        axes.set_ylim(peak * 1e-10, peak * 2)
    else:
        axes.set_ylim(bottom=0.0)
    if title is not None:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return figure
