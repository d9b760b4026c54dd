"""Linear CKA against its definition, and the block tracker on a RevMLP."""

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.diagnostics import RepresentationCKA, first_middle_last, linear_cka
from curvlab.diagnostics.cka import record_representations
from curvlab.nn import RevMLP

ONE = torch.tensor(1.0, dtype=torch.float64)


def representations(n=12, d1=5, d2=7, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, d1, dtype=torch.float64)
    return x, torch.cat([x @ torch.randn(d1, d1).double(), torch.randn(n, d2 - d1).double()], 1)


def hsic_definition(x, y):
    """Biased HSIC: tr(K H L H) / (n - 1)^2, straight from the definition."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return torch.trace(x @ x.T @ h @ y @ y.T @ h) / (n - 1) ** 2


@pytest.mark.parametrize("n", [4, 40])  # the Gram form (N < D) and the feature form (N > D)
def test_cka_equals_the_hsic_definition(n):
    x, y = representations(n=n)
    expected = hsic_definition(x, y) / (hsic_definition(x, x) * hsic_definition(y, y)).sqrt()
    assert torch.allclose(linear_cka(x, y), expected, rtol=1e-12)


def test_cka_of_identical_inputs_is_one():
    x, _ = representations()
    assert torch.allclose(linear_cka(x, x), ONE)


def test_cka_is_invariant_to_orthogonal_transforms():
    x, y = representations()
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    assert torch.allclose(linear_cka(x, y @ q), linear_cka(x, y), rtol=1e-12)


def test_cka_is_invariant_to_isotropic_scaling():
    x, y = representations()
    assert torch.allclose(linear_cka(0.01 * x, 250.0 * y), linear_cka(x, y), rtol=1e-12)


def test_cka_is_not_invariant_to_an_anisotropic_scaling():
    x, y = representations()
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 30.0], dtype=torch.float64)
    assert not torch.allclose(linear_cka(x, y * scale), linear_cka(x, y), rtol=1e-3)


def test_cka_of_a_hand_computed_case():
    # centered x = (-1, 0, 1), y = (0, -1, 1): CKA of 1-d features is corr^2 = (1)^2 / (2 * 2)
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [0.0], [2.0]], dtype=torch.float64)
    assert torch.allclose(linear_cka(x, y), torch.tensor(0.25, dtype=torch.float64))


def test_cka_matches_the_golden_value_of_the_reference_notebook():
    # google-research representation_similarity Demo.ipynb: linear CKA 0.55761
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    assert abs(float(linear_cka(torch.tensor(x), torch.tensor(y))) - 0.55761) < 5e-6


def test_cka_of_a_constant_representation_is_nan():
    x, _ = representations()
    assert torch.isnan(linear_cka(x, torch.ones(12, 3)))


def test_cka_refuses_different_sample_counts():
    with pytest.raises(ValueError, match="x has 3 samples and y has 4"):
        linear_cka(torch.randn(3, 2), torch.randn(4, 2))


def test_first_middle_last_of_a_revmlp():
    model = RevMLP(8, 3, hidden=10, depth=5)
    assert first_middle_last(model) == ["body.blocks.0", "body.blocks.2", "body.blocks.4"]


def test_first_middle_last_of_a_sequential_skips_parameter_free_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert first_middle_last(model) == ["0", "2", "4"]


def test_recorded_block_output_is_the_block_applied_to_its_input():
    torch.manual_seed(0)
    model = RevMLP(8, 3, hidden=10, depth=3).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    recorded = record_representations(model, x, ["body.blocks.0", "body.blocks.1"])
    expected = model.body.blocks[1](recorded["body.blocks.0"])
    assert torch.allclose(recorded["body.blocks.1"], expected)


def test_block_cka_is_one_before_training_and_drops_after_a_large_change():
    torch.manual_seed(0)
    model = RevMLP(8, 3, hidden=10, depth=3).double()
    tracker = RepresentationCKA(model, torch.randn(16, 8, dtype=torch.float64))
    before = tracker()
    with torch.no_grad():
        for p in model.body.blocks[0].parameters():
            p.add_(3 * torch.randn_like(p))
    after = tracker()
    assert all(abs(v - 1) < 1e-12 for v in before.values()) and after["body.blocks.0"] < 0.99


def test_recording_an_unknown_module_names_it():
    model = RevMLP(8, 3, hidden=10, depth=2)
    with pytest.raises(ValueError, match="no module 'body.blocks.7'"):
        record_representations(model, torch.randn(2, 8), ["body.blocks.7"])
