"""Recurrent layers (nn.RNN, nn.LSTM, nn.GRU) on the generic path against float64 references.

The generic torch.func rule re-runs a recurrent layer per sample, with the batch where the layer
keeps it: ``[N, T, H]`` or ``[T, N, H]`` sequences and ``[layers * directions, N, H]`` states.
The models embed token ids ``[N, T]`` and read the scores ``[N, C]`` off the last step or the
final state, or ``[N, C, T]`` off every step.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from curvlab.backprop import (
    GGNMP,
    KFAC,
    KFLR,
    BatchDiagGGN,
    BatchDiagHessian,
    BatchGrad,
    BatchL2,
    DenseBlock,
    DiagGGN,
    DiagHessian,
    SqrtGGN,
    SumGradSquared,
    UnsupportedModuleError,
    Variance,
    capture,
    compute,
)
from curvlab.backprop.loss import LossSpec
from tests import reference
from tests.backprop.problems import LOSSES, make_targets

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
VOCAB, EMBED, HIDDEN, CLASSES = 5, 3, 2, 3


class RecurrentNet(nn.Module):
    """Embedding, a recurrent layer, a linear head: token ids ``[N, T]`` to scores.

    Args:
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        batch_first: The recurrent layer's layout: ``[N, T, H]`` (``True``) or ``[T, N, H]``.
        head: ``"last"`` (the output at the last step, ``[N, C]``), ``"sequence"`` (every step,
            ``[N, C, T]``) or ``"state"`` (the last layer's final ``h_n``, and ``c_n`` for an
            LSTM, ``[N, C]``).
        layers: Stacked layers.
        bidirectional: Both directions.
        initial_state: Pass ``hx`` computed from the sample (a linear map of its mean
            embedding), instead of the default zeros.
        proj_size: The LSTM's projection size (``0``: none).
    """

    def __init__(
        self,
        cell: str,
        batch_first: bool,
        head: str,
        layers: int = 1,
        bidirectional: bool = False,
        initial_state: bool = False,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        self.batch_first, self.head_kind = batch_first, head
        directions = 2 if bidirectional else 1
        self.embed = nn.Embedding(VOCAB, EMBED)
        projection = {"proj_size": proj_size} if proj_size else {}
        self.rnn = CELLS[cell](
            EMBED,
            HIDDEN,
            layers,
            batch_first=batch_first,
            bidirectional=bidirectional,
            **projection,
        )
        self.init = nn.Linear(EMBED, HIDDEN) if initial_state else None
        out = proj_size or HIDDEN
        if head == "state":
            features = out + HIDDEN if cell == "lstm" else out  # h_n (and c_n)
        else:
            features = directions * out
        self.head = nn.Linear(features, CLASSES)

    def _initial_state(self, embedded: Tensor) -> Tensor | tuple[Tensor, Tensor] | None:
        if self.init is None:
            return None
        z = torch.tanh(self.init(embedded.mean(1)))  # [N, H]
        z = z.unsqueeze(0).expand(self.rnn.num_layers * (1 + self.rnn.bidirectional), -1, -1)
        h0 = z[..., : self.rnn.proj_size or HIDDEN]  # [L*D, N, H or proj_size]
        return (h0, 0.5 * z) if isinstance(self.rnn, nn.LSTM) else h0

    def forward(self, x: Tensor) -> Tensor:
        embedded = self.embed(x)  # [N, T, E]
        sequence = embedded if self.batch_first else embedded.transpose(0, 1)
        out, state = self.rnn(sequence, self._initial_state(embedded))
        if self.head_kind == "state":
            states = state if isinstance(state, tuple) else (state,)
            return self.head(torch.cat([s[-1] for s in states], dim=1))  # [L*D, N, H] -> [N, C]
        out = out if self.batch_first else out.transpose(0, 1)  # [N, T, D*H]
        if self.head_kind == "last":
            return self.head(out[:, -1])
        return self.head(out).transpose(1, 2)  # [N, C, T]


@dataclass(frozen=True)
class Case:
    """A recurrent model, its loss and the batch shape."""

    cell: str
    batch_first: bool
    head: str
    loss: str
    layers: int = 1
    bidirectional: bool = False
    initial_state: bool = False
    proj_size: int = 0
    batch: int = 3
    steps: int = 4

    @property
    def name(self) -> str:  # noqa: D102
        layout = "batch-first" if self.batch_first else "sequence-first"
        deep = f"-{self.layers}layers-bi" if self.bidirectional else ""
        hx = "-hx" if self.initial_state else ""
        proj = f"-proj{self.proj_size}" if self.proj_size else ""
        return f"{self.cell}-{layout}-{self.head}{deep}{hx}{proj}-{self.loss}"


def build(case: Case):
    """``(model, loss_func, inputs, targets)`` in float64, in eval mode."""
    torch.manual_seed(0)
    model = RecurrentNet(
        case.cell,
        case.batch_first,
        case.head,
        case.layers,
        case.bidirectional,
        case.initial_state,
        case.proj_size,
    )
    model = model.double().eval()
    x = torch.randint(0, VOCAB, (case.batch, case.steps))
    loss_func = LOSSES[case.loss]()
    with torch.no_grad():
        y = make_targets(loss_func, model(x))
    return model, loss_func, x, y


LAYOUTS = (True, False)
CASES = (
    [
        Case(cell, batch_first, head, loss)
        for cell in CELLS
        for batch_first in LAYOUTS
        for head in ("last", "sequence", "state")
        for loss in ("ce-mean", "mse-sum")
    ]
    + [
        Case(cell, batch_first, head, "ce-sum", layers=2, bidirectional=True, initial_state=True)
        for cell in CELLS
        for batch_first in LAYOUTS
        for head in ("sequence", "state")
    ]
    + [
        Case("lstm", batch_first, head, "mse-mean", 2, True, True, proj_size=1)
        for batch_first in LAYOUTS
        for head in ("sequence", "state")
    ]
)
CASE_NAMES = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}
QUANTITIES = [
    BatchGrad(),
    BatchL2(),
    SumGradSquared(),
    Variance(),
    DiagGGN(),
    BatchDiagGGN(),
    SqrtGGN(),
    DiagHessian(),
]


def _compute(model, loss_func, x, y, quantities, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute(model, loss_func, x, y, quantities, **kwargs)


def _r(loss_func: nn.Module, n: int) -> float:
    return 1.0 / n if loss_func.reduction == "mean" else 1.0


def _flatten(values: dict[str, Tensor], batch_dims: int) -> Tensor:
    """Concatenate per-parameter tensors ``[*batch, *p]`` into ``[*batch, P]``."""
    return torch.cat([v.flatten(start_dim=batch_dims) for v in values.values()], dim=-1)


def _blocks(model: nn.Module, dense: Tensor) -> dict[str, Tensor]:
    """The diagonal blocks of a ``[P, P]`` matrix by parameter name."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = dense[start : start + p.numel(), start : start + p.numel()]
        start += p.numel()
    return out


