"""Tests for curvlab.nn.memsave: equality with the stock layers and what autograd stores."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from curvlab.nn import memsave
from curvlab.nn.memsave import (
    PeakMemory,
    SavedTensorBytes,
    convert,
    pack_bits,
    revert,
    unpack_bits,
)

DTYPE = torch.float64
ATOL = 1e-10


def _bn(cls: type[nn.Module], channels: int, train: bool) -> nn.Module:
    layer = cls(channels)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.running_mean.normal_(generator=gen)
        layer.running_var.uniform_(0.5, 2.0, generator=gen)
        layer.weight.normal_(generator=gen)
        layer.bias.normal_(generator=gen)
    return layer.train(train)


# (id, layer factory, input shape); every factory builds a stock torch layer.
PARAM_LAYERS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    ("conv1d-unbatched", lambda: nn.Conv1d(3, 4, 3, stride=2), (3, 9)),
    ("conv2d", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 8, 8)),
    ("conv2d-groups-dilation", lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2), (2, 4, 9, 9)),
    ("conv2d-nobias", lambda: nn.Conv2d(3, 4, 3, bias=False), (2, 3, 7, 7)),
    ("conv2d-same-even", lambda: nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 7, 7)),
    ("conv2d-valid", lambda: nn.Conv2d(3, 4, 2, padding="valid"), (2, 3, 5, 5)),
    ("conv2d-reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    (
        "conv2d-circular",
        lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"),
        (1, 3, 6, 6),
    ),
    ("conv3d", lambda: nn.Conv3d(3, 4, 2, stride=(1, 2, 1)), (2, 3, 5, 5, 5)),
    ("bn1d-eval", lambda: _bn(nn.BatchNorm1d, 3, False), (6, 3)),
    ("bn1d-eval-3d", lambda: _bn(nn.BatchNorm1d, 3, False), (6, 3, 4)),
    ("bn2d-eval", lambda: _bn(nn.BatchNorm2d, 3, False), (4, 3, 5, 5)),
    ("bn3d-eval", lambda: _bn(nn.BatchNorm3d, 3, False), (4, 3, 3, 3, 3)),
    ("bn2d-train", lambda: _bn(nn.BatchNorm2d, 3, True), (4, 3, 5, 5)),
    (
        "bn2d-eval-nostats",
        lambda: nn.BatchNorm2d(3, track_running_stats=False).eval(),
        (4, 3, 2, 2),
    ),
    ("linear", lambda: nn.Linear(5, 4), (3, 2, 5)),
    ("layernorm", lambda: nn.LayerNorm(5), (3, 2, 5)),
]

FREE_LAYERS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("relu", nn.ReLU, (4, 3, 5)),
    ("relu-inplace", lambda: nn.ReLU(inplace=True), (4, 3, 5)),
    ("maxpool1d", lambda: nn.MaxPool1d(3, stride=2, padding=1), (2, 3, 10)),
    ("maxpool1d-indices", lambda: nn.MaxPool1d(2, return_indices=True), (2, 3, 9)),
    ("maxpool2d", lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 8, 8)),
    ("maxpool2d-overlap-ceil", lambda: nn.MaxPool2d(3, stride=1, ceil_mode=True), (2, 3, 6, 7)),
    ("maxpool2d-dilation", lambda: nn.MaxPool2d(2, dilation=2), (2, 3, 7, 7)),
    ("maxpool2d-unbatched", lambda: nn.MaxPool2d(2), (3, 6, 6)),
    ("maxpool3d", lambda: nn.MaxPool3d(2, stride=(1, 2, 2)), (2, 3, 4, 6, 6)),
]

GRAD_SETTINGS = [
    pytest.param(True, "all", id="x-grad-params-train"),
    pytest.param(True, "none", id="x-grad-params-frozen"),
    pytest.param(True, "bias", id="x-grad-bias-only"),
    pytest.param(False, "all", id="x-nograd-params-train"),
    pytest.param(False, "bias", id="x-nograd-bias-only"),
]


def _forward_backward(
    layer: nn.Module, x: Tensor, x_grad: bool, seed: int = 0
) -> tuple[Tensor, list[Tensor]]:
    """Output and gradients (of x if it requires one, then of the trainable parameters)."""
    x = x.clone().requires_grad_(x_grad)
    torch.manual_seed(seed)
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    inputs = ([x] if x_grad else []) + [p for p in layer.parameters() if p.requires_grad]
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    return out, list(torch.autograd.grad(out, inputs, grad_out)) if inputs else []


def _set_trainable(layer: nn.Module, which: str) -> None:
    for name, param in layer.named_parameters():
        param.requires_grad_(which == "all" or (which == "bias" and name == "bias"))


def _assert_same(stock: tuple[Tensor, list[Tensor]], ours: tuple[Tensor, list[Tensor]]) -> None:
    assert ours[0].dtype == stock[0].dtype
    torch.testing.assert_close(ours[0], stock[0], atol=ATOL, rtol=0)
    assert len(ours[1]) == len(stock[1])
    for got, want in zip(ours[1], stock[1], strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(("x_grad", "trainable"), GRAD_SETTINGS)
@pytest.mark.parametrize(
    ("factory", "shape"), [p[1:] for p in PARAM_LAYERS], ids=[p[0] for p in PARAM_LAYERS]
)
def test_parametric_layer_matches_stock(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], x_grad: bool, trainable: str
) -> None:
    stock = factory().to(DTYPE)
    _set_trainable(stock, trainable)
    ours = convert(copy.deepcopy(stock))
    x = torch.randn(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    _assert_same(_forward_backward(stock, x, x_grad), _forward_backward(ours, x, x_grad))
    torch.testing.assert_close(ours.state_dict(), stock.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("factory", "shape"), [p[1:] for p in FREE_LAYERS], ids=[p[0] for p in FREE_LAYERS]
)
def test_parameter_free_layer_matches_stock(
    factory: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    stock = factory()
    ours = convert(copy.deepcopy(stock))
    x = torch.randn(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    x[..., 0] = 0.0  # ReLU's kink
    # An in-place ReLU needs a non-leaf input: differentiate with respect to a leaf in front of it.
    _assert_same(
        _forward_backward(_NonLeaf(stock), x, True), _forward_backward(_NonLeaf(ours), x, True)
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(x.clone()), stock(x.clone()), atol=0, rtol=0)


class _NonLeaf(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x * 1.0)


def test_max_pool_returns_same_indices() -> None:
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    stock = nn.MaxPool2d(3, stride=2, return_indices=True)
    out, idx = convert(copy.deepcopy(stock))(x)
    ref_out, ref_idx = stock(x)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    assert not idx.requires_grad


def _saved_bytes(layer: nn.Module, x: Tensor, x_grad: bool = True) -> int:
    """Bytes the graph of ``layer(x)`` stores, parameters and buffers (alive anyway) not counted."""
    x = x.clone().requires_grad_(x_grad)
    keep = [*layer.parameters(), *layer.buffers()]
    with SavedTensorBytes(exclude=keep) as saved:
        layer(x)
    return saved.nbytes


# (id, factory, shape, bytes memsave may store for a [*shape] float64 input with frozen weights)
SAVING_LAYERS = [
    ("conv1d", lambda: nn.Conv1d(8, 8, 3), (16, 8, 64), 0),
    ("conv2d", lambda: nn.Conv2d(8, 8, 3), (16, 8, 16, 16), 0),
    ("conv3d", lambda: nn.Conv3d(8, 8, 3), (4, 8, 8, 8, 8), 0),
    ("bn2d-eval", lambda: _bn(nn.BatchNorm2d, 8, False), (16, 8, 16, 16), 8 * 8),
    ("relu", nn.ReLU, (16, 8, 16, 16), 16 * 8 * 16 * 16 // 8),  # 1 bit per entry
    ("maxpool2d", lambda: nn.MaxPool2d(2), (16, 8, 16, 16), 16 * 8 * 8 * 8 * 8),  # int64 indices
]


@pytest.mark.parametrize(
    ("factory", "shape", "expected"),
    [p[1:] for p in SAVING_LAYERS],
    ids=[p[0] for p in SAVING_LAYERS],
)
def test_memsave_stores_only_what_backward_needs(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], expected: int
) -> None:
    stock = factory().to(DTYPE).requires_grad_(False)
    x = torch.randn(shape, dtype=DTYPE)
    stock_bytes = _saved_bytes(stock, x)
    ours_bytes = _saved_bytes(convert(copy.deepcopy(stock)), x)
    assert ours_bytes == expected
    # Stock keeps the input (8 bytes per entry), or for ReLU its output of the same size.
    assert stock_bytes >= x.numel() * 8 > ours_bytes


def test_memsave_dropout_stores_bit_mask() -> None:
    x = torch.randn(64, 128, dtype=DTYPE)
    stock, ours = nn.Dropout(0.3), convert(nn.Dropout(0.3))
    assert _saved_bytes(ours, x) == x.numel() // 8  # 1 bit per entry
    assert _saved_bytes(stock, x) == x.numel() * 8  # float64 mask on CPU


def test_torch_linear_already_drops_input_when_weight_frozen() -> None:
    """Why Linear is kept stock: torch 2.13 stores no input when the weight is frozen."""
    layer = nn.Linear(32, 16).requires_grad_(False)
    for shape in [(64, 32), (8, 8, 32)]:
        x = torch.randn(shape, requires_grad=True)
        assert _saved_bytes(layer, x) == 0
        node = layer(x).grad_fn
        while node is not None and not hasattr(node, "_saved_mat1"):
            node = node.next_functions[0][0]
        assert node is not None and node._saved_mat1 is None
    # With a trainable weight the input is stored, as it must be.
    assert _saved_bytes(layer.requires_grad_(True), torch.randn(64, 32)) == 64 * 32 * 4


def test_torch_layernorm_stores_only_what_input_grad_needs() -> None:
    """With frozen affine parameters the input gradient needs x_hat: torch stores just that."""
    layer = nn.LayerNorm(32).requires_grad_(False)
    x = torch.randn(64, 32)
    # The input plus the per-row mean and 1/sigma ([64, 1] each), nothing else; memsave the same.
    assert _saved_bytes(layer, x) == (64 * 32 + 2 * 64) * 4
    assert _saved_bytes(convert(copy.deepcopy(layer)), x) == (64 * 32 + 2 * 64) * 4


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (lambda: nn.LayerNorm(32), (64, 32)),
        (lambda: nn.BatchNorm2d(8), (16, 8, 4, 4)),
        (lambda: nn.BatchNorm1d(8).eval(), (16, 8)),
    ],
    ids=["layernorm", "bn2d-train", "bn1d-eval"],
)
def test_bias_only_norm_stores_nothing(factory: Callable[[], nn.Module], shape: tuple) -> None:
    """BitFit-style: frozen weight, input without gradient -- stock stores the input, memsave not."""
    stock = factory()
    stock.weight.requires_grad_(False)
    ours = convert(copy.deepcopy(stock))
    x = torch.randn(shape)
    assert _saved_bytes(ours, x, x_grad=False) == 0
    assert _saved_bytes(stock, x, x_grad=False) >= x.numel() * 4 or not stock.training


def test_memsave_dropout_statistics_and_backward() -> None:
    p = 0.3
    layer = convert(nn.Dropout(p))
    assert isinstance(layer, memsave.MemSaveDropout)
    x = (torch.rand(200, 500, dtype=DTYPE) + 0.5).requires_grad_(True)
    torch.manual_seed(0)
    out = layer(x)
    mask = out != 0
    assert abs(1 - mask.double().mean().item() - p) < 0.01
    torch.testing.assert_close(out[mask], x[mask] / (1 - p), atol=ATOL, rtol=0)
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(grad_x, mask * grad_out / (1 - p), atol=ATOL, rtol=0)
    # Eval mode is the identity.
    assert torch.equal(layer.eval()(x), x)


def test_memsave_dropout_draws_torch_mask_for_same_seed() -> None:
    """On torch 2.13 CPU ``native_dropout`` draws the same mask as ``F.dropout``."""
    x = torch.randn(32, 64, dtype=DTYPE, requires_grad=True)
    _assert_same(
        _forward_backward(nn.Dropout(0.4), x, True, seed=7),
        _forward_backward(convert(nn.Dropout(0.4)), x, True, seed=7),
    )


@pytest.mark.parametrize(
    "factory",
    [lambda: nn.Conv2d(2, 3, 3, padding=1), nn.ReLU, lambda: nn.MaxPool2d(2, stride=1)],
    ids=["conv2d", "relu", "maxpool2d"],
)
def test_custom_functions_pass_gradcheck(factory: Callable[[], nn.Module]) -> None:
    layer = convert(factory().to(DTYPE).requires_grad_(False))
    x = torch.randn(2, 2, 5, 5, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_float32_dtype_and_values_kept() -> None:
    stock = nn.Sequential(
        nn.Conv2d(3, 4, 3), _bn(nn.BatchNorm2d, 4, False), nn.ReLU(), nn.MaxPool2d(2)
    ).requires_grad_(False)
    ours = convert(copy.deepcopy(stock))
    x = torch.randn(2, 3, 10, 10)
    ref, got = _forward_backward(stock, x, True), _forward_backward(ours, x, True)
    assert got[0].dtype == got[1][0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1][0], ref[1][0])


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 4 * 4, 5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return self.head(self.pool(h + self.block(h)))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "trainable", ["all", "head", "norms", "stem", "biases", "none"], ids=lambda t: f"train-{t}"
)
def test_convert_cnn_keeps_state_and_results(train: bool, trainable: str) -> None:
    torch.manual_seed(0)
    stock = _SmallCNN().to(DTYPE).train(train)
    for name, param in stock.named_parameters():
        keep = {"all": True, "head": name.startswith("head"), "none": False}.get(trainable)
        if trainable == "biases":  # BitFit: the stem's BatchNorm gets no input gradient
            keep = name.endswith("bias")
        if trainable == "norms":
            keep = name in {"stem.1.weight", "stem.1.bias", "block.1.weight", "block.1.bias"}
        elif trainable == "stem":
            keep = name.startswith("stem.0")
        param.requires_grad_(keep)
    model = copy.deepcopy(stock)
    params_before = dict(model.named_parameters())
    assert convert(model) is model
    assert type(model.stem[0]) is memsave.MemSaveConv2d
    assert type(model.block[2]) is memsave.MemSaveReLU
    assert type(model.head[2]) is nn.Linear
    assert isinstance(model.stem[1], nn.BatchNorm2d)
    # Same Parameter objects, same state dict.
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(stock.state_dict())
    torch.testing.assert_close(model.state_dict(), stock.state_dict(), atol=0, rtol=0)
    x = torch.randn(3, 3, 8, 8, dtype=DTYPE)
    _assert_same(_forward_backward(stock, x, True), _forward_backward(model, x, True))
    # Train mode updated the running statistics identically.
    torch.testing.assert_close(model.state_dict(), stock.state_dict(), atol=ATOL, rtol=0)
    model.load_state_dict(stock.state_dict())


def test_convert_copy_bare_layer_and_revert() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    copied = convert(model, inplace=False)
    assert type(model[0]) is nn.Conv2d and type(copied[0]) is memsave.MemSaveConv2d
    assert copied[0].weight is not model[0].weight
    bare = nn.MaxPool3d(2)
    assert convert(bare) is bare and type(bare) is memsave.MemSaveMaxPool3d
    assert type(revert(copied)[1]) is nn.ReLU and type(copied[0]) is nn.Conv2d


def test_subclasses_and_kept_stock_layers_are_left_alone() -> None:
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(1, 1, 1), nn.Linear(2, 2), nn.LayerNorm(2))
    convert(model)
    assert [type(m) for m in model] == [MyConv, nn.Linear, memsave.MemSaveLayerNorm]
    assert memsave.KEPT_STOCK == (nn.Linear,)


def test_convert_selected_layers_only() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    convert(model, layers=[nn.Conv2d, nn.BatchNorm2d])
    assert [type(m) for m in model] == [
        memsave.MemSaveConv2d,
        memsave.MemSaveBatchNorm2d,
        nn.ReLU,
    ]
    with pytest.raises(ValueError, match="Linear"):
        convert(model, layers=[nn.Linear])


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    density=st.floats(0.0, 1.0),
)
def test_bit_masks_round_trip(shape: list[int], density: float) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < density
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    unpacked = unpack_bits(packed, mask.shape, torch.float32)
    assert unpacked.shape == mask.shape and torch.equal(unpacked, mask.float())


def test_relu_passes_gradient_like_torch_at_nan_and_zero() -> None:
    x = torch.tensor([float("nan"), 0.0, -0.0, -1.0, 2.0], requires_grad=True)
    grad_out = torch.arange(1.0, 6.0)
    (ours,) = torch.autograd.grad(convert(nn.ReLU())(x * 1.0), x, grad_out)
    (stock,) = torch.autograd.grad(nn.ReLU()(x * 1.0), x, grad_out)
    assert torch.equal(ours, stock)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
    )


@pytest.mark.parametrize(
    "trainable",
    [
        lambda n: True,
        lambda n: n.startswith("8."),
        lambda n: n in {"1.weight", "1.bias", "5.weight", "5.bias"},
        lambda n: n.endswith("bias"),
        lambda n: n.startswith("0.") or n.startswith("8."),
    ],
    ids=["all", "last", "norms", "biases", "first+last"],
)
def test_convert_mlp_with_dropout_matches_stock(trainable: Callable[[str], bool]) -> None:
    """Same seed, same dropout masks: outputs and gradients equal the stock MLP's."""
    torch.manual_seed(0)
    stock = _mlp().to(DTYPE)
    for name, param in stock.named_parameters():
        param.requires_grad_(trainable(name))
    ours = convert(copy.deepcopy(stock))
    assert type(ours[1]) is memsave.MemSaveLayerNorm and type(ours[0]) is nn.Linear
    x = torch.randn(32, 6, dtype=DTYPE)
    _assert_same(_forward_backward(stock, x, False, seed=5), _forward_backward(ours, x, False, 5))


