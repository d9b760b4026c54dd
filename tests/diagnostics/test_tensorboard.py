"""Monitor(tensorboard=True): the scalars read back from the event file equal the JSONL log's."""

import pytest
import torch
from torch import nn

from curvlab.diagnostics import Monitor, read_log

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed (pip install -e '.[tensorboard]')",
)


def test_event_file_holds_the_logged_scalars(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    loss_func = nn.CrossEntropyLoss()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(
        model, loss_func, ["loss", "grad_norm", "update_size"], tmp_path, tensorboard=True
    ) as monitor:
        for step in range(4):
            optimizer.zero_grad()
            loss = loss_func(model(x), y)
            with monitor(step, loss=loss, optimizer=optimizer):
                loss.backward()
            optimizer.step()
    records = read_log(tmp_path)
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "grad_norm"} <= set(tags)
    for tag in ("loss", "grad_norm"):
        logged = {r["step"]: r[tag] for r in records if isinstance(r.get(tag), float)}
        read = {e.step: e.value for e in events.Scalars(tag)}
        assert read.keys() == logged.keys() and len(read) == 4
        for step, value in logged.items():
            assert read[step] == pytest.approx(value, rel=1e-6)
