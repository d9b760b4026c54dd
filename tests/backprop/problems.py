"""Small float64 test problems for curvlab.backprop: models x losses, built deterministically."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Residual(nn.Module):
    """MLP with a residual addition and a module shared between two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.block = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        h = h + self.block(self.act(h))
        h2 = self.block(h)  # second call of the shared module
        return self.head(torch.cat([h, self.act(h2)], dim=1))


class SequenceNet(nn.Module):
    """Linear layers on [N, T, D]; returns class scores [N, C, T]."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.lin2 = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.sigmoid(self.lin1(x))).transpose(1, 2)


class AttentionNet(nn.Module):
    """Pre-norm attention block with residual, then mean pooling and a linear head.

    ``add_zero_attn=True`` is a variant that the attention rule does not cover (generic path).
    """

    def __init__(self, add_zero_attn: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, add_zero_attn=add_zero_attn)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        h = x + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


class EmbeddingNet(nn.Module):
    """Embedding of token ids, BatchNorm1d in eval mode, GroupNorm, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.bn = nn.BatchNorm1d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gn(self.bn(self.embed(x).flatten(1))))


class ResidualConv(nn.Module):
    """Conv stem, a pre-activation residual block with BatchNorm2d (eval), pooling, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = h + self.conv(torch.relu(self.bn(h)))
        return self.head(self.pool(h).flatten(1))


class TransposedConvNet(nn.Module):
    """ConvTranspose1d (padding with output padding) and a grouped, dilated ConvTranspose2d."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose1d(2, 2, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose2d(2, 4, 2, stride=(2, 1), groups=2, dilation=(1, 2))
        self.head = nn.Linear(2 * 8 + 4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.tanh(self.up1(x))  # [N, 2, 8]
        b = self.up2(x.reshape(-1, 2, 2, 2))  # [N, 4, 4, 4]
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], dim=1))


@dataclass
class Problem:
    """A named builder of a model and its inputs."""

    name: str
    build: Callable[[], tuple[nn.Module, Tensor]]


def _mlp():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return model, torch.randn(4, 5)


def _mlp_act():
    model = nn.Sequential(
        nn.Linear(5, 4),
        nn.GELU(),
        nn.Dropout(0.3),
        nn.Linear(4, 4),
        nn.SiLU(),
        nn.Linear(4, 4),
        nn.ELU(),
        nn.Linear(4, 4),
        nn.LeakyReLU(0.1),
        nn.Softplus(),
        nn.Identity(),
        nn.Linear(4, 3),
    )
    return model, torch.randn(4, 5)


def _cnn2d():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2, stride=2, padding=1, padding_mode="reflect"),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return model, torch.randn(3, 2, 6, 6)


def _cnn1d():
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, dilation=2, groups=2, padding="same"),
        nn.Tanh(),
        nn.AvgPool1d(2),
        nn.Conv1d(4, 2, 2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return model, torch.randn(3, 2, 6)


def _cnn3d():
    model = nn.Sequential(
        nn.Conv3d(1, 2, 2, stride=(1, 2, 1)),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    )
    return model, torch.randn(3, 1, 3, 4, 3)


def _layernorm_mlp():
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 3))
    return model, torch.randn(4, 5)


def _pooling():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Conv2d(2, 2, 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    )
    return model, torch.randn(3, 1, 6, 6)


def _residual_conv():
    model = ResidualConv()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model, torch.randn(3, 2, 4, 4)


def _transposed():
    return TransposedConvNet(), torch.randn(3, 2, 4)


def _transposed3d():
    model = nn.Sequential(
        nn.ConvTranspose3d(
            1, 2, (2, 2, 3), stride=(2, 1, 2), padding=(0, 1, 1), output_padding=(1, 0, 1)
        ),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(40, 3),
    )
    return model, torch.randn(3, 1, 2, 3, 1)


def _grouped2d():
    model = nn.Sequential(
        nn.Conv2d(4, 6, 2, groups=2, stride=2, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=3, padding="same"),
        nn.Flatten(),
        nn.Linear(54, 3),
    )
    return model, torch.randn(3, 4, 4, 4)


def _residual():
    return Residual(), torch.randn(4, 5)


def _sequence():
    return SequenceNet(), torch.randn(3, 2, 3)


def _attention():
    return AttentionNet(), torch.randn(3, 3, 4)


def generic_attention(loss_name: str, seed: int = 0):
    """``build`` for an attention model on the generic path (a variant without a rule)."""
    return build(
        Problem("attention-generic", lambda: (AttentionNet(True), torch.randn(3, 3, 4))),
        loss_name,
        seed,
    )


def _embedding():
    model = EmbeddingNet()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randint(0, 7, (4, 2))


PROBLEMS = [
    Problem("mlp", _mlp),
    Problem("mlp-activations", _mlp_act),
    Problem("cnn2d", _cnn2d),
    Problem("cnn1d-grouped", _cnn1d),
    Problem("cnn3d", _cnn3d),
    Problem("residual-shared", _residual),
    Problem("sequence", _sequence),
    Problem("attention-layernorm", _attention),
    Problem("embedding-batchnorm-groupnorm", _embedding),
    Problem("layernorm-mlp", _layernorm_mlp),
    Problem("pooling", _pooling),
    Problem("residual-conv-batchnorm", _residual_conv),
    Problem("conv-transpose", _transposed),
    Problem("conv-transpose-3d", _transposed3d),
    Problem("cnn2d-grouped", _grouped2d),
]

LOSSES = {
    "mse-mean": lambda: nn.MSELoss(),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
    "ce-mean": lambda: nn.CrossEntropyLoss(),
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "ce-smooth": lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
    "bce-mean": lambda: nn.BCEWithLogitsLoss(),
    "bce-sum": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}


def make_targets(loss_func: nn.Module, output: Tensor) -> Tensor:
    """Targets of the right kind for ``loss_func`` and an output ``[N, ...]``."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return torch.randint(0, output.shape[1], (output.shape[0], *output.shape[2:]))
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        return torch.rand_like(output)
    return torch.randn_like(output)


def build(problem: Problem, loss_name: str, seed: int = 0):
    """``(model, loss_func, inputs, targets)`` in float64, model in eval mode."""
    torch.manual_seed(seed)
    model, inputs = problem.build()
    model = model.double().eval()
    if inputs.is_floating_point():
        inputs = inputs.double()
    loss_func = LOSSES[loss_name]()
    with torch.no_grad():
        output = model(inputs)
    return model, loss_func, inputs, make_targets(loss_func, output)
