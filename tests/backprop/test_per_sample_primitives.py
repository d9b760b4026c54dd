"""The engine's per-sample primitives against per-sample gradients computed by a loop.

``ParamDerivatives.dot`` (dot products with vectors through the rules' ``jvp``),
``ParamDerivatives.sample`` (chosen elements, ``Rule.sample_jac_t``), ``ParamDerivatives.gram``
and ``ParamDerivatives.factored``, in float64, for ``Linear`` with and without positions and for
convolutions with stride, padding (zeros and reflect), dilation and groups.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from curvlab.backprop import GRAD, Quantity, compute
from tests import reference


class Probe(Quantity):
    """A quantity that returns ``read(view)`` for every parameter."""

    def __init__(self, read: Callable) -> None:
        self.read = read

    def sources(self) -> tuple:
        return (GRAD,)

    def evaluate(self, view, ctx):
        return self.read(view)


N = 5


def problems() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    conv2d = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 3, (2, 3), padding=1, dilation=(2, 1), padding_mode="reflect"),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    conv1d = nn.Sequential(nn.Conv1d(3, 2, 3, stride=2, padding=2), nn.Flatten(), nn.LazyLinear(3))
    positions = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    out = {
        "conv2d": (conv2d, torch.randn(N, 2, 7, 6)),
        "conv1d": (conv1d, torch.randn(N, 3, 9)),
        "linear-positions": (positions, torch.randn(N, 2, 4)),
        "mlp": (mlp, torch.randn(N, 4)),
    }
    for model, x in out.values():
        model(x)  # materialise the lazy layers
        model.double()
    return {k: (m, x.double()) for k, (m, x) in out.items()}


PROBLEMS = problems()


def setup(name: str):
    model, x = PROBLEMS[name]
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(1))
    loss_func = nn.CrossEntropyLoss()
    grads = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    params = dict(model.named_parameters())
    split, start = {}, 0
    for key, p in params.items():
        split[key] = grads[:, start : start + p.numel()]
        start += p.numel()
    return model, loss_func, x, y, params, split


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_dot_is_per_sample_gradient_times_vectors(name):
    model, loss_func, x, y, params, per_sample = setup(name)
    gen = torch.Generator().manual_seed(2)
    vectors = {k: torch.randn(2, *p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    probe = Probe(lambda view: view.dot(GRAD, vectors[view.name]))
    results = compute(model, loss_func, x, y, [probe])["Probe"]
    for key, value in results.items():
        want = per_sample[key] @ vectors[key].flatten(start_dim=1).T  # [N, 2]
        torch.testing.assert_close(value[0], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_sample_picks_the_per_sample_gradient_elements(name):
    model, loss_func, x, y, params, per_sample = setup(name)
    gen = torch.Generator().manual_seed(3)
    picks = {
        k: (
            torch.randint(0, N, (40,), generator=gen),
            torch.randint(0, p.numel(), (40,), generator=gen),
        )
        for k, p in params.items()
    }
    probe = Probe(lambda view: view.sample(GRAD, *picks[view.name]))
    results = compute(model, loss_func, x, y, [probe])["Probe"]
    for key, value in results.items():
        samples, elements = picks[key]
        torch.testing.assert_close(
            value[0], per_sample[key][samples, elements], rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_gram_is_the_per_sample_gradients_gram(name):
    model, loss_func, x, y, _, per_sample = setup(name)
    results = compute(model, loss_func, x, y, [Probe(lambda view: view.gram(GRAD))])["Probe"]
    for key, value in results.items():
        want = per_sample[key] @ per_sample[key].T
        torch.testing.assert_close(value[0, :, 0], want, rtol=1e-10, atol=1e-12)


def test_factored_only_for_linear_layers_without_positions():
    factored = {}
    for name in PROBLEMS:
        model, loss_func, x, y, *_ = setup(name)
        results = compute(model, loss_func, x, y, [Probe(lambda view: view.factored())])["Probe"]
        factored[name] = {k: v for k, v in results.items() if k.endswith("weight")}
    assert all(factored["mlp"].values())
    assert factored["linear-positions"] == {"0.weight": False, "3.weight": True}
    assert not any(factored["conv2d"][k] for k in ("0.weight", "2.weight"))


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_sample_block_is_a_sub_block_of_each_chosen_sample(name):
    model, loss_func, x, y, params, per_sample = setup(name)
    gen = torch.Generator().manual_seed(4)
    picks = {}
    for key, p in params.items():
        first, rest = p.shape[0], p.numel() // p.shape[0]
        samples = torch.randint(0, N, (3,), generator=gen)
        rows = torch.randint(0, first, (3, 2), generator=gen)
        picks[key] = (samples, rows, torch.randint(0, rest, (3, 4), generator=gen))
    probe = Probe(lambda view: view.sample_block(GRAD, *picks[view.name]))
    results = compute(model, loss_func, x, y, [probe])["Probe"]
    for key, value in results.items():
        samples, rows, columns = picks[key]
        matrix = per_sample[key].reshape(N, params[key].shape[0], -1)
        want = torch.stack(
            [matrix[n][rows[s]][:, columns[s]] for s, n in enumerate(samples.tolist())]
        )
        torch.testing.assert_close(value[0], want, rtol=1e-10, atol=1e-12)


def test_sample_block_of_a_grouped_convolution():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 9, 3)).double()
    x = torch.randn(N, 4, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    loss_func = nn.CrossEntropyLoss()
    grads = reference.per_sample_gradients(model, loss_func, x, y)[:, : 6 * 2 * 9]
    samples, rows, columns = torch.tensor([0, 3]), torch.tensor([[1, 5], [4, 0]]), torch.arange(18)
    columns = columns.expand(2, 18)
    probe = Probe(
        lambda view: (
            view.sample_block(GRAD, samples, rows, columns) if view.name == "0.weight" else 0
        )
    )
    value = compute(model, loss_func, x, y, [probe])["Probe"]["0.weight"]
    matrix = grads.reshape(N, 6, 18)
    want = torch.stack([matrix[n][rows[s]] for s, n in enumerate(samples.tolist())])
    torch.testing.assert_close(value[0], want, rtol=1e-10, atol=1e-12)


def test_positions_count_the_outputs_a_weight_is_shared_over():
    want = {"conv2d": 4 * 3, "conv1d": (9 + 4 - 3) // 2 + 1, "linear-positions": 2, "mlp": 1}
    got = {}
    for name in PROBLEMS:
        model, loss_func, x, y, *_ = setup(name)
        results = compute(model, loss_func, x, y, [Probe(lambda view: view.positions(GRAD))])
        got[name] = results["Probe"]["0.weight"]
    assert got == want


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_cross_gram_between_two_passes(name):
    model, loss_func, x, y, params, per_sample = setup(name)
    x_other = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(6))
    y_other = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(7))
    other = reference.per_sample_gradients(model, loss_func, x_other, y_other)
    keep = Probe(lambda view: view)
    mine = compute(model, loss_func, x, y, [keep])["Probe"]
    theirs = compute(model, loss_func, x_other, y_other, [keep])["Probe"]
    start = 0
    for key, p in params.items():
        want = per_sample[key] @ other[:, start : start + p.numel()].T
        start += p.numel()
        got = mine[key].cross_gram(GRAD, theirs[key])[0, :, 0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
