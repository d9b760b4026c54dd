"""The width study: its measurements against direct computations, resume, figures and CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from curvlab.cli import main
from curvlab.experiments import ResultsStore
from curvlab.experiments import width_scaling as ws
from curvlab.experiments.width_scaling import (
    WidthScaling,
    WidthScalingConfig,
    build_model,
    expected_calibration_error,
    width_records,
)

TINY = dict(
    seeds=(1,),
    mlp_widths=(8, 32),
    cnn_widths=(2, 4),
    depth=2,
    train_size=64,
    steps=6,
    probe=8,
    test_size=128,
)


def test_expected_calibration_error_against_its_definition():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 4, generator=generator).softmax(1)
    labels = torch.randint(0, 4, (500,), generator=generator)
    confidence, predicted = probs.max(1)
    total = 0.0
    for b in range(15):
        low, high = b / 15, (b + 1) / 15
        members = (confidence >= low) & (confidence < high)
        if members.any():
            accuracy = (predicted[members] == labels[members]).double().mean()
            total += (
                members.double().mean() * (accuracy - confidence[members].double().mean()).abs()
            )
    assert expected_calibration_error(probs, labels) == pytest.approx(float(total), abs=1e-12)
    perfect = F.one_hot(labels, 4).double()
    assert expected_calibration_error(perfect, labels) == 0.0


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_models_have_the_asked_width_and_depth(family):
    model = build_model(family, 6, 3)
    weights = [m for m in model if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(weights) == 4 and weights[-1].in_features == 6
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_units_cover_every_question_family_width_and_seed(tmp_path):
    config = WidthScalingConfig(**TINY)
    store = WidthScaling(config, tmp_path, progress=False).run()
    records = width_records(tmp_path)
    assert len(records) == len(WidthScaling(config, tmp_path).units()) == 2 * 2 * 2
    kernel = [r for r in records if r["question"] == "kernel"]
    for r in kernel:
        assert r["ntk_change"] > 0 and 0 <= r["cka_change_first"] <= 1
        assert 0 <= r["net_ece"] <= 1 and r["kl_net_lin"] >= 0
        assert r["linearization_error"] >= 0
    # the rate is c N_p / lambda_max of the probe's initial NTK
    for r in records:
        assert r["lr"] == pytest.approx(config.lr * config.probe / r["ntk_max_eig"])
    assert store.header()["config"]["mlp_widths"] == [8, 32]


def test_the_kernel_measurements_match_a_direct_computation(tmp_path):
    config = WidthScalingConfig(**{**TINY, "families": ("mlp",), "mlp_widths": (16,)})
    WidthScaling(config, tmp_path, progress=False).run()
    (record,) = [r for r in width_records(tmp_path) if r["question"] == "kernel"]
    runner = WidthScaling(config, tmp_path)
    data = runner._data()
    x, y = runner._subset(data, 1)
    model = runner._model("mlp", 16, 1)
    reference = [p.detach().clone() for p in model.parameters()]
    probe = x[: config.probe]

    def kernel(params):
        def f(*ps):
            return torch.func.functional_call(
                model, dict(zip(dict(model.named_parameters()), ps, strict=True)), (probe,)
            )

        jac = torch.autograd.functional.jacobian(f, tuple(params))
        flat = torch.cat([j.reshape(probe.shape[0], 10, -1) for j in jac], dim=2)
        return torch.einsum("ncp,mcp->nm", flat, flat)

    ntk0 = kernel(reference)
    optimizer = torch.optim.SGD(model.parameters(), lr=record["lr"])
    for _ in range(config.steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    ntk = kernel([p.detach() for p in model.parameters()])
    expected = (ntk - ntk0).norm() / ntk0.norm()
    assert record["ntk_change"] == pytest.approx(float(expected), rel=1e-4)
    with torch.no_grad():
        accuracy = (model(data["test_x"]).argmax(1) == data["test_y"]).double().mean()
    assert record["net_test_acc"] == pytest.approx(float(accuracy))


def test_a_killed_run_resumes_at_the_first_unit_without_a_record(tmp_path, monkeypatch):
    config = WidthScalingConfig(**{**TINY, "families": ("mlp",)})
    calls = []
    original = WidthScaling._forgetting

    def dying(self, family, width, seed, data):
        calls.append(width)
        if width == 32:
            raise KeyboardInterrupt
        return original(self, family, width, seed, data)

    monkeypatch.setattr(WidthScaling, "_forgetting", dying)
    with pytest.raises(KeyboardInterrupt):
        WidthScaling(config, tmp_path, progress=False).run()
    done = width_records(tmp_path)
    assert len(done) == 3  # kernel 8, forgetting 8, kernel 32
    with (tmp_path / "results.jsonl").open("ab") as stream:
        stream.write(b'{"type": "width", "quest')  # a torn last line
    monkeypatch.setattr(WidthScaling, "_forgetting", original)
    WidthScaling(config, tmp_path, progress=False).run()
    records = width_records(tmp_path)
    assert len(records) == 4
    assert [r for r in records if r["width"] == 8] == [r for r in done if r["width"] == 8]


def test_figures_and_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "width-scaling", "--mlp-widths", "8,16", "--cnn-widths", "2", "--steps", "4"]
    args += ["--train-size", "32", "--depth", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    for name in ws.FIGURES.values():
        assert (out / name).stat().st_size > 10_000
    header = ResultsStore(out).header()
    assert header["config"]["experiment"] == "width-scaling"
    assert json.loads((out / "results.jsonl").read_text().splitlines()[-1])["type"] == "width"
    assert main(["run", "width-scaling", "--hidden", "64", "--out", str(out)]) == 2
    assert "--hidden belong to the paper's experiments" in capsys.readouterr().err
    assert main(["run", "width-scaling", "--monitor", "economy", "--out", str(out)]) == 2
    assert "--monitor belong to the paper's experiments" in capsys.readouterr().err
    assert main(["run", "fullbatch", "--mlp-widths", "8", "--out", str(tmp_path / "x")]) == 2
    assert "--mlp-widths belong to width-scaling" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "cifar10"}, "28x28"),
        ({"families": ("rnn",)}, "families"),
        ({"mlp_widths": ()}, "mlp_widths"),
        ({"steps": 1}, "steps"),
        ({"probe": 1000}, "probe"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WidthScalingConfig(**kwargs).check()
