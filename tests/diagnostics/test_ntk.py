"""The empirical NTK against the dense Jacobian product ``J J'^T`` from tests/reference.py."""

import pytest
import torch
from torch import nn

from curvlab.diagnostics import (
    METHODS,
    MODES,
    empirical_ntk,
    ntk_change,
    ntk_method,
    ntk_rate_of_change,
    ntk_similarity,
    ntk_vector_product,
)
from curvlab.nn import RevMLP
from tests.reference import jacobian


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,)


def cnn():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    return conv, (2, 6, 6)


def revmlp():
    return RevMLP(8, 3, hidden=10, depth=2), (8,)


def revmlp_norm_no_bias():
    return RevMLP(8, 3, hidden=6, depth=3, bias=False, norm=True, nonlinearity="tanh"), (8,)


def revmlp_frozen_bias():
    model = RevMLP(8, 3, hidden=10, depth=2)
    model.body.blocks[1].g.proj.bias.requires_grad_(False)
    model.body.blocks[0].f.proj.weight.requires_grad_(False)
    return model, (8,)


PROBLEMS = {
    "mlp": mlp,
    "cnn": cnn,
    "revmlp": revmlp,
    "revmlp-norm-no-bias": revmlp_norm_no_bias,
    "revmlp-frozen": revmlp_frozen_bias,
}
REVERSIBLE = {"revmlp", "revmlp-norm-no-bias", "revmlp-frozen"}


def make(name, n=5, m=4, seed=0):
    torch.manual_seed(seed)
    model, shape = PROBLEMS[name]()
    model = model.double()
    return model, torch.randn(n, *shape, dtype=torch.float64), torch.randn(m, *shape).double()


def dense_ntk(model, x, other=None):
    """``[N, M, C, C]`` from the dense ``[N C, P]`` Jacobians."""
    jac = jacobian(model, x)
    jac_other = jac if other is None else jacobian(model, other)
    n, m = x.shape[0], (x if other is None else other).shape[0]
    c = jac.shape[0] // n
    return (jac @ jac_other.T).reshape(n, c, m, c).permute(0, 2, 1, 3)


def in_mode(full, mode):
    if mode == "full":
        return full
    if mode == "trace":
        return full.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.stack([full[i, i] for i in range(full.shape[0])])


def methods_for(name):
    return [m for m in METHODS if m != "structured" or name in REVERSIBLE]


CASES = [(name, method) for name in PROBLEMS for method in methods_for(name)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "method"), CASES)
def test_ntk_equals_the_dense_jacobian_product(name, method, mode):
    model, x, _ = make(name)
    expected = in_mode(dense_ntk(model, x), mode)
    got = empirical_ntk(model, x, mode=mode, method=method)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.abs().max())


@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize(("name", "method"), CASES)
def test_cross_kernel_equals_the_dense_jacobian_product(name, method, mode):
    model, x, other = make(name)
    expected = in_mode(dense_ntk(model, x, other), mode)
    got = empirical_ntk(model, x, other, mode=mode, method=method)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.abs().max())


def test_ntk_vector_product_equals_the_dense_kernel_times_vectors():
    model, x, _ = make("cnn")
    vectors = torch.randn(3, 5, 4, dtype=torch.float64)
    theta = dense_ntk(model, x).permute(0, 2, 1, 3).reshape(20, 20)
    expected = (vectors.reshape(3, 20) @ theta.T).reshape(3, 5, 4)
    assert torch.allclose(ntk_vector_product(model, x, vectors), expected, rtol=1e-10)


def test_auto_takes_the_structured_form_for_a_revmlp():
    model, x, _ = make("revmlp")
    assert ntk_method(model, x) == "structured"


def test_auto_takes_ntk_vector_products_for_many_outputs_of_a_dense_net():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 50)).double()
    assert ntk_method(model, torch.randn(8, 20, dtype=torch.float64), mode="full") == "ntk-vp"


def test_auto_takes_the_jacobian_for_a_convolution_with_few_outputs():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    assert ntk_method(model.double(), torch.randn(8, 1, 16, 16).double(), mode="full") == "jacobian"


def test_auto_avoids_a_jacobian_above_the_memory_limit():
    model, x, _ = make("cnn")
    assert ntk_method(model, x, max_jacobian_bytes=1000) == "ntk-vp"


def test_structured_rejects_other_models_by_name():
    model, x, _ = make("mlp")
    with pytest.raises(ValueError, match="RevMLP only, got Sequential"):
        empirical_ntk(model, x, method="structured")


def test_diagonal_takes_no_second_inputs():
    model, x, other = make("mlp")
    with pytest.raises(ValueError, match="no `other`"):
        empirical_ntk(model, x, other, mode="diagonal")


def test_ntk_of_a_model_without_trainable_parameters_raises():
    model, x, _ = make("mlp")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(model, x)


def test_similarity_is_the_cosine_of_the_flattened_kernels():
    a, b = torch.randn(3, 3, 2, 2, dtype=torch.float64), torch.randn(3, 3, 2, 2).double()
    cosine = torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1))[0]
    assert torch.allclose(ntk_similarity(a, b), cosine)


def test_similarity_ignores_scale_and_change_does_not():
    a = torch.randn(4, 4, dtype=torch.float64)
    assert torch.allclose(ntk_similarity(a, 3 * a), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(ntk_change(a, 3 * a), torch.tensor(2.0, dtype=torch.float64))


def test_rate_of_change_is_the_relative_change_per_interval():
    a, b = torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 2.0])).double()
    expected = 1 / (2**0.5) / 4  # ||b - a|| / ||a|| over 4 epochs
    assert torch.allclose(ntk_rate_of_change(a, b, interval=4), torch.tensor(expected).double())


def test_kernels_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        ntk_change(torch.ones(2, 2), torch.ones(3, 3))


def test_structured_form_is_not_taken_when_another_parameter_trains():
    model, x, _ = make("revmlp")
    model.register_parameter("extra", nn.Parameter(torch.zeros(1, dtype=torch.float64)))
    with pytest.raises(ValueError, match="but extra is trainable too"):
        empirical_ntk(model, x, method="structured")
    assert ntk_method(model, x) != "structured"
