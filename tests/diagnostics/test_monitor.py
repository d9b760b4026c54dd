"""The Monitor's instruments against their definitions on per-sample gradients, and its log."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from curvlab.diagnostics import (
    PRESETS,
    HessianMaxEig,
    HessianTrace,
    Monitor,
    linear_schedule,
    logarithmic_schedule,
    read_log,
)
from tests import reference

LOSSES = {
    "ce-mean": (nn.CrossEntropyLoss, 3),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), 3),
}
N = 7


def problem(loss: str, seed: int = 0):
    """A small tanh MLP in float64, its loss function and a batch."""
    torch.manual_seed(seed)
    make_loss, classes = LOSSES[loss]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    if loss.startswith("ce"):
        y = torch.randint(0, classes, (N,))
    else:
        y = torch.randn(N, classes, dtype=torch.float64)
    return model, make_loss(), x, y


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def instruments_full(model: nn.Module) -> list:
    """Every instrument, the Hessian ones exact (as many Lanczos steps / products as needed)."""
    P = num_params(model)
    names = [n for n in PRESETS["full"] if n not in ("hessian_max_eig", "hessian_trace")]
    return [*names, HessianMaxEig(max_steps=P, tol=1e-12), HessianTrace(num_matvecs=3 * P)]


def monitored_step(model, loss_func, x, y, monitor, step=0, optimizer=None):
    model.zero_grad()
    loss = loss_func(model(x), y)
    with monitor(step, loss=loss, optimizer=optimizer):
        loss.backward()
    return loss


_RUNS: dict = {}


def run_once(loss: str) -> tuple[dict, dict]:
    """One monitored step with every instrument, and the definitions computed directly."""
    if loss in _RUNS:
        return _RUNS[loss]
    model, loss_func, x, y = problem(loss)
    with Monitor(model, loss_func, instruments_full(model), schedule=1) as monitor:
        batch_loss = monitored_step(model, loss_func, x, y, monitor)
        record = monitor.latest()
    G = reference.per_sample_gradients(model, loss_func, x, y)  # [N, P]
    mean = G.mean(0)
    m = mean.square().sum()
    dots = G @ mean
    norms = G.norm(dim=1)
    hessian = reference.full_hessian(model, loss_func, x, y)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    orthogonal = G - (dots / m)[:, None] * mean
    expected = {
        "loss": float(batch_loss),
        "grad_norm": float(grad.norm()),
        "distance": 0.0,
        "batch_grad_norms": {
            "mean": float(norms.mean()),
            "std": float(norms.std(correction=0)),
            "min": float(norms.min()),
            "max": float(norms.max()),
        },
        "norm_test": math.sqrt((G - mean).square().sum() / (N * (N - 1) * m)),
        "inner_product_test": math.sqrt((dots - m).square().sum() / (N * (N - 1) * m**2)),
        "orthogonality_test": math.sqrt(orthogonal.square().sum() / (N * (N - 1) * m)),
        "mean_gsnr": float((mean.square() / (G.var(0, correction=0) + 1e-5)).mean()),
        "hessian_max_eig": float(torch.linalg.eigvalsh(hessian)[-1]),
        "hessian_trace": float(hessian.trace()),
    }
    _RUNS[loss] = (record, expected)
    return _RUNS[loss]


INSTRUMENT_NAMES = [
    "loss",
    "grad_norm",
    "distance",
    "batch_grad_norms",
    "norm_test",
    "inner_product_test",
    "orthogonality_test",
    "mean_gsnr",
    "hessian_max_eig",
    "hessian_trace",
]


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("name", INSTRUMENT_NAMES)
def test_instrument_equals_its_definition(name, loss):
    record, expected = run_once(loss)
    value, want = record[name], expected[name]
    if isinstance(want, dict):
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12)
    else:
        assert value == pytest.approx(want, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("name", ["ce-mean", "mse-sum"])
def test_hessian_trace_from_the_diagonal_is_exact(name):
    model, loss_func, x, y = problem(name)
    hessian = reference.full_hessian(model, loss_func, x, y)
    with Monitor(model, loss_func, [HessianTrace(), "tic_diag"], schedule=1) as monitor:
        monitored_step(model, loss_func, x, y, monitor)
    assert monitor.latest()["hessian_trace"] == pytest.approx(float(hessian.trace()), rel=1e-9)


def test_hessian_trace_method_is_checked():
    with pytest.raises(ValueError, match="method"):
        HessianTrace(method="lanczos")


def test_hessian_trace_estimate_is_close_with_few_products():
    model, loss_func, x, y = problem("ce-mean")
    hessian = reference.full_hessian(model, loss_func, x, y)
    instrument = HessianTrace(num_matvecs=30, method="hutch++")
    with Monitor(model, loss_func, [instrument], schedule=1) as monitor:
        monitored_step(model, loss_func, x, y, monitor)
    # Hutch++ with 10 test vectors: within 3 standard deviations of Hutchinson on all of H
    tolerance = 3 * math.sqrt(2 / 10) * float(torch.linalg.matrix_norm(hessian))
    assert abs(monitor.latest()["hessian_trace"] - float(hessian.trace())) < tolerance


def test_update_size_and_distance_follow_the_parameters():
    """SGD: the update leading to step t is lr * grad of step t - 1; distance is to step 0."""
    model, loss_func, x, y = problem("ce-mean")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)

    def flat():
        return torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    start = flat()
    got, want, last = [], [], None
    with Monitor(model, loss_func, ["update_size", "distance", "grad_norm"]) as monitor:
        for step in range(3):
            monitored_step(model, loss_func, x, y, monitor, step, optimizer)
            record = monitor.latest()
            got.append((record.get("update_size"), record["distance"]))
            want.append((float(0.3 * last) if step else None, float((flat() - start).norm())))
            last = record["grad_norm"]
            optimizer.step()
    flat_got = [v for pair in got[1:] for v in pair]
    assert got[0] == (None, 0.0) and flat_got == pytest.approx(
        [v for pair in want[1:] for v in pair], rel=1e-10
    )


@pytest.mark.parametrize("preset", ["economy", "business", "full"])
def test_grad_equals_a_plain_backward(preset):
    """Over three steps: the prepared capture (steps 0, 1) and the fallback pass (step 5)."""
    model, loss_func, x, y = problem("ce-mean")
    twin, twin_loss, _, _ = problem("ce-mean")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    equal = []
    with Monitor(model, loss_func, preset, schedule=1) as monitor:
        for step in (0, 1, 5):
            monitored_step(model, loss_func, x, y, monitor, step, optimizer)
            twin.zero_grad()
            twin_loss(twin(x), y).backward()  # the monitored loss_func runs once per step
            equal += [
                torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters())
            ]
            optimizer.step()
            twin_optimizer.step()
    assert all(equal)


def test_fallback_pass_gives_the_same_instruments():
    """A step the monitor did not prepare for (step numbers jump) uses compute(): same values."""
    names = ["norm_test", "inner_product_test", "orthogonality_test", "mean_gsnr"]
    records = []
    for step in (0, 3):  # the monitor prepares step 0
        model, loss_func, x, y = problem("mse-sum")
        with Monitor(model, loss_func, names, schedule=1) as monitor:
            monitored_step(model, loss_func, x, y, monitor, step)
            records.append({k: v for k, v in monitor.latest().items() if k != "step"})
    assert records[1].pop("per_sample") == records[0].pop("per_sample")
    assert records[1] == pytest.approx(records[0], rel=1e-10)


@pytest.mark.parametrize("preset", ["economy", "business", "full"])
def test_presets_select_their_instruments(preset):
    model, loss_func, x, y = problem("ce-mean")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, loss_func, preset, schedule=1) as monitor:
        for step in range(2):
            monitored_step(model, loss_func, x, y, monitor, step, optimizer)
            optimizer.step()
    assert set(monitor.latest()) == {"step", "per_sample", *PRESETS[preset]}


def test_schedules_skip_steps():
    model, loss_func, x, y = problem("ce-mean")
    schedule = {"norm_test": 2, "loss": linear_schedule(3, offset=1)}
    seen: dict[str, list[int]] = {"norm_test": [], "loss": [], "hessian_trace": [], "grad_norm": []}
    instruments = ["norm_test", "loss", "grad_norm", HessianTrace(num_matvecs=3)]
    with Monitor(model, loss_func, instruments, schedule=schedule) as monitor:
        for step in range(11):
            monitored_step(model, loss_func, x, y, monitor, step)
            for name in seen:
                if name in monitor.latest():
                    seen[name].append(step)
    assert seen == {
        "norm_test": [0, 2, 4, 6, 8, 10],
        "loss": [1, 4, 7, 10],
        "hessian_trace": [0, 10],  # its default: every 10 steps
        "grad_norm": list(range(11)),
    }


def test_logarithmic_schedule_is_dense_early():
    schedule = logarithmic_schedule(0, 3, steps=20)
    due = [s for s in range(1001) if schedule(s)]
    assert due[:4] == [0, 1, 2, 4] and due[-1] == 1000 and len(due) < 25


def test_unknown_names_are_named():
    model, loss_func, _, _ = problem("ce-mean")
    with pytest.raises(ValueError, match="unknown instrument 'alfa'"):
        Monitor(model, loss_func, ["loss", "alfa"])


def run_logged(log_dir, steps, seed=0):
    model, loss_func, x, y = problem("ce-mean", seed)
    with Monitor(model, loss_func, ["loss", "norm_test"], log_dir=log_dir, schedule=1) as monitor:
        for step in steps:
            monitored_step(model, loss_func, x, y, monitor, step)


def test_log_has_one_record_per_step(tmp_path):
    run_logged(tmp_path, range(3))
    lines = (tmp_path / "monitor.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


@pytest.mark.parametrize("cut", [1, 2, 10, "line"])  # bytes cut from the end; "line": all of it
def test_log_resumes_after_a_torn_last_line(tmp_path, cut):
    run_logged(tmp_path, range(3))
    path = tmp_path / "monitor.jsonl"
    data = path.read_bytes()
    end = data.rfind(b"\n", 0, len(data) - 1) + 1 if cut == "line" else len(data) - cut
    path.write_bytes(data[:end])  # a kill while writing step 2's record
    kept = read_log(tmp_path)
    run_logged(tmp_path, [len(kept), len(kept) + 1])  # the run restarts after the last record
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == list(range(len(kept) + 2)) and records[:2] == kept[:2]


def test_log_restart_from_an_earlier_step_replaces_the_repeated_records(tmp_path):
    run_logged(tmp_path, range(4))
    before = read_log(tmp_path)
    run_logged(tmp_path, [2, 3], seed=1)  # from a checkpoint of step 2, other data
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[:2] == before[:2] and records[2] != before[2]


def test_consecutive_steps_share_the_users_backward(monkeypatch):
    """Prepared ahead, the capture rides on the user's backward: no extra compute() pass."""
    import curvlab.diagnostics.monitor as monitor_module

    def no_extra_pass(*args, **kwargs):
        raise AssertionError("an extra engine pass ran")

    monkeypatch.setattr(monitor_module, "compute", no_extra_pass)
    model, loss_func, x, y = problem("ce-mean")
    with Monitor(model, loss_func, "full", schedule=1) as monitor:
        for step in range(3):
            monitored_step(model, loss_func, x, y, monitor, step)
    assert "inner_product_test" in monitor.latest()


