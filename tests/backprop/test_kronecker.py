"""KFLR / KFAC factors against definitions built from dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvlab.backprop import KFAC, KFLR, KFRA, compute
from tests import reference
from tests.backprop.problems import LOSSES, PROBLEMS, build, make_targets

SEQUENTIAL = ["mlp", "mlp-activations", "cnn2d", "cnn3d"]


def _layers(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))]


def _input_factor(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A = mean over samples and positions of u u^T, u read off the weight Jacobian."""
    weight = layer.weight.detach()

    def out(w):
        return functional_call(layer, {"weight": w}, (x,))

    jac = jacrev(out)(weight)  # [N, O, *T, O, *w_in]
    n, o = jac.shape[:2]
    jac = jac.reshape(n, o, -1, o, weight[0].numel())
    patches = jac[:, 0, :, 0, :].reshape(-1, weight[0].numel())  # [N*T, in*K]
    return patches.T @ patches / patches.shape[0]


def _output_factor(model: nn.Sequential, k: int, loss_func, x, y) -> torch.Tensor:
    """B = sum over samples and positions of the diagonal blocks of the GGN w.r.t. z_k."""
    z = model[: k + 1](x).detach()
    g = reference.ggn_wrt_intermediate(model[k + 1 :], loss_func, z, y)
    n, o = z.shape[:2]
    t = z[0, 0].numel()
    g = g.reshape(n, o, t, n, o, t)
    return torch.einsum("natnbt->ab", g)


def _case(problem: str, loss: str):
    return build(next(p for p in PROBLEMS if p.name == problem), loss)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("problem", SEQUENTIAL)
def test_kflr_output_factor(problem, loss):
    model, loss_func, x, y = _case(problem, loss)
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    actual = torch.cat([ours[f"{k}.weight"][1].flatten() for k in _layers(model)])
    expected = torch.cat(
        [_output_factor(model, k, loss_func, x, y).flatten() for k in _layers(model)]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("problem", SEQUENTIAL)
def test_kflr_input_factor(problem):
    model, loss_func, x, y = _case(problem, "ce-mean")
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    actual = torch.cat([ours[f"{k}.weight"][0].flatten() for k in _layers(model)])
    expected = torch.cat(
        [_input_factor(model[k], model[:k](x).detach()).flatten() for k in _layers(model)]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_kflr_bias_factor_is_output_factor(loss):
    model, loss_func, x, y = _case("mlp", loss)
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    assert all(torch.equal(ours[f"{k}.bias"][0], ours[f"{k}.weight"][1]) for k in (0, 2))


@pytest.mark.parametrize("loss", list(LOSSES))
def test_kflr_is_exact_ggn_block_for_one_sample(loss):
    """Kronecker order: for N = 1, torch.kron(B, A) is the weight's GGN block (row-major)."""
    model, loss_func, x, y = _case("mlp", loss)
    x, y = x[:1], y[:1]
    ours = compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    ggn = reference.ggn(model, loss_func, x, y)
    a, b = ours["2.weight"]
    start = sum(p.numel() for p in list(model.parameters())[:2])
    block = ggn[start : start + 12, start : start + 12]
    torch.testing.assert_close(torch.kron(b, a), block, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_kfac_converges_to_kflr(loss):
    model, loss_func, x, y = _case("mlp", loss)
    torch.manual_seed(1)
    results = compute(model, loss_func, x, y, [KFLR(), KFAC(mc_samples=20_000)])
    mc = torch.cat([results["KFACMC20000"][k][-1].flatten() for k in ("0.weight", "2.weight")])
    exact = torch.cat([results["KFLR"][k][-1].flatten() for k in ("0.weight", "2.weight")])
    assert (mc - exact).norm() / exact.norm() < 0.05


def _sigmoid_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def _mlp_data(loss: str, n: int):
    torch.manual_seed(4)
    model = _sigmoid_mlp()
    loss_func = LOSSES[loss]()
    x = torch.randn(n, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = make_targets(loss_func, out)
    return model, loss_func, x, y


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "ce-smooth", "bce-mean"])
def test_kfra_matches_batch_averaged_recursion(loss):
    model, loss_func, x, y = _mlp_data(loss, 5)
    ours = compute(model, loss_func, x, y, [KFRA()])["KFRA"]
    expected = reference.kfra_output_factors(model, loss_func, x, y)
    actual = torch.cat([ours[f"{k}.weight"][1].flatten() for k in sorted(expected)])
    dense = torch.cat([expected[k].flatten() for k in sorted(expected)])
    torch.testing.assert_close(actual, dense, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse-sum", "ce-mean"])
def test_kfra_equals_kflr_for_one_sample(loss):
    """With N = 1 the batch averages are exact, so KFRA and KFLR agree on every layer."""
    model, loss_func, x, y = _mlp_data(loss, 1)
    results = compute(model, loss_func, x, y, [KFRA(), KFLR()])
    kfra = torch.cat([t.flatten() for v in results["KFRA"].values() for t in v])
    kflr = torch.cat([t.flatten() for v in results["KFLR"].values() for t in v])
    torch.testing.assert_close(kfra, kflr, rtol=1e-8, atol=1e-12)


def test_kfra_keys_follow_named_parameters():
    model, loss_func, x, y = _mlp_data("ce-mean", 3)
    ours = compute(model, loss_func, x, y, [KFRA()])["KFRA"]
    assert list(ours) == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum"])
def test_embedding_kronecker_order(loss):
    """One sample, one token: torch.kron(A, B) is the embedding's GGN block (row-major [V, D])."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(4, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.tensor([[2]])
    loss_func = LOSSES[loss]()
    y = torch.tensor([1]) if "ce" in loss else torch.randn(1, 2, dtype=torch.float64)
    a, b = compute(model, loss_func, x, y, [KFLR()])["KFLR"]["0.weight"]
    block = reference.ggn(model, loss_func, x, y)[:12, :12]
    torch.testing.assert_close(torch.kron(a, b), block, rtol=1e-8, atol=1e-12)
