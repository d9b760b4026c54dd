"""curvlab.distributed: 2 gloo ranks on two halves of a batch against one process on all of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvlab.distributed import (
    DataParallelPreconditioner,
    all_reduce_bucketed,
    assign_by_cost,
    eigh_cost,
    flatten,
    make_buckets,
    reduce_results,
    unflatten,
)
from curvlab.optim import KFAC

sys.path.insert(0, str(Path(__file__).parent))
import worker  # noqa: E402

WORKER = Path(__file__).parent / "worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run worker.py under ``torch.distributed.run --nproc_per_node=2`` (gloo), once."""
    out = tmp_path_factory.mktemp("dist") / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKER),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("case", worker.CASES)
def test_two_ranks_take_the_whole_batch_step(launched, case):
    reference = worker.run_case(case)
    initial = list(worker.model("conv" in case, deep="deep" in case).parameters())
    for got, want, start in zip(launched[case], reference, initial, strict=True):
        assert not torch.allclose(want, start)  # the steps moved the parameters
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_mc_fisher_ranks_sample_apart_but_step_together(launched):
    rank0, rank1 = launched[worker.MC_CASE]
    torch.testing.assert_close(rank0, rank1, rtol=1e-12, atol=1e-14)  # reduced factors
    single = torch.cat([p.reshape(-1) for p in worker.run_case(worker.MC_CASE)])
    start = torch.cat([p.reshape(-1) for p in worker.model().parameters()])
    assert not torch.allclose(rank0, start)
    assert not torch.allclose(rank0, single)  # other labels sampled: equal in distribution only


@pytest.mark.parametrize("split", ["results", "uneven"])
def test_reduce_results_sums_variance_and_per_sample(launched, split):
    """Equal halves, and shards of 5 and 3 samples: the whole batch's quantities."""
    reference = worker.results()
    got = launched[split]
    assert set(got) == set(reference)
    for q in reference:
        for name, value in reference[q].items():
            torch.testing.assert_close(got[q][name], value, rtol=1e-10, atol=1e-12)
    assert got["BatchGrad"]["0.weight"].shape[0] == 8  # gathered over both shards
    assert got["SqrtGGN"]["0.weight"].shape[1] == 8  # gathered along its sample axis


def test_variance_is_not_the_mean_of_the_ranks_variances():
    """The check above has teeth: averaging the halves' variances gives another value."""
    x, y = worker.data(0)
    quantity = worker.Variance()
    halves = [
        worker.compute(worker.model(), worker.LOSS, x[s], y[s], [quantity])
        for s in (slice(0, 4), slice(4, 8))
    ]
    mean = (halves[0][quantity]["0.weight"] + halves[1][quantity]["0.weight"]) / 2
    whole = worker.compute(worker.model(), worker.LOSS, x, y, [quantity])[quantity]["0.weight"]
    assert not torch.allclose(mean, whole, rtol=1e-3)


def test_reduce_results_names_the_unknown_quantity(launched):
    assert "GGNMP" in launched["error"] and "no known reduction" in launched["error"]


def test_make_buckets_respects_size_order_and_dtype():
    tensors = [torch.zeros(4), torch.zeros(4), torch.zeros(10), torch.zeros(2, dtype=torch.float64)]
    buckets = make_buckets(tensors, 32)  # 4 floats = 16 bytes
    assert buckets == [[0, 1], [2], [3]]
    assert sorted(i for b in buckets for i in b) == [0, 1, 2, 3]
    assert make_buckets(tensors, 10**6) == [[0, 1, 2], [3]]


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_make_buckets_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="bucket_bytes"):
        make_buckets([torch.zeros(1)], size)


def test_flatten_unflatten_round_trip():
    tensors = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    back = unflatten(flatten(tensors), tensors)
    for a, b in zip(tensors, back, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unflatten"):
        unflatten(torch.zeros(3), tensors)


def test_clear_errors_without_process_group():
    model = worker.model()
    x, y = worker.data(0)
    results = worker.compute(model, worker.LOSS, x, y, [])
    with pytest.raises(RuntimeError, match="reduce_results: torch.distributed is not init"):
        reduce_results(results)
    with pytest.raises(RuntimeError, match="all_reduce_bucketed"):
        all_reduce_bucketed([torch.zeros(1)])
    with pytest.raises(RuntimeError, match="DataParallelPreconditioner"):
        DataParallelPreconditioner(KFAC(model, loss_func=worker.LOSS))


# ------------------------------------------------------------ KFAC's inverses by their cost
def test_assignment_is_greedy_largest_first():
    assert assign_by_cost([8, 7, 6, 5, 4], 2) == [0, 1, 1, 0, 0]  # loads 17 and 13
    assert assign_by_cost([1, 2, 3], 1) == [0, 0, 0]
    assert assign_by_cost([3, 1], 4) == [0, 1]  # more ranks than blocks: one block each
    with pytest.raises(ValueError, match="world_size"):
        assign_by_cost([1.0], 0)


def _loads(owners, costs, world):
    loads = [0.0] * world
    for owner, cost in zip(owners, costs, strict=True):
        loads[owner] += cost
    return loads


@pytest.mark.parametrize("world", [2, 3, 4])
def test_assignment_of_3c3d_blocks_is_balanced(world):
    """3C3D's joint blocks (a, b): the cost-balanced loads beat round-robin's."""
    dims = [(76, 64), (577, 96), (865, 128), (1153, 512), (513, 256), (257, 10)]
    costs = [float(a) ** 3 + float(b) ** 3 for a, b in dims]
    loads = _loads(assign_by_cost(costs, world), costs, world)
    round_robin = _loads([i % world for i in range(len(costs))], costs, world)
    bound = max(sum(costs) / world, max(costs))  # no assignment does better
    assert max(loads) <= 4 / 3 * bound  # the longest-processing-time guarantee
    assert max(loads) - min(loads) <= max(costs)
    assert max(loads) <= max(round_robin)


def test_eigh_cost_is_the_cubes_of_both_factors():
    block = worker.compute(worker.model(), worker.LOSS, *worker.data(0), [worker.KFLR()])
    kron = block[worker.KFLR()]["0.weight"]  # the weight alone: A [1, 5, 5], B [1, 4, 4]
    assert eigh_cost(kron) == 5**3 + 4**3