@pytest.mark.parametrize(
    ("train", "max_ratio"), [(True, 0.6), (False, 0.25)], ids=["bn-train", "bn-eval"]
)
def test_converted_cnn_stores_less_when_only_the_stem_trains(train: bool, max_ratio: float) -> None:
    """The graph must reach the stem, so stock keeps every activation; memsave drops most."""
    torch.manual_seed(0)
    stock = _SmallCNN().train(train).requires_grad_(False)
    stock.stem[0].requires_grad_(True)
    ours = convert(copy.deepcopy(stock))
    x = torch.randn(8, 3, 8, 8)
    saved = []
    for model in (stock, ours):
        with SavedTensorBytes(exclude=[x, *model.parameters(), *model.buffers()]) as counter:
            model(x)
        saved.append(counter.nbytes)
    assert saved[1] < max_ratio * saved[0]


def test_peak_memory_counts_transient_tensors() -> None:
    with PeakMemory() as peak:
        transient = torch.empty(1000, 1000)
        del transient
        kept = torch.empty(250, 250)
    assert peak.nbytes == 1000 * 1000 * 4
    assert kept.numel() == 250 * 250


def test_frozen_conv_stack_peak_memory_drops_by_the_stored_inputs() -> None:
    """Allocator-level peak of forward+backward (w.r.t. the input) through 6 frozen convolutions."""
    torch.manual_seed(0)
    stock = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)]).requires_grad_(False)
    ours = convert(copy.deepcopy(stock))
    activation = 16 * 8 * 32 * 32 * 4
    peaks = []
    for model in (stock, ours):
        x = torch.randn(16, 8, 32, 32, requires_grad=True)
        with PeakMemory() as peak:
            model(x).sum().backward()
        peaks.append(peak.nbytes)
    # Stock keeps the inputs of convs 2..6 (the first input is x itself); memsave keeps none.
    assert peaks[1] <= peaks[0] - 5 * activation


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4), nn.LayerNorm([4, 5, 5])], ids=["bn", "ln"])
def test_bias_only_norm_followed_by_inplace_relu(norm: nn.Module) -> None:
    """The bias-only path's output is a fresh tensor that an in-place ReLU may overwrite."""
    stock = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), norm, nn.ReLU(inplace=True)).to(DTYPE)
    stock.requires_grad_(False)
    stock[1].bias.requires_grad_(True)
    ours = convert(copy.deepcopy(stock))
    x = torch.randn(2, 3, 7, 7, dtype=DTYPE)
    _assert_same(_forward_backward(stock, x, False), _forward_backward(ours, x, False))
    torch.testing.assert_close(ours.state_dict(), stock.state_dict(), atol=ATOL, rtol=0)