@functools.cache
def _references(name: str) -> dict[str, Tensor]:
    model, loss_func, x, y = build(BY_NAME[name])
    grads = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    per_sample_ggn = reference.per_sample_ggn(model, loss_func, x, y)  # [N, P, P]
    return {
        "grad": reference.gradient(model, loss_func, x, y),
        "BatchGrad": grads,
        "BatchL2": grads.square().sum(1),
        "SumGradSquared": grads.square().sum(0),
        "Variance": (grads - grads.mean(0)).square().mean(0),
        "DiagGGN": _r(loss_func, x.shape[0])
        * torch.diagonal(per_sample_ggn, dim1=1, dim2=2).sum(0),
        "BatchDiagGGN": torch.diagonal(per_sample_ggn, dim1=1, dim2=2),
        "SqrtGGN": reference.ggn(model, loss_func, x, y),
        "DiagHessian": reference.hessian_diagonal(model, loss_func, x, y),
    }


@functools.cache
def _ours(name: str):
    return _compute(*build(BY_NAME[name]), QUANTITIES)


@pytest.mark.parametrize("quantity", [q.name for q in QUANTITIES])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_quantity_matches_dense_reference(case, quantity):
    ours = _ours(case)[quantity]
    if quantity == "SqrtGGN":
        v = _flatten(ours, 2)  # [M, N, P]
        actual = torch.einsum("mnp,mnq->pq", v, v)
    elif quantity == "BatchL2":
        actual = torch.stack(list(ours.values())).sum(0)
    else:
        actual = _flatten(ours, 1 if quantity.startswith("Batch") else 0)
    torch.testing.assert_close(actual, _references(case)[quantity], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("case", CASE_NAMES[:: len(LAYOUTS) * 2])
def test_gradient(case):
    ours = _flatten(_ours(case).grad, 0)
    torch.testing.assert_close(ours, _references(case)["grad"], rtol=1e-8, atol=1e-12)


# one case per cell and layout for the more expensive checks: the final state, deep and
# bidirectional, with a sample-dependent initial state (its factor flows back through ``hx``)
DEEP = [c.name for c in CASES if c.bidirectional and c.head == "state"]
SEQUENCE = [c.name for c in CASES if c.head == "sequence" and c.loss == "ce-mean"]


@pytest.mark.parametrize("case", SEQUENCE + DEEP)
def test_method_func_matches_dense_reference(case):
    """``method="func"``: the embedding and the head take the generic rule too."""
    ours = _compute(*build(BY_NAME[case]), [BatchGrad(), DiagGGN()], method="func")
    actual = torch.cat([_flatten(ours["BatchGrad"], 1).flatten(), _flatten(ours["DiagGGN"], 0)])
    expected = torch.cat([_references(case)["BatchGrad"].flatten(), _references(case)["DiagGGN"]])
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("case", SEQUENCE[:1])
def test_batch_diag_hessian_matches_dense_reference(case):
    model, loss_func, x, y = build(BY_NAME[case])
    ours = _flatten(_compute(model, loss_func, x, y, [BatchDiagHessian()])["BatchDiagHessian"], 1)
    expected = reference.per_sample_hessian_diagonals(model, loss_func, x, y)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-10)


