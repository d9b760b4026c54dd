"""ExactGN's safeguards: bad batches are named, diverged steps are undone and explained."""

import math

import pytest
import torch

from curvlab.nn import RevMLP
from curvlab.optim import DivergedStepError, ExactGN, NoExactRightInverseError

K = 4


def make_problem(n=16, d=12, h=40, depth=3, seed=0):
    torch.manual_seed(seed)
    model = RevMLP(d, K, h, depth).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, K, (n,))
    return model, x, y


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def unchanged(model, before):
    return all(torch.equal(before[name], p) for name, p in model.named_parameters())


# ---------------------------------------------------------------------------- bad batches
def with_value(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


BAD_BATCHES = {
    "targets too short": (
        lambda x, y: (x, y[:10]),
        ValueError,
        r"one entry per input sample \(16\)",
    ),
    "label too large": (
        lambda x, y: (x, with_value(y, 5, K)),
        ValueError,
        r"sample 5 with label 4",
    ),
    "negative label": (
        lambda x, y: (x, with_value(y, 2, -1)),
        ValueError,
        r"sample 2 with label -1",
    ),
    "NaN input": (
        lambda x, y: (with_value(x, (7, 3), math.nan), y),
        ValueError,
        r"inputs hold NaN in 1 of 16 samples; the first is sample 7 \(entry 3 = nan\)",
    ),
    "Inf input": (
        lambda x, y: (with_value(x, (9, 0), math.inf), y),
        ValueError,
        r"inputs hold Inf in 1 of 16 samples; the first is sample 9",
    ),
    "NaN target": (
        lambda x, y: (x, with_value(torch.nn.functional.one_hot(y, K).double(), (4, 1), math.nan)),
        ValueError,
        r"targets hold NaN in 1 of 16 samples; the first is sample 4",
    ),
    "probabilities off": (
        lambda x, y: (x, with_value(torch.full((16, K), 0.25, dtype=torch.float64), 3, 0.5)),
        ValueError,
        r"class probabilities .* the first is sample 3",
    ),
    "float targets [N]": (
        lambda x, y: (x, y.double()),
        ValueError,
        r"floating targets must be \[N, k\]",
    ),
    "wrong feature count": (lambda x, y: (x[:, :10], y), ValueError, r"12 features per sample"),
    "single sample": (lambda x, y: (x[0], y[:1]), ValueError, r"batch axis"),
    "empty batch": (lambda x, y: (x[:0], y[:0]), ValueError, r"inputs hold no samples"),
    "uint8 inputs": (lambda x, y: (x.to(torch.uint8), y), TypeError, r"to_float"),
    "float32 inputs": (lambda x, y: (x.float(), y), TypeError, r"inputs are torch.float32"),
    "bool targets": (lambda x, y: (x, y > 1), TypeError, r"targets must be integer class labels"),
}


@pytest.mark.parametrize("case", BAD_BATCHES, ids=list(BAD_BATCHES))
@pytest.mark.parametrize("method", ["step", "directions"])
def test_bad_batch_is_named_before_anything_changes(case, method):
    make_bad, error, message = BAD_BATCHES[case]
    model, x, y = make_problem()
    before = parameters(model)
    optimizer = ExactGN(model, lr=0.1, loss="ce")
    with pytest.raises(error, match=f"ExactGN.{method}: .*{message}"):
        getattr(optimizer, method)(*make_bad(x, y))
    assert unchanged(model, before)


# ---------------------------------------------------------------------------- diverged steps
def test_a_diverging_step_is_undone_and_names_its_causes():
    model, x, y = make_problem()
    before = parameters(model)
    optimizer = ExactGN(model, lr=0.5, loss="ce", output_damping=0.0)  # the undamped Newton step
    with pytest.raises(DivergedStepError) as caught:
        optimizer.step(x, y)
    message = str(caught.value)
    assert unchanged(model, before)
    assert all(word in message for word in ("lr=0.5", "output_damping", "identity_hessian"))
    assert caught.value.loss_after > 100 * caught.value.loss_before


def test_non_finite_parameters_are_undone():
    model, x, y = make_problem()
    before = parameters(model)
    with pytest.raises(DivergedStepError, match="made the parameters non-finite"):
        ExactGN(model, lr=math.inf).step(x, y)  # every moved entry overflows, on any CPU
    assert unchanged(model, before)


def test_after_an_undone_step_the_next_step_works():
    """No misleading NoExactRightInverseError after a blow-up: the model is as it was."""
    model, x, y = make_problem()
    with pytest.raises(DivergedStepError):
        ExactGN(model, lr=0.5, loss="ce", output_damping=0.0).step(x, y)
    optimizer = ExactGN(model, lr=0.5, loss="ce")
    before = optimizer.step(x, y)
    assert optimizer.last_info.loss_after < before


def test_broken_parameters_are_named_instead_of_a_rank_error():
    model, x, y = make_problem()
    with torch.no_grad():
        model.body.blocks[1].g.proj.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match=r"body\.blocks\.1\.g\.proj\.weight hold NaN"):
        ExactGN(model, lr=0.1).step(x, y)


def test_loss_after_is_the_loss_of_the_updated_model():
    model, x, y = make_problem()
    optimizer = ExactGN(model, lr=0.3, loss="ce")
    optimizer.step(x, y)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert optimizer.last_info.loss_after == pytest.approx(expected, rel=1e-12)


def test_check_off_applies_the_step_and_skips_the_forward_pass():
    model, x, y = make_problem()
    optimizer = ExactGN(model, lr=0.5, loss="ce", output_damping=0.0, max_loss_ratio=None)
    optimizer.step(x, y)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert optimizer.last_info.loss_after is None and after > 100 * optimizer.last_info.loss_before


def test_default_cross_entropy_step_trains_where_the_newton_step_diverges():
    model, x, y = make_problem()
    optimizer = ExactGN(model, lr=0.5, loss="ce")
    losses = [optimizer.step(x, y) for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0]


def test_a_wide_enough_network_without_a_full_rank_block_is_not_told_to_widen():
    """Repeated samples make the features rank-deficient at any width: say so, not 'hidden >= N'."""
    model, x, y = make_problem()
    x = torch.cat([x[:8], x[:8]])
    with pytest.raises(NoExactRightInverseError, match="repeat samples") as caught:
        ExactGN(model, lr=0.1).step(x, y)
    assert "needs hidden >= N" not in str(caught.value)
