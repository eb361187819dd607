"""Stop signals: DataLoader workers ignore them (SLURM signals every process of a step; the rank
owns the stop), the cadence of the cross-rank check comes from an agreed step time and keeps a
stop within checkpoint.stop_within_s, a single process stops at the next step. (Two real gloo
ranks agreeing during training and evaluation: tests/dist/test_train.py; on a real SLURM cluster:
tests/slurm.)"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from bigbatch.distributed.env import DistEnv
from bigbatch.trainer import stop
from bigbatch.trainer.data import STOP_SIGNALS, ignore_stop_signals, loader_iter


class Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        time.sleep(0.01)
        return torch.tensor([float(i)]), i % 2


@pytest.fixture
def handlers():
    assert stop.install()
    yield
    stop.uninstall()


def test_dataloader_workers_ignore_the_stop_signals_and_the_rank_gets_them(handlers):
    loader = torch.utils.data.DataLoader(Slow(), batch_size=4, num_workers=2, worker_init_fn=ignore_stop_signals)
    it = loader_iter(loader)
    first = next(it)
    workers = [w.pid for w in it._workers]
    for sig in STOP_SIGNALS:  # as `scancel --signal=TERM --full` does: every process of the step
        for pid in [*workers, os.getpid()]:
            os.kill(pid, sig)
    rest = list(it)  # torch's worker handler would have died of the SIGTERM: "DataLoader worker killed by signal"
    assert len(rest) == 15 and torch.equal(first[0].flatten(), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert stop.received() in STOP_SIGNALS


def test_a_signal_before_the_loop_is_kept_for_its_first_check(handlers):
    os.kill(os.getpid(), signal.SIGUSR2)
    check = stop.StopCheck(DistEnv(0, 1, 0, 1, torch.device("cpu"), None, False))
    with check:
        assert check.requested(1) and check.signum == signal.SIGUSR2


def test_one_process_stops_at_the_next_step_and_not_before():
    before = signal.getsignal(signal.SIGTERM)
    stop.forget()
    check = stop.StopCheck(DistEnv(0, 1, 0, 1, torch.device("cpu"), None, False))
    with check:
        assert not check.requested(1) and not check.during_evaluation(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert check.requested(2) and check.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # handlers as they were


def test_cadence_fits_the_agreed_step_time_into_the_budget_and_grows_at_most_2x():
    c = stop.Cadence(within_s=10.0)
    assert c.due(1)
    c.schedule(1, -1.0)  # no step time agreed yet: check at the next step
    assert c.next == 2
    c.schedule(2, 0.001)  # 1 ms steps would allow 10,000 steps; grows 1 -> 2 -> 4 ...
    assert c.every == 2 and c.next == 4
    for _ in range(20):
        c.schedule(c.next, 0.001)
    assert c.every == 10_000
    c.schedule(c.next, 0.5)  # steps became 500x slower: at once 20 steps = 10 s
    assert c.every == 20
    c.schedule(c.next, 30.0)  # a step longer than the budget: every step
    assert c.every == 1


def test_evaluation_restarts_its_count_at_the_learnt_interval():
    c = stop.Cadence(within_s=1.0)
    c.every = 8
    c.restart()
    assert not c.due(7) and c.due(8)


def test_a_handler_set_after_install_does_not_hide_the_signal_from_the_loop():
    """CI regression: `bigbatch train` in-process had installed the handlers, then a library (Ray,
    in the sweep tests) set its own SIGTERM handler; the next loop trusted the first install and
    the SIGTERM killed the test process. The loop now catches it and gives the library its handler back."""
    stop.install()
    seen = []
    foreign = lambda signum, frame: seen.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, foreign)
    try:
        check = stop.StopCheck(DistEnv(0, 1, 0, 1, torch.device("cpu"), None, False))
        with check:
            os.kill(os.getpid(), signal.SIGTERM)
            assert check.requested(1) and check.signum == signal.SIGTERM and not seen
        assert signal.getsignal(signal.SIGTERM) is foreign and stop.received() is None
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.uninstall()
