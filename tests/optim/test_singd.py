"""curvlab.optim.SINGD: structures, the inverse-free update against its equations, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlab.backprop import KFLR, KFACEmpirical, compute
from curvlab.data import load_dataset, to_float
from curvlab.optim import SINGD, singd

LOSS = nn.CrossEntropyLoss()
STRUCTURE_NAMES = sorted(singd.STRUCTURES)


def mlp(seed=0, norm=False, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 4)] + ([nn.LayerNorm(4)] if norm else []) + [nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers).to(dtype)


def batch(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def closure_for(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    return closure


def structured(name, dim=9):
    structure = singd.make_structure(name, block_size=4, hierarchical_sizes=(2, 3))
    g = torch.Generator().manual_seed(3)
    return structure, torch.randn(2, dim, dim, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------- structures
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_projection_is_idempotent(name):
    structure, m = structured(name)
    once = structure.project(m)  # exact for the patterns; triu_toeplitz averages (round-off)
    assert torch.allclose(structure.project(once), once, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_structure_is_closed_under_products(name):
    """The update K (I - beta m_K) keeps K's structure: products of structured matrices do."""
    structure, m = structured(name)
    p, q = structure.project(m), structure.project(m.flip(-1))
    product = p @ (torch.eye(9, dtype=m.dtype) - 0.3 * q)
    assert torch.allclose(structure.project(product), product, atol=1e-12)


def test_structures_have_their_patterns():
    _, m = structured("dense")
    dim = m.shape[-1]
    assert torch.equal(singd.Diagonal().project(m), torch.diag_embed(m.diagonal(dim1=-2, dim2=-1)))
    assert torch.equal(singd.LowerTriangular().project(m), m.tril())
    assert torch.equal(singd.UpperTriangular().project(m), m.triu())
    block = singd.BlockDiagonal(4).project(m)
    assert torch.equal(block[:, :4, :4], m[:, :4, :4]) and not block[:, :4, 4:].any()
    toeplitz = singd.TriuToeplitz().project(m)
    assert (
        torch.allclose(toeplitz[:, 1:, 1:], toeplitz[:, :-1, :-1]) and not toeplitz.tril(-1).any()
    )
    assert torch.allclose(toeplitz[:, 0, 0], m.diagonal(dim1=-2, dim2=-1).mean(-1))
    hier = singd.Hierarchical(2, 3).project(m)
    expected = torch.zeros(dim, dim, dtype=torch.bool)
    expected[:2], expected[-3:, 2:] = True, True
    expected |= torch.eye(dim, dtype=torch.bool)
    assert torch.equal(hier != 0, expected.expand_as(hier))


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_optimizer_keeps_the_structure(name):
    model = mlp()
    x, y = batch()
    opt = SINGD(model, lr=0.01, loss_func=LOSS, structure=name, lr_cov=0.1, update_interval=1)
    for _ in range(12):
        opt.step(closure_for(model, opt, x, y))
    for k, c in opt.preconditioner().values():
        for factor, structure in zip((k, c), opt.structures, strict=True):
            dense = factor.to_dense()
            assert type(factor) is type(structure.from_dense(dense))  # stored structured
            assert torch.allclose(structure.project(dense), dense, atol=1e-12)