def monitored_run(use_closure: bool) -> dict:
    model, loss_func, x, y = problem("ce-mean")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    with Monitor(model, loss_func, "economy", schedule=1) as monitor:
        for step in range(3):

            def closure(step=step):
                return monitored_step(model, loss_func, x, y, monitor, step, optimizer)

            if use_closure:
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
    return monitor.latest()


def test_monitor_inside_a_closure():
    """optimizer.step(closure) with the monitored backward inside the closure: same records."""
    record, in_closure = monitored_run(False), monitored_run(True)
    assert in_closure == record and "update_size" in in_closure


def test_a_block_without_the_loss_modules_call_is_an_error_not_a_skip():
    """The per-sample instruments need the batch: a loss computed another way is named."""
    model, loss_func, x, y = problem("ce-mean")
    with Monitor(model, loss_func, "economy", schedule=1) as monitor:
        loss = nn.functional.cross_entropy(model(x), y)  # not the monitor's loss module
        with pytest.raises(RuntimeError, match=r"norm_test.*loss_func\(model\(x\), y\)"):
            with monitor(0, loss=loss):
                loss.backward()
    with Monitor(model, loss_func, ["loss", "grad_norm"], schedule=1) as monitor:
        loss = nn.functional.cross_entropy(model(x), y)  # fine: no instrument reads the batch
        with monitor(0, loss=loss):
            loss.backward()
        assert set(monitor.latest()) == {"step", "loss", "grad_norm"}


def test_passes_outside_the_monitor_leave_the_next_step_unchanged():
    """Extra forward/backward passes between steps inside ``outside()`` (ExactGN's own) are not
    captured: the next step's records equal those of a run without them."""
    records = []
    for extra in (False, True):
        model, loss_func, x, y = problem("ce-mean")
        with Monitor(model, loss_func, "economy", schedule=1) as monitor:
            for step in range(3):
                monitored_step(model, loss_func, x, y, monitor, step)
                with monitor.outside():
                    with torch.no_grad():
                        for p in model.parameters():
                            p -= 0.1 * p.grad
                    if extra:  # another batch through the model, with a backward
                        loss_func(model(x[:3] * 2), y[:3]).backward()
            records.append(monitor.latest())
    assert records[0].keys() == records[1].keys() and "alpha" in records[0]
    for key in ("loss", "grad_norm", "alpha", "norm_test", "update_size"):
        assert records[1][key] == pytest.approx(records[0][key], rel=1e-10), key
