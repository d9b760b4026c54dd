"""curvlab.optim.hooks: the public statistics and inverse hooks of KFAC, SINGD, AdaHesScale."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from curvlab.backprop import KronFactors
from curvlab.optim import KFAC, SINGD, AdaHesScale
from curvlab.optim.parts import KronInverse

LOSS = nn.CrossEntropyLoss()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def train(make, steps=3, hook=None, inverse_hook=None):
    model = mlp()
    opt = make(model)
    seen = []

    def recording(optimizer, statistics):
        seen.append(statistics)
        return None if hook is None else hook(optimizer, statistics)

    handle = opt.register_statistics_hook(recording)
    if inverse_hook is not None:
        opt.register_inverse_hook(inverse_hook)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = LOSS(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return model, opt, seen, handle


def kfac(model):
    return KFAC(model, lr=0.1, loss_func=LOSS, fisher_type="type-2", factor_update_interval=2)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_statistics_hook_sees_every_factor_update_and_none_changes_nothing():
    model, _, seen, _ = train(kfac)
    plain, _, _, _ = train(kfac, hook=lambda opt, s: None)
    assert len(seen) == 2  # steps 0 and 2
    assert all(isinstance(b, KronFactors) for b in seen[0].values())
    assert set(seen[0]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.equal(flat(model), flat(plain))


def test_statistics_hook_replaces_the_blocks_before_the_average():
    def doubled(opt, blocks):
        return {
            k: dataclasses.replace(b, output_factor=2 * b.output_factor) for k, b in blocks.items()
        }

    _, opt, seen, _ = train(kfac, steps=1, hook=doubled)
    fresh = seen[0]["0.weight"]
    torch.testing.assert_close(opt.blocks()["0.weight"].output_factor, 2 * fresh.output_factor)


def test_removed_hook_is_not_called():
    model = mlp()
    opt = kfac(model)
    calls = []
    opt.register_statistics_hook(lambda o, s: calls.append(1)).remove()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))

    def closure():
        opt.zero_grad()
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert calls == []


def test_inverse_hook_takes_over_the_decompositions():
    calls = []

    def own(opt, blocks):  # KFAC's own decompositions, computed here
        calls.append(sorted(blocks))
        return {
            k: KronInverse.from_factors(b.input_factor, b.output_factor) for k, b in blocks.items()
        }

    def make(model):
        return KFAC(model, lr=0.1, loss_func=LOSS, fisher_type="type-2", inverse_update_interval=2)

    model, opt, _, _ = train(make, inverse_hook=own)
    reference, _, _, _ = train(make)
    assert calls == [["0.weight", "2.weight"]] * 2  # steps 0 and 2; one name per joint block
    assert list(opt.inverse_blocks()) == ["0.weight", "2.weight"]
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)


def test_singd_and_adahesscale_hooks_see_their_statistics():
    _, _, seen, _ = train(lambda m: SINGD(m, lr=0.1, loss_func=LOSS, update_interval=2))
    assert len(seen) == 2 and all(isinstance(b, KronFactors) for b in seen[0].values())
    _, _, seen, _ = train(lambda m: AdaHesScale(m, loss_func=LOSS))
    assert len(seen) == 3 and seen[0]["0.weight"].shape == (4, 5)