# -------------------------------------------------------------------------- the update
def test_first_step_equals_the_equations():
    """K = C = I, then one update from the engine's empirical block, then C C^T G K K^T."""
    model, (x, y) = mlp(), batch()
    lr, lr_cov, damping = 0.05, 0.2, 0.01
    quantity = KFACEmpirical(separate_weight_and_bias=False)
    blocks = compute(model, LOSS, x, y, [quantity])[quantity]
    before = copy.deepcopy(model)
    opt = SINGD(
        model, lr=lr, loss_func=LOSS, momentum=0.0, damping=damping, lr_cov=lr_cov, alpha1=0.0
    )
    opt.step(closure_for(model, opt, x, y))
    for i in (0, 2):
        a, b = blocks[f"{i}.weight"].input_factor[0], blocks[f"{i}.weight"].output_factor[0]
        da, db = a.shape[0], b.shape[0]
        eye_a, eye_b = torch.eye(da, dtype=a.dtype), torch.eye(db, dtype=b.dtype)
        k = eye_a - lr_cov * (b.trace() * a + damping * db * eye_a - db * eye_a) / (2 * db)
        c = eye_b - lr_cov * (a.trace() * b + damping * da * eye_b - da * eye_b) / (2 * da)
        w, bias = before[i].weight, before[i].bias
        grad_w, grad_b = torch.autograd.grad(LOSS(before(x), y), (w, bias))
        g = torch.cat([grad_w, grad_b[:, None]], 1)  # [b, a]: joint weight and bias
        step = -lr * (c @ c.T @ g @ k @ k.T)
        assert torch.allclose(model[i].weight - w, step[:, :-1], atol=1e-12)
        assert torch.allclose(model[i].bias - bias, step[:, -1], atol=1e-12)


def _fixed_point(block, damping, iterations, lr_cov=0.5):
    a, b = block.input_factor, block.output_factor
    k = singd.Dense().eye(1, a.shape[-1], a.dtype, a.device)
    c = singd.Dense().eye(1, b.shape[-1], b.dtype, b.device)
    factors, momenta = (k, c), (k.zeros_like(), c.zeros_like())
    for _ in range(iterations):
        factors, momenta = singd.inverse_free_update(factors, momenta, (a, b), damping, 0.0, lr_cov)
    return factors


def _mse_block():
    """The exact-GGN (KFLR) block of the first layer on a fixed regression batch."""
    model, (x, _) = mlp(), batch(n=128)
    y = torch.randn(128, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    quantity = KFLR(separate_weight_and_bias=False)
    results = compute(model, nn.MSELoss(), x, y, [quantity])
    grads = [results.grad["0.weight"], results.grad["0.bias"]]
    return results[quantity]["0.weight"], grads


def test_fixed_point_is_the_damped_kfac_inverse():
    r"""At convergence, (K K^T)^{-1} = tr(B C C^T)/b A + lambda tr(C C^T)/b I (and for C)."""
    block, _ = _mse_block()
    damping = 0.05
    k, c = (f.to_dense() for f in _fixed_point(block, damping, 1000))
    a, b = block.input_factor[0], block.output_factor[0]
    kk, cc = k[0] @ k[0].T, c[0] @ c[0].T
    da, db = a.shape[0], b.shape[0]
    sk = (b @ cc).trace() / db * a + damping * cc.trace() / db * torch.eye(da, dtype=a.dtype)
    sc = (a @ kk).trace() / da * b + damping * kk.trace() / da * torch.eye(db, dtype=b.dtype)
    assert torch.allclose(torch.linalg.inv(kk), sk, rtol=1e-8, atol=1e-10)
    assert torch.allclose(torch.linalg.inv(cc), sc, rtol=1e-8, atol=1e-10)


def test_small_damping_approaches_the_kfac_direction():
    """With a small damping the SINGD direction C C^T G K K^T is KFAC's (A ⊗ B + λ I)^{-1} g."""
    block, grads = _mse_block()
    damping = 1e-6
    k, c = _fixed_point(block, damping, 1000)
    ours = block.layout.from_matrix(singd.precondition(k, c, block.layout.to_matrix(grads, 0)), 0)
    ours = torch.cat([t.reshape(-1) for t in ours])
    dense = block.dense()
    flat = torch.cat([g.reshape(-1) for g in grads])
    kfac = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=dense.dtype), flat)
    assert torch.allclose(ours, kfac, rtol=1e-3, atol=1e-4 * float(kfac.abs().max()))


# ----------------------------------------------------------------------- state and dtypes
def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = batch(seed=seed, n=16)
    for _ in range(steps):
        noise = 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        opt.step(closure_for(model, opt, x + noise, y))