def _mc_columns(model, loss_func, x, samples: int, seed: int) -> Tensor:
    r"""``v_{mn} = J_n^\top S_{mn}`` ``[k, N, P]`` for the MC square root ``S`` drawn with ``seed``."""
    with torch.no_grad():
        out = model(x)
    sqrt = LossSpec(loss_func).sampled_sqrt_hessian(
        out, samples, torch.Generator().manual_seed(seed)
    )
    jac = reference.jacobian(model, x).reshape(
        x.shape[0], -1, sum(p.numel() for p in model.parameters())
    )
    return torch.einsum("knd,ndp->knp", sqrt.flatten(start_dim=2), jac)  # [k, N, P]


@pytest.mark.parametrize("case", SEQUENCE + DEEP)
def test_monte_carlo_quantities_match_their_sampled_columns(case):
    """DiagGGN / BatchDiagGGN / KFAC with MC: the dense GGN of the very columns sampled."""
    model, loss_func, x, y = build(BY_NAME[case])
    quantities = [DiagGGN(mc_samples=2), BatchDiagGGN(mc_samples=2), KFAC(mc_samples=2)]
    generator = torch.Generator().manual_seed(7)
    ours = _compute(model, loss_func, x, y, quantities, generator=generator)
    v = _mc_columns(model, loss_func, x, 2, 7)
    r = _r(loss_func, x.shape[0])
    ggn = _blocks(model, r * torch.einsum("knp,knq->pq", v, v))
    kfac = {k: b.dense() for k, b in ours["KFACMC2"].items() if k.startswith("rnn.")}
    actual = torch.cat(
        [_flatten(ours["DiagGGNMC2"], 0), _flatten(ours["BatchDiagGGNMC2"], 1).flatten()]
        + [b.flatten() for b in kfac.values()]
    )
    expected = torch.cat(
        [r * v.square().sum((0, 1)), v.square().sum(0).flatten()] + [ggn[k].flatten() for k in kfac]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("case", SEQUENCE + DEEP)
def test_kflr_gives_recurrent_parameters_their_whole_ggn_block(case):
    model, loss_func, x, y = build(BY_NAME[case])
    ours = _compute(model, loss_func, x, y, [KFLR()])["KFLR"]
    ggn = _blocks(model, reference.ggn(model, loss_func, x, y))
    recurrent = [k for k in ours if k.startswith("rnn.")]
    assert all(isinstance(ours[k], DenseBlock) for k in recurrent)
    actual = torch.cat([ours[k].dense().flatten() for k in recurrent])
    expected = torch.cat([ggn[k].flatten() for k in recurrent])
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("case", SEQUENCE + DEEP)
def test_ggn_products_match_dense_blocks(case):
    model, loss_func, x, y = build(BY_NAME[case])
    ours = _compute(model, loss_func, x, y, [GGNMP()])["GGNMP"]
    ggn = _blocks(model, reference.ggn(model, loss_func, x, y))
    torch.manual_seed(5)
    actual, expected = [], []
    for name, p in model.named_parameters():
        v = torch.randn(2, *p.shape, dtype=p.dtype)
        actual.append(ours[name](v).flatten())
        expected.append((v.reshape(2, -1) @ ggn[name]).flatten())
    torch.testing.assert_close(torch.cat(actual), torch.cat(expected), rtol=1e-7, atol=1e-10)


# as many steps as samples: selecting along the time dimension would go unnoticed by shapes
SQUARE = [
    Case(cell, batch_first, head, "ce-mean", batch=3, steps=3, initial_state=True)
    for cell in CELLS
    for batch_first in LAYOUTS
    for head in ("sequence", "state")
]


@pytest.mark.parametrize("case", SQUARE, ids=[c.name for c in SQUARE])
def test_subsampling_selects_along_the_batch_dimension(case):
    model, loss_func, x, y = build(case)
    index = [2, 0]
    quantities = [BatchGrad(), BatchDiagGGN(), DiagGGN(), SqrtGGN()]
    ours = _compute(model, loss_func, x, y, quantities, subsampling=index)
    grads = reference.per_sample_gradients(model, loss_func, x, y)[index]
    per_sample_ggn = reference.per_sample_ggn(model, loss_func, x, y)[index]
    diagonals = torch.diagonal(per_sample_ggn, dim1=1, dim2=2)
    v = _flatten(ours["SqrtGGN"], 2)  # [M, 2, P]
    r = _r(loss_func, x.shape[0])
    actual = torch.cat(
        [
            _flatten(ours["BatchGrad"], 1).flatten(),
            _flatten(ours["BatchDiagGGN"], 1).flatten(),
            _flatten(ours["DiagGGN"], 0),
            torch.einsum("mnp,mnq->pq", v, v).flatten(),
        ]
    )
    expected = torch.cat(
        [
            grads.flatten(),
            diagonals.flatten(),
            r * diagonals.sum(0),
            (r * per_sample_ggn.sum(0)).flatten(),
        ]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10)


class SequenceFirstNet(nn.Module):
    """A recurrent layer on a sequence-first input ``[T, N, F]``, scores ``[N, C, T]``."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = CELLS[cell](EMBED, HIDDEN, 2)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # [T, N, H]
        return self.head(out.transpose(0, 1)).transpose(1, 2)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-mean"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_sequence_first_model_input(cell, loss):
    """The model's own input need not be batch-first for the per-sample and GGN quantities."""
    torch.manual_seed(1)
    model = SequenceFirstNet(cell).double().eval()
    x = torch.randn(4, 3, EMBED, dtype=torch.float64)  # [T, N, F]
    loss_func = LOSSES[loss]()
    with torch.no_grad():
        y = make_targets(loss_func, model(x))
    ours = _compute(model, loss_func, x, y, [BatchGrad(), BatchDiagGGN()])
    per_sample_ggn = reference.per_sample_ggn(model, loss_func, x, y)
    actual = torch.cat(
        [_flatten(ours["BatchGrad"], 1).flatten(), _flatten(ours["BatchDiagGGN"], 1).flatten()]
    )
    expected = torch.cat(
        [
            reference.per_sample_gradients(model, loss_func, x, y).flatten(),
            torch.diagonal(per_sample_ggn, dim1=1, dim2=2).flatten(),
        ]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10)


def test_capture_in_the_training_loop_equals_compute():
    model, loss_func, x, y = build(BY_NAME[DEEP[0]])
    quantities = [BatchGrad(), DiagGGN()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with capture(model, loss_func, quantities) as captured:
            loss_func(model(x), y).backward()
    expected = _compute(model, loss_func, x, y, quantities)
    actual = torch.cat([_flatten(captured.results[q.name], 0).flatten() for q in quantities])
    wanted = torch.cat([_flatten(expected[q.name], 0).flatten() for q in quantities])
    torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)


class PackedNet(nn.Module):
    """An LSTM fed a PackedSequence (samples of different lengths)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(EMBED, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        lengths = torch.tensor([x.shape[0]] + [x.shape[0] - 1] * (x.shape[1] - 1))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def test_packed_sequence_is_rejected_naming_the_module():
    model = PackedNet().double()
    x = torch.randn(4, 3, EMBED, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (3,))
    with pytest.raises(UnsupportedModuleError, match=r"LSTM \(module 'rnn'\).*PackedSequence"):
        _compute(model, nn.CrossEntropyLoss(), x, y, [BatchGrad()])


def test_dropout_between_layers_in_training_mode_is_rejected():
    model = nn.Sequential(nn.GRU(EMBED, HIDDEN, 2, dropout=0.5)).double().train()
    head = nn.Linear(HIDDEN, CLASSES).double()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = model, head

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.body(x)[0][-1])

    x = torch.randn(4, 3, EMBED, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (3,))
    with pytest.raises(UnsupportedModuleError, match=r"GRU \(module 'body.0'\) is random"):
        _compute(Net(), nn.CrossEntropyLoss(), x, y, [BatchGrad()])
