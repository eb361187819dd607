"""StepTimer: laps tile the step; exposed communication is the time after the last gradient."""

import time

import pytest
import torch
from torch import nn

from bigbatch.trainer.steptime import StepTimer


def _step(timer, model, sync, data_s=0.0, comm_s=0.0, opt_s=0.0):
    timer.start()
    time.sleep(data_s)
    x = torch.randn(16, 8)
    timer.data_ready(sync)
    model(x).sum().backward()
    time.sleep(comm_s)  # stands in for DDP's wait on the last all-reduce, after every gradient is ready
    timer.backward_done()
    time.sleep(opt_s)
    timer.lap("compute")
    timer.stop()


def test_parts_follow_where_the_time_went():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    timer = StepTimer(torch.device("cpu"), list(model.parameters()))
    _step(timer, model, sync=True)  # warm-up: the first backward initialises autograd
    timer.read()
    for _ in range(3):
        _step(timer, model, sync=True, data_s=0.02, comm_s=0.06, opt_s=0.01)
    t = timer.read()
    # each sleep lands in its own part: a part that lost its sleep to another would fall below it
    # (only lower bounds: a loaded machine stretches any interval)
    assert t["time/data(s)"] >= 0.02
    assert t["time/comm_exposed(s)"] >= 0.06
    assert t["time/compute(s)"] >= 0.01  # the optimizer sleep + the tiny forward/backward
    parts = t["time/data(s)"] + t["time/compute(s)"] + t["time/comm_exposed(s)"]
    assert parts <= t["time/step(s)"] and parts == pytest.approx(t["time/step(s)"], rel=0.1)


def test_only_the_last_gradients_hook_is_kept_and_it_is_the_first_layer():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    timer = StepTimer(torch.device("cpu"), list(model.parameters()))
    assert len(timer._handles) == 4
    _step(timer, model, sync=True)
    assert len(timer._handles) == 1 and timer._last_idx in (0, 1)  # layer 1's weight or bias comes last
    timer.read()
    _step(timer, model, sync=True, comm_s=0.02)
    assert timer.read()["time/comm_exposed(s)"] >= 0.02


def test_no_sync_backward_and_one_process_have_no_exposed_comm():
    model = nn.Linear(8, 2)
    for timer, sync in ((StepTimer(torch.device("cpu"), list(model.parameters())), False),
                        (StepTimer(torch.device("cpu"), None), True)):
        _step(timer, model, sync=sync, comm_s=0.01)
        t = timer.read()
        assert t["time/comm_exposed(s)"] == 0.0
        assert t["time/compute(s)"] >= 0.01  # the time after backward counts as compute then


def test_read_resets_and_time_between_steps_is_not_counted():
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    timer.lap("compute")
    timer.stop()
    time.sleep(0.03)  # logging / evaluation between steps
    timer.start()
    timer.lap("compute")
    timer.stop()
    assert timer.read()["time/step(s)"] < 0.01
    assert timer.read() == {"time/data(s)": 0.0, "time/compute(s)": 0.0, "time/comm_exposed(s)": 0.0,
                            "time/step(s)": 0.0}


def test_the_loss_sum_is_the_same_read_on_the_host_or_stacked():
    # the loop's loss bookkeeping: per-tensor reads on the CPU, one stacked copy on a GPU
    from bigbatch.trainer.step import LossSum

    losses = [torch.tensor(v, dtype=torch.float32) for v in (2.5, 0.125, 1e-3, 7.0)]
    sums = []
    for on_host in (True, False):
        s = LossSum(torch.device("cpu"), start=10.0, count=3)
        s.on_host = on_host
        for i, loss in enumerate(losses):
            s.add(loss, n=i + 1)
        sums.append(s.total())
        assert s.count() == 3 + 1 + 2 + 3 + 4
        restored = LossSum(torch.device("cpu"))
        restored.load_state_dict(s.state_dict())  # a checkpoint between log rows
        assert (restored.total(), restored.count()) == (s.total(), s.count())
        s.reset()
        assert s.total() == 0.0
        s.add(torch.tensor(float("inf")), 3)
        assert s.total() == float("inf")  # a diverged loss passes through to the divergence check
    assert sums[0] == sums[1] == 10.0 + sum(loss.item() * (i + 1) for i, loss in enumerate(losses))  # float64