@pytest.mark.parametrize("structure", [*STRUCTURE_NAMES, ("triu_toeplitz", "hierarchical")])
def test_state_dict_round_trip_is_bit_identical(structure):
    def make():
        model = mlp(norm=True)
        kwargs = dict(lr=0.05, loss_func=LOSS, momentum=0.5, weight_decay=1e-3, update_interval=2)
        return model, SINGD(model, structure=structure, lr_cov=0.1, seed=4, **kwargs)

    model, opt = make()
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 4, seed=2)
    resumed, resumed_opt = make()
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, 4, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


IMAGES, LABELS = load_dataset("bundled", "train")
X = to_float(IMAGES).flatten(1)


def _fashion(structure="dense", dtype=torch.float32, steps=30, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    options = dict(lr=0.003, lr_cov=0.1, update_interval=1) | kwargs
    opt = SINGD(model, loss_func=LOSS, structure=structure, **options)
    g, losses = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        index = torch.randint(0, len(X), (128,), generator=g)
        xb, yb = X[index].to(dtype), LABELS[index]
        losses.append(float(opt.step(closure_for(model, opt, xb, yb)).detach()))
    with torch.no_grad():
        final = float(LOSS(model(X.to(dtype)).float(), LABELS))
    return losses, final


def test_trains_on_bundled_fashion_mnist():
    losses, final = _fashion(steps=40)
    assert final < 0.25 * losses[0]  # measured: 2.32 -> 0.35


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_bfloat16_tracks_float32(structure):
    losses32, final32 = _fashion(structure)
    losses16, final16 = _fashion(structure, dtype=torch.bfloat16)
    curve32, curve16 = torch.tensor(losses32), torch.tensor(losses16)
    assert torch.isfinite(curve16).all()
    assert ((curve16 - curve32).abs() / curve32).max() < 0.05  # measured: 0.011
    assert abs(final16 - final32) < 0.05 * final32


def test_fallback_moves_the_other_parameters():
    model, (x, y) = mlp(norm=True), batch()
    opt = SINGD(model, lr=0.01, loss_func=LOSS, fallback="sgd", momentum=0.0)
    before = model[1].weight.detach().clone()
    opt.step(closure_for(model, opt, x, y))
    assert opt.fallback_names == ["1.weight", "1.bias"]
    assert torch.allclose(model[1].weight, before - 0.01 * model[1].weight.grad)


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"damping": -1.0}, "damping"),
        ({"lr": -0.1}, "lr"),
        ({"lr_cov": 0.0}, "lr_cov"),
        ({"alpha1": 1.0}, "alpha1"),
        ({"momentum": 1.5}, "momentum"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"update_interval": 0}, "update_interval"),
        ({"structure": "banded"}, "banded"),
        ({"structure": "block_diagonal", "block_size": 0}, "block_size"),
        ({"structure": "hierarchical", "hierarchical_sizes": (-1, 2)}, "k1"),
        ({"fallback": "lbfgs"}, "fallback"),
        ({"fisher_type": "exact"}, "fisher_type"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        SINGD(mlp(), loss_func=LOSS, **kwargs)


def test_step_needs_the_closure():
    model = mlp()
    with pytest.raises(TypeError, match="closure"):
        SINGD(model, loss_func=LOSS).step(None)


def test_dense_factors_of_an_old_state_dict_are_refused():
    model, (x, y) = mlp(), batch()
    opt = SINGD(model, loss_func=LOSS, update_interval=1)
    opt.step(closure_for(model, opt, x, y))
    saved = opt.state_dict()
    for state in saved["state"].values():
        if "K" in state:
            state["K"] = state["K"][0]  # one dense tensor, as before the structured storage
    with pytest.raises(ValueError, match="dense tensor"):
        SINGD(mlp(), loss_func=LOSS).load_state_dict(saved)
