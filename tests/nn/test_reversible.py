import pytest
import torch

from curvlab.nn import RevMLP


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("inverted_bottleneck", [True, False])
def test_body_inverse_round_trip(depth, norm, inverted_bottleneck):
    torch.manual_seed(0)
    model = RevMLP(16, 4, 24, depth, norm=norm, inverted_bottleneck=inverted_bottleneck).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    assert torch.allclose(model.body.inverse(model.body(x)), x, atol=1e-12, rtol=0)


def test_expansion_is_fixed_and_projection_orthonormal():
    model = RevMLP(16, 4, 24, 2)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        f"body.blocks.{b}.{br}.proj.{w}"
        for b in range(2)
        for br in "fg"
        for w in ("weight", "bias")
    }
    u = model.projection
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-5)


def test_first_block_is_linear_and_others_use_the_nonlinearity():
    model = RevMLP(8, 2, 12, 2, nonlinearity="tanh")
    assert isinstance(model.body.blocks[0].f.activation, torch.nn.Identity)
    assert isinstance(model.body.blocks[1].g.activation, torch.nn.Tanh)


def test_no_bottleneck_has_square_projection():
    model = RevMLP(8, 2, 12, 2, inverted_bottleneck=False)
    assert model.body.blocks[1].f.proj.weight.shape == (4, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 7, "num_classes": 2, "hidden": 4, "depth": 1}, "even"),
        ({"in_features": 8, "num_classes": 9, "hidden": 4, "depth": 1}, "num_classes"),
        ({"in_features": 8, "num_classes": 2, "hidden": 4, "depth": 0}, "depth"),
        (
            {"in_features": 8, "num_classes": 2, "hidden": 4, "depth": 1, "nonlinearity": "swish"},
            "swish",
        ),
    ],
)
def test_bad_construction_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RevMLP(**kwargs)


def test_wrong_input_size_names_shape():
    model = RevMLP(8, 2, 12, 1)
    with pytest.raises(ValueError, match=r"expects 8 input features.*\(3, 9\)"):
        model(torch.randn(3, 9))


@pytest.mark.parametrize("inverted_bottleneck", [True, False])
def test_couple_with_the_blocks_branches_is_its_forward(inverted_bottleneck):
    torch.manual_seed(0)
    model = RevMLP(8, 2, 12, 2, norm=True, inverted_bottleneck=inverted_bottleneck).double()
    block = model.body.blocks[1]
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(block.couple(x, block.f, block.g), block(x))


def test_features_are_the_activation_of_the_pre_activation():
    torch.manual_seed(0)
    branch = RevMLP(8, 2, 12, 2, norm=True, nonlinearity="tanh").double().body.blocks[1].f
    z = torch.randn(5, 4, dtype=torch.float64)
    pre = torch.nn.functional.layer_norm(z, (4,), eps=1e-6) @ branch.expansion
    assert torch.allclose(branch.features(z), torch.tanh(pre)) and pre.shape == (5, 12)
