"""The figure of docs/linops.md: the curvature spectrum of a small CNN trained on the bundled data.

Trains the CNN of the docs example on the bundled Fashion-MNIST subset (2,048 images) for a few
epochs of SGD, then on 512 training images computes the GGN's and the Hessian's top-10 eigenvalues
(Lanczos on ``curvlab.linops.GGN`` / ``Hessian``; the GGN's also by ``curvlab.vivit.ggn_eigh``) and
the Hessian's and GGN's spectral densities by stochastic Lanczos quadrature, and writes
docs/figures/linops_spectral_density.png (log scale) and prints the eigenvalues.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/linops_spectrum_example.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from curvlab.data import load_dataset, to_float
from curvlab.linalg import lanczos_eigs, plot_spectral_density, slq_density
from curvlab.linops import GGN, Hessian
from curvlab.vivit import ggn_eigh

ROOT = Path(__file__).resolve().parent.parent


def small_cnn() -> nn.Module:
    """Two strided convolutions and a linear head (5,386 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=512, help="images behind the curvature")
    parser.add_argument(
        "--out", default=str(ROOT / "docs" / "figures" / "linops_spectral_density.png")
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = load_dataset("bundled", "train")
    x, y = to_float(images), labels
    model, loss_func = small_cnn(), nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for batch in order.split(64):
            optimizer.zero_grad()
            loss = loss_func(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean()
        print(f"epoch {epoch + 1}: last loss {loss.item():.3f}, train accuracy {accuracy:.3f}")

    data = list(zip(x[: args.samples].split(128), y[: args.samples].split(128), strict=True))
    ggn, hessian = GGN(model, loss_func, None, data), Hessian(model, loss_func, None, data)
    top_ggn, _ = lanczos_eigs(ggn, 10, generator=torch.Generator().manual_seed(1))
    top_hessian, _ = lanczos_eigs(hessian, 10, generator=torch.Generator().manual_seed(1))
    vivit, _ = ggn_eigh(model, loss_func, x[: args.samples], y[: args.samples], k=10)
    print("GGN top-10 (Lanczos):", [round(v, 4) for v in top_ggn.tolist()])
    print("GGN top-10 (ViViT):  ", [round(v, 4) for v in vivit.tolist()])
    print("Hessian top-10:      ", [round(v, 4) for v in top_hessian.tolist()])

    densities = {
        name: slq_density(operator, 8, 80, generator=torch.Generator().manual_seed(2))
        for name, operator in (("Hessian", hessian), ("GGN", ggn))
    }
    title = (
        f"small CNN after {args.epochs} epochs on bundled Fashion-MNIST "
        f"({args.samples} samples, P = {ggn.shape[0]})"
    )
    figure = plot_spectral_density(*densities["Hessian"], args.out, log_scale=True, title=title)
    axes = figure.axes[0]
    axes.lines[0].set_label("Hessian")
    axes.plot(
        *(t.numpy() for t in densities["GGN"]), label="GGN", color="tab:orange", linewidth=1.2
    )
    axes.title.set_fontsize(9)
    axes.legend()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
