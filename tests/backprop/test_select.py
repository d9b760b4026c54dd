"""``ParamDerivatives.select``: a view restricted to chosen samples, against per-sample gradients.

Every primitive of the selected view equals the full view's per-sample values at the chosen
samples (float64, per-sample gradients by a loop), in ``compute`` and inside the user's backward
(``capture``); weight and bias of one module share the selection.
"""

from __future__ import annotations

import pytest
import torch

from curvlab.backprop import GRAD, capture, compute
from curvlab.backprop.derivatives import Owner, ParamDerivatives
from curvlab.backprop.rules.base import Call
from tests.backprop.test_per_sample_primitives import PROBLEMS, N, Probe, setup

INDEX = torch.tensor([3, 0, 4])


def _read(view):
    sub = view.select(INDEX)
    vector = torch.ones(1, *view.shape, dtype=view.param.dtype)
    return {
        "n": sub.num_samples,
        "jac_t": sub.jac_t(GRAD)[0].flatten(start_dim=1),
        "sq_norm": sub.sq_norm(GRAD)[0],
        "sum_sq": sub.sum_sq(GRAD, per_sample=False),
        "dot": sub.dot(GRAD, vector)[0, :, 0],
        "gram": sub.gram(GRAD)[0, :, 0],
        "cross_gram": sub.cross_gram(GRAD, view)[0, :, 0],
    }


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_selected_view_is_the_per_sample_gradients_at_the_index(name, streamed):
    model, loss_func, x, y, params, per_sample = setup(name)
    if streamed:
        with capture(model, loss_func, [Probe(_read)]) as block:
            loss_func(model(x), y).backward()
        results = block.results["Probe"]
    else:
        results = compute(model, loss_func, x, y, [Probe(_read)])["Probe"]
    for key, value in results.items():
        g = per_sample[key]  # [N, p]
        chosen = g[INDEX]
        assert value["n"] == INDEX.numel()
        close = {"rtol": 1e-10, "atol": 1e-12}
        torch.testing.assert_close(value["jac_t"], chosen, **close)
        torch.testing.assert_close(value["sq_norm"], chosen.square().sum(1), **close)
        torch.testing.assert_close(value["sum_sq"].flatten(), chosen.square().sum(0), **close)
        torch.testing.assert_close(value["dot"], chosen.sum(1), **close)
        torch.testing.assert_close(value["gram"], chosen @ chosen.T, **close)
        torch.testing.assert_close(value["cross_gram"], chosen @ g.T, **close)
        assert g.shape[0] == N


def test_select_refuses_a_recurrent_layer():
    rnn = torch.nn.RNN(3, 4)  # its output sequence is [T, N, H]: the batch in dim 1
    call = Call(args=(torch.zeros(5, 2, 3),), outputs=(torch.zeros(5, 2, 4),))
    owner = Owner("rnn", rnn, [call])
    weight = rnn.weight_ih_l0
    view = ParamDerivatives(
        "rnn.weight_ih_l0", [(owner, "weight_ih_l0")], {GRAD: {}}, weight, 2, {}
    )
    assert not view.selectable()
    with pytest.raises(ValueError, match="rnn.weight_ih_l0"):
        view.select(torch.tensor([0]))
